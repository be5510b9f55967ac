"""The Task contract: head size, target encoding, loss, decoding and metrics."""
from __future__ import annotations

import difflib
import math
import warnings
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import Tensor, nn


# --- support of a metric -----------------------------------------------------------------------------
# A metric computed on too few subjects or events is noise that looks like a result (a C-index of 1.0 from
# 2 patients). Below these counts in the scored rows it is reported as undefined: NaN, the reason in
# ``metrics.undefined`` and in an :class:`UndefinedMetricWarning` that states the count.
MIN_SUBJECTS = 10  # every metric: at least 10 scored subjects
MIN_PER_CLASS = 5  # ranking metrics (AUROC, AUPRC, F1) of a class or label: at least 5 subjects in it and 5 not in it
MIN_EVENTS = 10  # survival metrics (C-index, Uno's C, Brier, AUC): at least 10 events


class UndefinedMetricWarning(UserWarning):
    """A metric is reported as undefined (NaN) because it rests on too few subjects or events."""


class ExtrapolationWarning(UserWarning):
    """A prediction was asked outside what the training data covered (e.g. after the follow-up)."""


class UnknownOptionError(TypeError, ValueError):
    """An option a task does not take (a TypeError, as Python says of an unexpected keyword; a ValueError, as
    sklearn says of a bad parameter)."""


