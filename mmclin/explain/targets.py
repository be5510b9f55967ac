"""What an explanation explains: one differentiable scalar per subject, from the raw outputs.

Attributions are additive, so the scalar is chosen on a scale where adding up makes sense:

| task | explained scalar (default) | with ``horizon=t`` |
|---|---|---|
| ``cox`` | log-risk ``eta`` (higher = earlier event) | ``S(t | x) = exp(-H0(t) exp(eta))`` |
| ``discrete_time`` | risk = minus the restricted mean survival time up to the last bin edge | ``S(t | x)`` (product of bin survivals) |
| ``binary`` | log-odds of the positive class ``classes_[1]`` | |
| ``multiclass`` | log-probability of a class (default: each subject's predicted class) | |
| ``multilabel`` | logit of a label (default: each subject's most probable label) | |
| ``regression`` | the prediction in the target's own units | |
| ``multitask`` | a sub-task's scalar (``target="key"`` or ``("key", class)``; default: the first key) | |

Times are in the training times' unit: ``time_unit`` ("days", "months", ...) names it in the
descriptions ("S(1825 days | x)"); unknown (``None``), they say "time units".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import re

import numpy as np
import torch
from torch import Tensor

from mmclin.tasks.base import Task


@dataclass
class ExplainTarget:
    """``columns(outputs)`` gives candidate scalars ``[B, K]``; row ``i`` explains column ``index[i]``.

    Shapes:
        columns: raw outputs ``[B, task.output_dim]`` -> ``[B, K]``.
        index: ``[N]`` int, one column per subject of the explained frame.
    """

    columns: Callable[[Tensor], Tensor]
    index: np.ndarray
    labels: list[str]  # name of each column (class, label, or the scalar's name)
    description: str  # what is explained, for reports: "log-risk (cox)", "S(1825 days | x), ... (cox)"

    def label_of_rows(self) -> list[str]:
        return [self.labels[int(k)] for k in self.index]

    def select(self, values: Tensor, rows: Tensor | slice | None = None) -> Tensor:
        """The explained scalar per row. Shapes: ``[B, K]`` -> ``[B]``."""
        idx = torch.as_tensor(self.index if rows is None else self.index[rows], device=values.device, dtype=torch.long)
        return values.gather(1, idx.reshape(-1, 1)).squeeze(1)


TIME_UNITS = "time units"  # what a time is measured in when nobody said
# a time is also given in a larger unit for readers: unit -> (units per larger unit, larger unit, from how many units)
_LARGER = {"days": (365.25, "years", 365), "day": (365.25, "years", 365), "d": (365.25, "years", 365),
           "weeks": (52.18, "years", 52), "months": (12.0, "years", 12), "hours": (24.0, "days", 48), "h": (24.0, "days", 48)}


def time_text(t: float, unit: str | None = None) -> str:
    """A time with its unit: ``1825 days``; ``1825 time units`` when the unit is not known."""
    return f"{t:g} {unit or TIME_UNITS}"


def horizon_text(t: float, unit: str | None = None) -> str:
    """A time for readers, also in the next larger unit when it is at least one of them:
    ``horizon_text(1825, "days")`` is ``1825 days (5.0 years)``; unknown unit: ``1825 time units``."""
    text = time_text(t, unit)
    if unit and unit.lower() in _LARGER:
        per, larger, least = _LARGER[unit.lower()]
        if t >= least:
            text += f" ({t / per:.1f} {larger})"
    return text


def with_time_unit(description: str, unit: str | None) -> str:
    """A description made without a unit (``S(1825 time units | x), ... at 1825 time units``),
    with ``unit`` instead (``S(1825 days | x), ... at 1825 days (5.0 years)``)."""
    if not unit:
        return description
    number = r"([0-9][0-9.e+]*)"
    out = re.sub(rf"S\({number} {TIME_UNITS} \| x\)", lambda m: f"S({time_text(float(m[1]), unit)} | x)", description)
    return re.sub(rf"{number} {TIME_UNITS}", lambda m: horizon_text(float(m[1]), unit), out)


def resolve_target(task: Task, outputs: np.ndarray, target: Any = None, horizon: float | None = None,
                   time_unit: str | None = None) -> ExplainTarget:
    """The scalar to explain for ``task`` (see the module table). ``outputs`` are the raw outputs
    ``[N, output_dim]`` of the rows to explain (they pick per-row default classes); ``time_unit``
    names the unit of survival times in the description (default: "time units").

    Raises ValueError naming what is accepted when ``target`` or ``horizon`` do not fit the task.
    """
    from mmclin.tasks.classification import BinaryTask, MulticlassTask, MultilabelTask
    from mmclin.tasks.multitask import MultiTask
    from mmclin.tasks.regression import RegressionTask
    from mmclin.tasks.survival import CoxTask, DiscreteTimeTask

    name = task.task_name
    outputs = np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)
    n = len(outputs)
    if horizon is not None and task.problem != "survival" and not isinstance(task, MultiTask):
        raise ValueError(f"'horizon' applies to survival tasks only; the {name!r} task explains "
                         f"{'its logit' if task.problem != 'regression' else 'its prediction'} (drop --horizon)")

    if isinstance(task, MultiTask):
        keys = list(task.tasks)
        key, sub_target = (target if isinstance(target, tuple) else (target, None))
        key = keys[0] if key is None else key
        if key not in task.tasks:
            raise ValueError(f"target {key!r} is not a sub-task of this multitask model; choose one of {keys}")
        sl = task.slices[key]
        sub = resolve_target(task.tasks[key], outputs[:, sl], sub_target, horizon, time_unit)
        return ExplainTarget(lambda o: sub.columns(o[:, sl]), sub.index, sub.labels, f"{key}: {sub.description}")

    if isinstance(target, tuple):
        raise ValueError(f"a (sub-task, class) target applies to multitask models; the {name!r} task takes "
                         "a class label or nothing")

    if isinstance(task, CoxTask):
        if target is not None:
            raise ValueError(f"the 'cox' task explains the log-risk (or, with 'horizon', S(t)); 'target' must be None, got {target!r}")
        if horizon is None:
            return ExplainTarget(lambda o: o[:, :1], np.zeros(n, dtype=np.int64), ["log_risk"], "log-risk eta (cox; higher = earlier event)")
        if task.baseline_cumhaz_ is None:
            raise ValueError("the 'cox' task has no baseline hazard (not calibrated); survival at a horizon needs it")
        t = _check_horizon(horizon, task.baseline_times_)
        k = np.searchsorted(task.baseline_times_, t, side="right") - 1
        h0 = float(task.baseline_cumhaz_[k]) if k >= 0 else 0.0
        if h0 <= 0:
            raise ValueError(f"horizon {t:g} is before the first training event time ({task.baseline_times_[0]:g}); "
                             "S(t) is 1 for everyone there, so there is nothing to explain. Choose a later horizon.")
        return ExplainTarget(lambda o: torch.exp(-h0 * torch.exp(o[:, :1].clamp(max=50.0))), np.zeros(n, dtype=np.int64),
                             [f"survival_{t:g}"], f"S({time_text(t, time_unit)} | x), survival probability at "
                             f"{horizon_text(t, time_unit)} (cox)")

    if isinstance(task, DiscreteTimeTask):
        if target is not None:
            raise ValueError(f"the 'discrete_time' task explains its risk (or, with 'horizon', S(t)); 'target' must be None, got {target!r}")
        edges = torch.as_tensor(task.edges_, dtype=torch.float32)
        if horizon is None:
            widths = torch.diff(torch.cat([edges.new_zeros(1), edges]))

            def neg_rmst(o: Tensor) -> Tensor:
                s = torch.cumprod(torch.sigmoid(-o), dim=1)  # S at each edge: prod (1 - h)
                s_start = torch.cat([torch.ones_like(s[:, :1]), s[:, :-1]], 1)
                return -(s_start * widths.to(o)).sum(1, keepdim=True)

            return ExplainTarget(neg_rmst, np.zeros(n, dtype=np.int64), ["risk"],
                                 f"risk = -RMST up to {horizon_text(float(task.edges_[-1]), time_unit)} "
                                 "(discrete_time; higher = earlier event)")
        t = _check_horizon(horizon, task.edges_)
        k = int(np.searchsorted(task.edges_, t, side="right"))  # edges passed by t
        if k == 0:
            raise ValueError(f"horizon {t:g} is before the first interval end ({task.edges_[0]:g}); S(t) is 1 for "
                             "everyone there. Choose a later horizon.")
        return ExplainTarget(lambda o: torch.prod(torch.sigmoid(-o[:, :k]), dim=1, keepdim=True), np.zeros(n, dtype=np.int64),
                             [f"survival_{t:g}"], f"S({time_text(t, time_unit)} | x), survival probability at "
                             f"{horizon_text(t, time_unit)} (discrete_time)")

    if isinstance(task, RegressionTask):
        if target is not None:
            raise ValueError(f"the 'regression' task has one output; 'target' must be None, got {target!r}")
        mean, scale = float(task.mean_), float(task.scale_)
        return ExplainTarget(lambda o: o[:, :1] * scale + mean, np.zeros(n, dtype=np.int64), ["prediction"],
                             "prediction (regression, in the target's units)")

    if isinstance(task, BinaryTask):
        classes = [str(c) for c in task.classes_]
        if target is not None and str(target) != classes[1]:
            raise ValueError(f"the binary task explains the log-odds of its positive class {classes[1]!r}; "
                             f"'target' must be None or {classes[1]!r}, got {target!r}")
        return ExplainTarget(lambda o: o[:, :1], np.zeros(n, dtype=np.int64), [classes[1]],
                             f"log-odds of class {classes[1]!r} (binary)")

    if isinstance(task, (MulticlassTask, MultilabelTask)):
        multilabel = isinstance(task, MultilabelTask)
        labels = [str(c) for c in (task.labels_ if multilabel else task.classes_)]
        if target is None:
            index = np.argmax(outputs, axis=1)  # the predicted class / most probable label
        elif str(target) in labels:
            index = np.full(n, labels.index(str(target)))
        else:
            raise ValueError(f"target {target!r} is not one of the {'labels' if multilabel else 'classes'} {labels}")
        if multilabel:
            return ExplainTarget(lambda o: o, index, labels, "logit of a label (multilabel; column 'target' says which)")
        return ExplainTarget(lambda o: torch.log_softmax(o, dim=1), index, labels,
                             "log-probability of a class (multiclass; column 'target' says which)")

    # a task registered outside mmclin: its raw outputs
    k = task.output_dim
    if target is None and k > 1:
        raise ValueError(f"task {name!r} has {k} outputs; pass target=<column index> to say which to explain")
    col = 0 if target is None else int(target)
    if not 0 <= col < k:
        raise ValueError(f"target column {col} is out of range for task {name!r} with {k} outputs")
    return ExplainTarget(lambda o: o, np.full(n, col), [f"output_{j}" for j in range(k)], f"raw output {col} ({name})")


def _check_horizon(horizon: Any, times: np.ndarray) -> float:
    try:
        t = float(horizon)
    except (TypeError, ValueError):
        raise ValueError(f"'horizon' must be a time (a number > 0, in the units of the training times); got {horizon!r}") from None
    if not np.isfinite(t) or t <= 0:
        raise ValueError(f"'horizon' must be a time > 0 (in the units of the training times, here up to {float(np.max(times)):g}); got {horizon!r}")
    return t
