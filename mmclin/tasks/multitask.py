"""Several tasks predicted from one shared representation, with missing labels masked."""
from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from mmclin.registry import TASKS
from mmclin.tasks.base import Metrics, Task


@TASKS.register("multitask")
class MultiTask(Task):
    """A weighted sum of sub-tasks that share the network; each keeps its own head slice.

    Options:
        tasks (dict[str, dict]): sub-task key -> ``{"name": <registered task>, **its options}``,
            e.g. ``{"death": {"name": "binary"}, "los": {"name": "regression"}}``.
        weights (dict[str, float] | None): loss weight per sub-task (default 1 each).

    Sub-tasks are always taken in sorted key order. ``y`` is a dict ``{key: y_key}`` or a
    pandas/polars DataFrame whose columns are the keys (scalar-label sub-tasks only; survival
    and multilabel targets go in a dict). A missing label (None / NaN; for survival a missing
    time or event) removes that row from that sub-task's loss, fit and metrics only.

    Layout: the outputs are the sub-tasks' outputs side by side (``output_dim`` = their sum);
    ``encode`` is one float ``[N, sum of target_width]`` matrix, each sub-task's block being its
    own ``encode`` (width 1 for binary / multiclass / regression, K for multilabel, 2 for
    survival) with NaN rows where the label is missing. :meth:`layout` gives the slices;
    ``tasks`` holds the sub-tasks and ``slices`` their output columns.

    ``predict`` -> ``{key: sub-task predictions}``; metrics are named ``key/metric``; the
    primary metric and ``score`` are those of the first sub-task.
    """

    problem = "multitask"
    option_defaults = {"tasks": None, "weights": None}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        specs = self.options["tasks"]
        if not isinstance(specs, dict) or not specs:
            raise ValueError(
                "The 'tasks' parameter of the multitask task must be a non-empty dict "
                f"{{key: {{'name': task, **options}}}}. Got {specs!r} instead."
            )
        self.tasks: dict[str, Task] = {}
        for key in sorted(specs):
            spec = dict(specs[key])
            name = spec.pop("name", None)
            if name is None or name == "multitask":
                raise ValueError(f"multitask sub-task {key!r} needs a 'name' of a single task; got {specs[key]!r}.")
            self.tasks[key] = TASKS.create(name, **spec)
        weights = self.options["weights"] or {}
        extra = sorted(set(weights) - set(self.tasks))
        if extra:
            raise ValueError(f"'weights' names unknown sub-task(s) {extra}; sub-tasks are {list(self.tasks)}.")
        self.weights = {key: float(weights.get(key, 1.0)) for key in self.tasks}
        first = self.tasks[next(iter(self.tasks))]
        self.primary_metric = f"{next(iter(self.tasks))}/{first.primary_metric}"  # type: ignore[misc]
        self.greater_is_better = first.greater_is_better  # type: ignore[misc]

    # --- layout ---------------------------------------------------------------------------
    def layout(self) -> Iterator[tuple[str, Task, slice, slice]]:
        """``(key, sub-task, output slice, target slice)`` in sorted key order."""
        o = t = 0
        for key, sub in self.tasks.items():
            yield key, sub, slice(o, o + sub.output_dim), slice(t, t + sub.target_width)
            o, t = o + sub.output_dim, t + sub.target_width

    @property
    def slices(self) -> dict[str, slice]:
        """Sub-task key -> the columns of the outputs that belong to it."""
        return {key: o for key, _, o, _ in self.layout()}

    # --- targets --------------------------------------------------------------------------
    def check_targets(self, y: Any) -> dict[str, Any]:
        if hasattr(y, "columns"):  # pandas / polars DataFrame: one column per sub-task
            y = {str(c): y[c].to_numpy() for c in y.columns}
        if not isinstance(y, dict):
            raise TypeError(f"multitask targets must be a dict {{sub-task: y}} or a DataFrame; got {type(y).__name__}.")
        lacking, extra = sorted(set(self.tasks) - set(y)), sorted(set(y) - set(self.tasks))
        if lacking or extra:
            raise ValueError(
                f"multitask targets must have exactly the keys {list(self.tasks)}; "
                f"missing {lacking}, unexpected {extra}."
            )
        sizes = {key: self.n_rows(y[key]) for key in self.tasks}
        first = next(iter(sizes))
        for key, n in sizes.items():
            if n != sizes[first]:
                raise ValueError(f"{key!r} has {n} samples but {first!r} has {sizes[first]}.")
        return {key: y[key] for key in self.tasks}

    def missing_rows(self, y: Any) -> np.ndarray:
        return np.zeros(self.n_rows(self.check_targets(y)), dtype=bool)

    def _observed_part(self, sub: Task, y_sub: Any) -> tuple[np.ndarray, Any]:
        keep = ~sub.missing_rows(y_sub)
        return keep, self.take_rows(y_sub, keep)

    def fit_targets(self, y: Any) -> "MultiTask":
        for key, y_sub in self.check_targets(y).items():
            keep, part = self._observed_part(self.tasks[key], y_sub)
            if not keep.any():
                raise ValueError(f"multitask sub-task {key!r} has no label in the training targets.")
            self.tasks[key].fit_targets(part)
        return self

    @property
    def output_dim(self) -> int:
        return sum(sub.output_dim for sub in self.tasks.values())

    @property
    def target_width(self) -> int:
        return sum(sub.target_width for sub in self.tasks.values())

    def encode(self, y: Any) -> Tensor:
        """Sub-task encodings side by side, NaN rows where a label is missing.

        Shapes:
            returns float ``[N, target_width]``.
        """
        y = self.check_targets(y)
        return torch.cat([self.tasks[key].encode_masked(y[key]) for key in self.tasks], dim=1)

    # --- model ----------------------------------------------------------------------------
    def check_batch_size(self, batch_size: int) -> None:
        for task in self.tasks.values():
            task.check_batch_size(batch_size)

    def loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        """``sum_k weight_k * loss_k`` over the rows where sub-task k has a label.

        Shapes:
            outputs ``[B, output_dim]``, target ``[B, target_width]`` -> scalar.
        """
        total = outputs.new_zeros(())
        for key, sub, o_sl, t_sl in self.layout():
            out_k, tgt_k = outputs[:, o_sl], target[:, t_sl]
            obs = sub.observed(tgt_k)
            # no label for this sub-task in the batch: an exact 0 that keeps its outputs in the graph
            loss_k = sub.loss(out_k[obs], tgt_k[obs]) if bool(obs.any()) else 0.0 * out_k.sum()
            total = total + self.weights[key] * loss_k
        return total

    def calibrate(self, outputs: np.ndarray, y: Any) -> None:
        outputs = self.as_numpy(outputs)
        y = self.check_targets(y)
        for key, sub, o_sl, _ in self.layout():
            keep, part = self._observed_part(sub, y[key])
            if keep.any():
                sub.calibrate(outputs[keep][:, o_sl], part)

    # --- decoding and scoring -------------------------------------------------------------
    def predict(self, outputs: np.ndarray) -> dict[str, np.ndarray]:  # type: ignore[override]
        outputs = self.as_numpy(outputs)
        return {key: sub.predict(outputs[:, o_sl]) for key, sub, o_sl, _ in self.layout()}

    def metrics(self, y_true: Any, outputs: np.ndarray, y_train: Any = None) -> dict[str, float]:
        """Each sub-task's metrics on its labelled rows, named ``key/metric``."""
        outputs = self.as_numpy(outputs)
        y = self.check_targets(y_true)
        y_tr = None if y_train is None else self.check_targets(y_train)
        out = Metrics()
        for key, sub, o_sl, _ in self.layout():
            keep, part = self._observed_part(sub, y[key])
            if not keep.any():
                out[f"{key}/{sub.primary_metric}"] = math.nan
                out.undefined[f"{key}/{sub.primary_metric}"] = f"no labelled row of sub-task {key!r}"
                continue
            ref = None if y_tr is None else self._observed_part(sub, y_tr[key])[1]
            sub_metrics = sub.metrics(part, outputs[keep][:, o_sl], y_train=ref)
            for name, value in sub_metrics.items():
                out[f"{key}/{name}"] = value
            for name, why in getattr(sub_metrics, "undefined", {}).items():
                out.undefined[f"{key}/{name}"] = f"sub-task {key!r}: {why}"
        return out

    def undefined_metrics(self, y_true: Any) -> dict[str, str]:
        """Each sub-task's, on its labelled rows, named ``key/metric``."""
        y = self.check_targets(y_true)
        out: dict[str, str] = {}
        for key, sub, _, _ in self.layout():
            keep, part = self._observed_part(sub, y[key])
            if keep.any():
                out.update({f"{key}/{m}": f"sub-task {key!r}: {why}" for m, why in sub.undefined_metrics(part).items()})
        return out

    def score(self, y_true: Any, outputs: np.ndarray) -> float:
        """The first sub-task's ``score`` on its labelled rows."""
        key, sub, o_sl, _ = next(self.layout())
        keep, part = self._observed_part(sub, self.check_targets(y_true)[key])
        return sub.score(part, self.as_numpy(outputs)[keep][:, o_sl]) if keep.any() else math.nan

    def state_dict(self) -> dict[str, Any]:
        return {key: sub.state_dict() for key, sub in self.tasks.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, sub in self.tasks.items():
            sub.load_state_dict(state[key])

    # --- examples -------------------------------------------------------------------------
    @classmethod
    def example_options(cls) -> dict[str, Any]:
        return {
            "tasks": {"death": {"name": "binary"}, "los": {"name": "regression"}, "survival": {"name": "cox"}},
            "weights": {"los": 0.5},
        }

    @classmethod
    def _example(cls, n: int, seed: int, censored: bool) -> dict[str, Any]:
        out = {}
        for key, spec in cls.example_options()["tasks"].items():
            sub_cls = TASKS.get(spec["name"])
            y = sub_cls.example_censored_targets(n, seed) if censored else None
            out[key] = sub_cls.example_targets(n, seed) if y is None else y
        if n >= 6:  # a few missing labels, which the loss must mask
            out["death"] = out["death"].astype(object)
            out["death"][4] = None
            out["los"][5] = np.nan
        return out

    @classmethod
    def example_targets(cls, n: int, seed: int = 0) -> dict[str, Any]:
        return cls._example(n, seed, censored=False)

    @classmethod
    def example_censored_targets(cls, n: int, seed: int = 0) -> dict[str, Any]:
        return cls._example(n, seed, censored=True)