class Metrics(dict):
    """The metrics of a task: ``{name: value}``, a plain dict, plus ``undefined``: ``{name: reason}`` for those
    reported as NaN because their support is too small (see ``MIN_SUBJECTS``, ``MIN_PER_CLASS``, ``MIN_EVENTS``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.undefined: dict[str, str] = {}

    def mark_undefined(self, names: list[str], reason: str, warn: bool = True) -> "Metrics":
        """Set ``names`` to NaN with ``reason`` (one warning for all of them)."""
        names = [n for n in names if n in self]
        for n in names:
            self[n] = math.nan
            self.undefined[n] = reason
        if names and warn:
            warnings.warn(f"{', '.join(names)} undefined (reported as NaN): {reason}", UndefinedMetricWarning,
                          stacklevel=4)
        return self


class Task:
    """What to predict and how to score it.

    Life cycle (the training core calls these in order)::

        task = TASKS.create("cox", **options)
        task.fit_targets(y_train)            # learn classes / scaling / time bins from training targets only
        head = task.build_head(in_dim)       # nn.Module: [B, in_dim] -> [B, task.output_dim]
        target = task.encode(y)              # float/long tensor [N, ...], row-aligned with y
        loss = task.loss(outputs, target)    # scalar, outputs [B, output_dim]
        task.calibrate(outputs_train, y_train)   # after training (e.g. Breslow baseline hazard)
        task.predict(outputs)                # decoded predictions (labels, values, risk scores)
        task.metrics(y_true, outputs, y_train=...)   # dict of floats, from sklearn / scikit-survival

    ``outputs`` passed to predict/metrics/calibrate are numpy arrays ``[N, output_dim]``.
    ``state_dict()`` / ``load_state_dict()`` round-trip everything learned, as JSON-able values.

    Conventions shared by the mmclin tasks (helpers below):

    * ``encode`` returns a float tensor ``[N, target_width]``, so that a multitask can
      concatenate sub-targets into one matrix; ``missing_rows`` / ``encode_masked`` turn
      missing labels (None / NaN) into NaN rows, which ``observed`` finds again.
    * ``option_defaults`` lists the options a task accepts; an unknown option is an error
      (a typo must not be silently ignored).
    * ``example_options`` / ``example_targets`` feed the conformance checks in
      :mod:`mmclin.testing.task_checks`.
    """

    problem: ClassVar[str] = ""
    primary_metric: ClassVar[str] = ""
    greater_is_better: ClassVar[bool] = True
    option_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.option_defaults))
        if unknown:
            choices = sorted(self.option_defaults)
            close = difflib.get_close_matches(unknown[0], choices, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownOptionError(
                f"Unknown option {unknown[0]!r} for task {self.task_name!r}.{hint} "
                f"Options are {choices}."
            )
        self.options = {**self.option_defaults, **options}

    @property
    def task_name(self) -> str:
        return getattr(type(self), "registry_name", type(self).__name__)

    # --- targets -------------------------------------------------------------------------
    def check_targets(self, y: Any) -> Any:
        """Validate and normalise ``y``; raise naming the problem (row, value, expected)."""
        raise NotImplementedError

    def fit_targets(self, y: Any) -> "Task":
        raise NotImplementedError

    @property
    def output_dim(self) -> int:
        raise NotImplementedError

    @property
    def target_width(self) -> int:
        """Number of columns of ``encode(y)``."""
        raise NotImplementedError

    def encode(self, y: Any) -> Tensor:
        raise NotImplementedError

    def check_batch_size(self, batch_size: int) -> None:
        """Refuse a training batch size (``trainer.batch_size``) that the loss cannot learn from; any by default."""

    # --- model ---------------------------------------------------------------------------
    def build_head(self, in_dim: int) -> nn.Module:
        return nn.Linear(in_dim, self.output_dim)

    def loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def calibrate(self, outputs: np.ndarray, y: Any) -> None:
        """Post-training fit on training-set outputs (default: nothing)."""

    def fit_linear(self, X: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The task's penalised linear model (the classical one for this outcome, its penalty chosen on
        the rows given) on design ``X`` and encoded targets: ``(coef [output_dim, p], intercept [output_dim])``
        on the scale of the network's outputs. Tasks without one leave this out, and models on them have
        no linear path (:mod:`mmclin.training.linear_path`).

        Shapes: ``X [N, p]``, ``target`` = ``encode(y)`` as numpy ``[N, target_width]``.
        """
        raise NotImplementedError(f"the {self.task_name!r} task has no penalised linear model")

    # --- decoding and scoring ------------------------------------------------------------
    def predict(self, outputs: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def metrics(self, y_true: Any, outputs: np.ndarray, y_train: Any = None) -> dict[str, float]:
        raise NotImplementedError

    def score(self, y_true: Any, outputs: np.ndarray) -> float:
        """The sklearn-convention ``score`` (accuracy, R^2, Harrell's C)."""
        raise NotImplementedError

    def undefined_metrics(self, y_true: Any) -> dict[str, str]:
        """``{metric: reason}`` for the metrics that ``y_true`` has too few subjects or events to support
        (thresholds ``MIN_SUBJECTS``, ``MIN_PER_CLASS``, ``MIN_EVENTS``); none by default."""
        return {}

    def reported_metrics(self, y_true: Any, outputs: np.ndarray, y_train: Any = None) -> "Metrics":
        """:meth:`metrics` as mmclin reports them (fit, evaluate, the estimators' ``metrics``): a metric resting on
        too few subjects or events (:meth:`undefined_metrics`) is NaN, its reason in ``.undefined``, said in one
        :class:`UndefinedMetricWarning` per reason. ``metrics`` itself computes whatever the data allow."""
        raw = self.metrics(y_true, outputs, y_train=y_train)
        out = Metrics(raw)
        out.undefined.update(getattr(raw, "undefined", {}))
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.undefined_metrics(y_true).items():
            if name in out:
                by_reason.setdefault(reason, []).append(name)
        for reason, names in by_reason.items():
            out.mark_undefined(names, reason)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    @staticmethod
    def as_numpy(outputs: Any) -> np.ndarray:
        if isinstance(outputs, torch.Tensor):
            return outputs.detach().float().cpu().numpy()
        return np.asarray(outputs, dtype=np.float64)

    # --- examples for the conformance checks ---------------------------------------------
    @classmethod
    def example_options(cls) -> dict[str, Any]:
        """Constructor options used by the conformance checks."""
        return {}

    @classmethod
    def example_targets(cls, n: int, seed: int = 0) -> Any:
        """A valid ``y`` of ``n`` rows (``n >= 2``) for this task."""
        raise NotImplementedError

    @classmethod
    def example_censored_targets(cls, n: int, seed: int = 0) -> Any:
        """A valid ``y`` of ``n`` rows without any event, or None where events do not apply."""
        return None

    # --- helpers -------------------------------------------------------------------------
    def _require_fitted(self, attr: str, how: str = "fit_targets(y_train)") -> None:
        if getattr(self, attr, None) is None:
            raise RuntimeError(f"The {self.task_name!r} task is not fitted yet; call task.{how} first.")

    @staticmethod
    def n_rows(y: Any) -> int:
        if isinstance(y, dict):
            return Task.n_rows(next(iter(y.values())))
        if isinstance(y, tuple):
            return Task.n_rows(y[0])
        return len(y)

    @staticmethod
    def take_rows(y: Any, rows: Any) -> Any:
        """Rows ``rows`` (indices or bool mask) of ``y``: arrays, lists, pandas/polars, dict, tuple."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        if isinstance(y, dict):
            return {k: Task.take_rows(v, rows) for k, v in y.items()}
        if isinstance(y, tuple):
            return tuple(Task.take_rows(v, rows) for v in y)
        if hasattr(y, "iloc"):  # pandas
            return y.iloc[rows]
        if type(y).__module__.startswith("polars"):
            return y[rows.tolist()]
        return np.asarray(y)[rows]

    @staticmethod
    def missing_mask(values: Any) -> np.ndarray:
        """Bool ``[N]``: rows of ``values`` (``[N]`` or ``[N, ...]``) holding any None / NaN / NA."""
        arr = np.asarray(values)
        if arr.dtype.kind in "fc":
            miss = np.isnan(arr)
        elif arr.dtype.kind == "O":
            miss = np.array([is_missing(v) for v in arr.ravel()], dtype=bool).reshape(arr.shape)
        else:
            miss = np.zeros(arr.shape, dtype=bool)
        return miss.reshape(len(arr), -1).any(axis=1) if arr.ndim > 1 else miss

    def missing_rows(self, y: Any) -> np.ndarray:
        """Bool ``[N]``: True where the label of a row is missing (masked by the multitask)."""
        return self.missing_mask(y)

    def encode_masked(self, y: Any) -> Tensor:
        """``encode`` that tolerates missing labels: their rows come back as NaN.

        Shapes:
            returns ``[N, target_width]`` float32.
        """
        miss = self.missing_rows(y)
        out = torch.full((len(miss), self.target_width), float("nan"))
        keep = np.flatnonzero(~miss)
        if keep.size:
            out[torch.as_tensor(keep)] = self.encode(self.take_rows(y, keep)).float().reshape(keep.size, -1)
        return out

    @staticmethod
    def observed(target: Tensor) -> Tensor:
        """Bool ``[B]``: rows of an ``encode_masked`` target whose label is present.

        Shapes:
            target ``[B, W]`` -> ``[B]``.
        """
        return ~torch.isnan(target.reshape(target.shape[0], -1)).any(dim=1)


def shown(v: Any) -> Any:
    """A value as python shows it in messages: ``2`` rather than ``np.int64(2)``."""
    return v.item() if isinstance(v, np.generic) else v


def is_missing(v: Any) -> bool:
    if v is None:
        return True
    try:
        return bool(v != v)  # NaN is the one value unequal to itself
    except (TypeError, ValueError):
        return True  # pandas.NA refuses bool(), and is missing


def safe_metric(fn: Callable[[], Any]) -> float:
    """``float(fn())``, or NaN when the metric is undefined for this data (one class only,
    all censored, no valid time grid ...): sklearn / sksurv raise ValueError or warn then."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            value = float(fn())
        except (ValueError, ZeroDivisionError, FloatingPointError):
            return math.nan
    return value
