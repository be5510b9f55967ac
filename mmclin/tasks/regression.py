"""Regression: one continuous target, learned on a standardised scale."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
from torch import Tensor

from mmclin.registry import TASKS
from mmclin.tasks.base import MIN_SUBJECTS, Task, is_missing, safe_metric, shown

_LOSSES = ("mse", "huber")


@TASKS.register("regression")
class RegressionTask(Task):
    """One continuous target ``y``; the head predicts ``(y - mean_) / scale_``.

    ``mean_`` and ``scale_`` (the standard deviation, 1 when it is 0) are fitted on the
    training targets only, in ``fit_targets``; the loss works on that scale so that learning
    rates do not depend on the unit of ``y``.

    Options:
        loss ("mse" | "huber", default "mse"): Huber uses delta = 1 standard deviation.

    ``predict`` -> values ``[N]`` on the original scale.
    """

    problem = "regression"
    primary_metric = "r2"
    option_defaults = {"loss": "mse"}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options["loss"] not in _LOSSES:
            raise ValueError(
                f"The 'loss' parameter of the regression task must be one of {set(_LOSSES)}. "
                f"Got {self.options['loss']!r} instead."
            )
        self.mean_: float | None = None
        self.scale_: float | None = None

    def check_targets(self, y: Any) -> np.ndarray:
        arr = np.asarray(y)
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != 1:
            raise ValueError(f"regression targets must be one value per row (shape [N]); got shape {arr.shape}.")
        try:
            values = arr.astype(np.float64)
        except (TypeError, ValueError):  # object labels: None (missing) or a non-number somewhere
            values = np.empty(len(arr))
            for i, v in enumerate(arr):
                try:
                    values[i] = np.nan if is_missing(v) else float(v)
                except (TypeError, ValueError):
                    raise ValueError(f"regression target at row {i} is {shown(v)!r}; expected a number.") from None
        bad_rows = ~np.isfinite(values)
        if bad_rows.any():
            i = int(np.argmax(bad_rows))
            raise ValueError(
                f"regression target at row {i} is {values[i]}; expected a finite number (drop the row, or use "
                "the 'multitask' task, which masks missing labels out of the loss)."
            )
        return values

    def fit_linear(self, X: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ridge regression (penalty by leave-one-out CV) on the standardised target the head predicts."""
        from mmclin.tasks.linear_models import ridge_cv

        model = ridge_cv().fit(X, target.reshape(-1))
        return np.asarray(model.coef_).reshape(1, -1), np.atleast_1d(model.intercept_).reshape(1)

    def fit_targets(self, y: Any) -> "RegressionTask":
        values = self.check_targets(y)
        with np.errstate(over="ignore", invalid="ignore"):
            mean, std = float(values.mean()), float(values.std())
        if not (np.isfinite(mean) and np.isfinite(std)):  # an inf scale would make every prediction the mean
            row = int(np.argmax(np.abs(values)))
            raise ValueError(f"regression target at row {row} is {values[row]:.3g}: too large to standardise (the "
                             "mean or standard deviation of the targets overflows); expected values whose squares are "
                             "finite (|value| < 1e150), e.g. check the target's units")
        self.mean_ = mean
        self.scale_ = std if std > 0 else 1.0  # a constant target: keep the unit scale
        return self

    @property
    def output_dim(self) -> int:
        return 1

    @property
    def target_width(self) -> int:
        return 1

    def encode(self, y: Any) -> Tensor:
        """Standardised targets. Shapes: returns float ``[N, 1]``."""
        self._require_fitted("mean_")
        z = (self.check_targets(y) - self.mean_) / self.scale_
        return torch.as_tensor(z, dtype=torch.float32).reshape(-1, 1)

    def loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        """MSE or Huber on the standardised scale.

        Shapes:
            outputs ``[B, 1]``, target ``[B, 1]`` or ``[B]`` -> scalar.
        """
        pred, tgt = outputs.reshape(-1), target.reshape(-1).to(outputs.dtype)
        if self.options["loss"] == "huber":
            return F.huber_loss(pred, tgt, delta=1.0)
        return F.mse_loss(pred, tgt)

    def predict(self, outputs: np.ndarray) -> np.ndarray:
        """Shapes: ``[N, 1]`` -> ``[N]`` on the original scale."""
        self._require_fitted("mean_")
        assert self.mean_ is not None and self.scale_ is not None
        return self.as_numpy(outputs).reshape(-1).astype(np.float64) * self.scale_ + self.mean_

    def metrics(self, y_true: Any, outputs: np.ndarray, y_train: Any = None) -> dict[str, float]:
        """``mae``, ``rmse``, ``r2`` on the original scale (``y_train`` is unused)."""
        y, pred = self.check_targets(y_true), self.predict(outputs)
        return {
            "mae": safe_metric(lambda: mean_absolute_error(y, pred)),
            "rmse": safe_metric(lambda: np.sqrt(mean_squared_error(y, pred))),
            "r2": safe_metric(lambda: r2_score(y, pred)),
        }

    def undefined_metrics(self, y_true: Any) -> dict[str, str]:
        """Every metric needs ``MIN_SUBJECTS`` (10) scored subjects."""
        n = len(self.check_targets(y_true))
        return dict.fromkeys(["mae", "rmse", "r2"], f"{n} subject(s) scored; regression metrics need at least "
                                                    f"{MIN_SUBJECTS}") if n < MIN_SUBJECTS else {}

    def score(self, y_true: Any, outputs: np.ndarray) -> float:
        """R^2 (sklearn's regressor ``score``)."""
        return safe_metric(lambda: r2_score(self.check_targets(y_true), self.predict(outputs)))

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean_, "scale": self.scale_}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean_, self.scale_ = state.get("mean"), state.get("scale")

    @classmethod
    def example_targets(cls, n: int, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).normal(50.0, 10.0, n)
