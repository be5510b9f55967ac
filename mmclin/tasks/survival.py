"""Survival tasks: ``cox`` (proportional hazards) and ``discrete_time`` (logistic hazard).

Targets follow scikit-survival: a structured array whose first field is the event indicator
(bool) and second the time (float), e.g. ``sksurv.util.Surv.from_arrays(event, time)``; a
dict ``{"event": ..., "time": ...}``, a tuple ``(event, time)`` or a two-column DataFrame
(event first) are accepted too. Metrics come from ``sksurv.metrics``.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import expit
from sksurv.metrics import (
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)
from torch import Tensor

from mmclin.registry import TASKS
from mmclin.tasks.base import (
    MIN_EVENTS,
    MIN_SUBJECTS,
    ExtrapolationWarning,
    Metrics,
    Task,
    is_missing,
    safe_metric,
    shown,
)

SURVIVAL_DTYPE = np.dtype([("event", bool), ("time", np.float64)])


# --- targets -------------------------------------------------------------------------------
class TargetTypeError(TypeError, ValueError):
    """Survival targets of a type mmclin does not read (a TypeError, and a user's error to fix: a ValueError)."""


def split_event_time(y: Any) -> tuple[np.ndarray, np.ndarray]:
    """The raw ``(event, time)`` columns of any accepted survival target form (unvalidated)."""
    if isinstance(y, np.ndarray) and y.dtype.names is not None:
        if len(y.dtype.names) != 2:
            raise ValueError(
                f"survival targets need exactly two fields (event, time); got fields {list(y.dtype.names)}."
            )
        return np.asarray(y[y.dtype.names[0]]), np.asarray(y[y.dtype.names[1]])
    if isinstance(y, dict):
        if "event" in y and "time" in y:
            return np.asarray(y["event"]), np.asarray(y["time"])
        if len(y) == 2:
            first, second = y.values()
            return np.asarray(first), np.asarray(second)
        raise ValueError(f"survival targets as a dict need keys 'event' and 'time'; got keys {list(y)}.")
    if isinstance(y, tuple) and len(y) == 2:
        return np.asarray(y[0]), np.asarray(y[1])
    if hasattr(y, "columns") and len(y.columns) == 2:  # pandas / polars DataFrame, event first
        return tuple(np.asarray(y[c].to_numpy()) for c in y.columns)  # type: ignore[return-value]
    if isinstance(y, np.ndarray):
        raise ValueError(
            f"survival y is a plain array of shape {y.shape}; which of its columns is the event and which the time "
            "cannot be told from it: give a structured array (event, time), e.g. "
            "sksurv.util.Surv.from_arrays(event=y[:, 0], time=y[:, 1]), or a dict {'event': ..., 'time': ...}."
        )
    raise TargetTypeError(
        "survival targets must be a structured array (event, time) such as "
        "sksurv.util.Surv.from_arrays(event, time), a dict {'event': ..., 'time': ...} or a tuple "
        f"(event, time); got {type(y).__name__}."
    )


def _distinct(values: np.ndarray) -> set[float] | None:
    """The distinct numbers of ``values`` (booleans as 0/1, missing values aside); None when they are not numbers."""
    if values.dtype == bool:
        return {float(v) for v in np.unique(values)}
    if values.dtype.kind not in "iuf":
        return None
    v = values.astype(float)
    return set(np.unique(v[~np.isnan(v)]).tolist())


def _swapped(event: np.ndarray, time: np.ndarray) -> bool:
    """``(time, event)`` given for ``(event, time)``: the time holds 0s and 1s (both), the event many values."""
    t, e = _distinct(time), _distinct(event)
    return t == {0.0, 1.0} and e is not None and len(e) > 2


def to_survival_array(y: Any, require_event: bool = False) -> np.ndarray:
    """Validate survival targets and return them as a structured ``(event, time)`` array.

    Raises ValueError naming the first bad row: lengths differ, a time is not finite or not
    > 0, an event is not 0/1 or bool, or (``require_event``) every sample is censored.
    """
    event, time = split_event_time(y)
    event, time = event.reshape(-1) if event.ndim > 1 else event, time.reshape(-1) if time.ndim > 1 else time
    if len(event) != len(time):
        raise ValueError(f"'event' has {len(event)} samples but 'time' has {len(time)}.")
    if _swapped(event, time):
        first = next((v for v in event.tolist() if not is_missing(v)), None)
        raise ValueError(f"survival targets are (event, time), the event first, but the first holds times (e.g. "
                         f"{shown(first)!r}) and the second 0/1 events: swap them.")
    t = np.array([np.nan if is_missing(v) else v for v in time], dtype=object) if time.dtype == object else time
    try:
        t = t.astype(np.float64)
    except (TypeError, ValueError):
        bad_t = next(i for i, v in enumerate(t) if not isinstance(v, (int, float, np.number)))
        raise ValueError(f"'time' must be a finite number > 0; row {bad_t} has {shown(time[bad_t])!r}.") from None
    bad = ~(np.isfinite(t) & (t > 0))
    if bad.any():
        i = int(np.argmax(bad))
        hint = " (events on the day of inclusion: add a small offset such as 0.5 day)" if t[i] == 0 else ""
        raise ValueError(f"'time' must be finite and > 0; row {i} has {float(t[i])}{hint}.")
    if event.dtype == bool:
        e = event
    else:
        if event.dtype.kind in "iuf":
            ok = np.isin(event, [0, 1])
        else:
            ok = np.array([isinstance(v, (bool, int, float, np.number)) and not is_missing(v) and v in (0, 1)
                           for v in event.tolist()], dtype=bool)
        if not ok.all():
            i = int(np.argmax(~ok))
            hint = ""
            if event.dtype.kind in "iuf" and set(np.unique(event[~np.isnan(event.astype(float))])) == {1, 2}:
                hint = (" All events are 1 or 2: R's survival coding (1 = censored, 2 = event)? Then give "
                        "event == 2 as the event (e.g. pl.col('event') == 2).")
            raise ValueError(f"'event' must be 0/1 or bool; row {i} has {shown(event[i])!r}.{hint}")
        e = event.astype(np.float64) == 1
    if require_event and not e.any():
        raise ValueError(
            f"survival targets have no event (all {len(e)} samples are censored); "
            "at least one event is needed."
        )
    out = np.empty(len(e), dtype=SURVIVAL_DTYPE)
    out["event"], out["time"] = e, t
    return out


# --- losses --------------------------------------------------------------------------------
def cox_partial_nll(log_risk: Tensor, event: Tensor, time: Tensor, ties: str = "efron") -> Tensor:
    """Negative Cox partial log-likelihood, averaged over events, with Efron's or Breslow's ties.

    Breslow: ``-1/d sum_{i: e_i = 1} [eta_i - log sum_{j: t_j >= t_i} exp(eta_j)]``.
    Efron (the default of R's ``survival::coxph``; scikit-survival's ``ties="efron"``): at a time
    with ``m`` tied events ``D``, the ``l``-th of them (``l = 0..m-1``) has the risk set sum
    ``sum_{t_j >= t} exp(eta_j) - l/m sum_{k in D} exp(eta_k)``. Without ties both are the same.
    Risk sets are taken within the batch. A batch without events gives 0, still attached to the graph.

    Shapes:
        log_risk ``[B]``, event ``[B]`` (0/1), time ``[B]`` (kept in its own dtype, float64 from the
        tasks, so that distinct day-level times over decades stay distinct) -> scalar.
    """
    if ties not in ("efron", "breslow"):
        raise ValueError(f"ties must be 'efron' or 'breslow', got {ties!r}")
    order = torch.argsort(time, descending=True)
    t, eta, e = time[order], log_risk[order], event[order].to(log_risk.dtype)
    ascending = t.flip(0).contiguous()
    # the risk set of a tied time holds the whole tie group: positions 0 .. (#{t_j >= t_i}) - 1 in descending order
    n_at_risk = t.numel() - torch.searchsorted(ascending, t, right=False)
    if ties == "breslow":
        log_risk_set = torch.logcumsumexp(eta, dim=0)[n_at_risk - 1]
    else:
        shift = eta.max().detach()  # log(sum exp(eta - c)) + c is exact for any constant c; c keeps exp finite
        w = torch.exp(eta - shift)
        risk_sum = torch.cumsum(w, 0)[n_at_risk - 1]
        first = t.numel() - torch.searchsorted(ascending, t, right=True)  # first position of each tie group
        tied_w = torch.cumsum(w * e, 0)
        tied_n = torch.cumsum(e, 0)
        before_w = torch.where(first > 0, tied_w[(first - 1).clamp_min(0)], torch.zeros_like(tied_w))
        before_n = torch.where(first > 0, tied_n[(first - 1).clamp_min(0)], torch.zeros_like(tied_n))
        group_w = tied_w[n_at_risk - 1] - before_w  # sum of exp(eta) over the tie group's events
        group_n = (tied_n[n_at_risk - 1] - before_n).clamp_min(1.0)
        rank = (tied_n - before_n - 1.0).clamp_min(0.0)  # l of each event within its group
        log_risk_set = torch.log((risk_sum - rank / group_n * group_w).clamp_min(torch.finfo(w.dtype).tiny)) + shift
    # no events: the sum is an exact 0 that keeps the graph connected (clamp avoids 0/0)
    return -((eta - log_risk_set) * e).sum() / e.sum().clamp_min(1.0)


def logistic_hazard_nll(logits: Tensor, interval: Tensor, event: Tensor) -> Tensor:
    """Negative log-likelihood of the discrete-time logistic hazard model, mean over samples.

    ``h_k = sigmoid(logits_k)``. A sample with ``interval = j`` survived intervals ``k < j``;
    with ``event = 1`` it had its event in interval ``j`` (Gensheimer & Narasimhan 2019;
    PyCox ``LogisticHazard``). ``interval = n_bins`` means it survived every interval.

    ``-[sum_{k < j} log(1 - h_k) + event * log h_j]``

    Shapes:
        logits ``[B, n_bins]``, interval ``[B]`` (0..n_bins), event ``[B]`` (0/1) -> scalar.
    """
    n_bins = logits.shape[1]
    interval = interval.long()
    survived = torch.arange(n_bins, device=logits.device)[None, :] < interval[:, None]
    ll = (F.logsigmoid(-logits) * survived).sum(dim=1)
    at = interval.clamp(max=n_bins - 1)[:, None]
    ll = ll + event.to(logits.dtype) * F.logsigmoid(logits.gather(1, at)).squeeze(1)
    return -ll.mean()


# --- metrics -------------------------------------------------------------------------------
def _time_grid(test_time: np.ndarray, ref_time: np.ndarray, n: int = 9) -> np.ndarray:
    """Evaluation times for time-dependent metrics: percentiles 10..90 of the test times that
    lie inside both the test follow-up ``[min, max)`` and the reference (training) range."""
    lo, hi = max(test_time.min(), ref_time.min()), min(test_time.max(), ref_time.max())
    grid = np.unique(np.percentile(test_time, np.linspace(10, 90, n)))
    return grid[(grid >= lo) & (grid < hi)]


def _clip_to_reference(y: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Censor test rows followed beyond the reference's last time at that time.

    The IPCW weights come from the reference's censoring distribution, which sksurv cannot
    evaluate past its last time; every metric here only uses times before it, where such a
    row is "still at risk" either way, so the metric values are unchanged.
    """
    out, last = y.copy(), ref["time"].max()
    beyond = out["time"] > last
    out["time"][beyond], out["event"][beyond] = last, False
    return out


class _SurvivalTask(Task):
    """Shared targets, metrics and examples of the survival tasks."""

    problem = "survival"
    primary_metric = "c_index"

    METRICS = ("c_index", "uno_c", "integrated_brier", "mean_auc")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.fitted_ = False
        self.follow_up_: tuple[float, float] | None = None  # (first, last) time of the training targets

    def check_targets(self, y: Any) -> np.ndarray:
        return to_survival_array(y)

    def _learn_follow_up(self, s: np.ndarray) -> None:
        self.follow_up_ = (float(s["time"].min()), float(s["time"].max()))

    def follow_up_end(self) -> float | None:
        """The last time of the training follow-up (None before ``fit_targets``)."""
        return None if self.follow_up_ is None else self.follow_up_[1]

    def _warn_outside_follow_up(self, times: np.ndarray) -> None:
        """Refuse times that are not finite; say when a survival curve is asked at negative times or after the
        training follow-up."""
        t = np.asarray(times, dtype=np.float64).reshape(-1)
        bad = np.flatnonzero(~np.isfinite(t))
        if len(bad):
            raise ValueError(f"survival function asked at {len(bad)} time(s) that are not finite (the first {t[bad[0]]} "
                             f"at position {int(bad[0])}); times must be finite numbers")
        negative = t[t < 0]
        if negative.size:
            warnings.warn(f"survival function asked at {negative.size} negative time(s) (the first {negative[0]:g}): "
                          "time starts at 0 (inclusion), where S(t) = 1; nothing is estimated before it",
                          ExtrapolationWarning, stacklevel=3)
        last = self.follow_up_end()
        if last is not None:
            beyond = t[t > last]
            if beyond.size:
                warnings.warn(f"survival function asked at {beyond.size} time(s) after the training follow-up (up to "
                              f"{beyond.max():g}; the follow-up window is [0, {last:g}]): it extrapolates, holding "
                              f"S(t) at its value at {last:g}", ExtrapolationWarning, stacklevel=3)

    def missing_rows(self, y: Any) -> np.ndarray:
        event, time = split_event_time(y)
        return self.missing_mask(event) | self.missing_mask(time)

    @property
    def target_width(self) -> int:
        return 2

    def survival_function(self, outputs: np.ndarray, times: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def metrics(self, y_true: Any, outputs: np.ndarray, y_train: Any = None) -> dict[str, float]:
        """``c_index`` (Harrell), ``uno_c`` (IPCW, truncated at the 90th percentile of test times
        inside both follow-ups), ``integrated_brier`` and ``mean_auc`` (cumulative/dynamic)
        on a grid of test-time percentiles inside both follow-ups.

        The IPCW metrics estimate the censoring distribution on ``y_train``; without it they
        fall back to ``y_true`` itself (optimistic on small test sets). A metric that cannot be
        computed for this split (all censored, no valid time grid, ``cox`` not calibrated for
        the Brier score) is NaN.

        More than 10% of the test times after the training follow-up are said with an
        ``ExtrapolationWarning`` (the time-dependent metrics then use times up to its end only). Support: see :meth:`undefined_metrics`.
        """
        y = self.check_targets(y_true)
        ref = y if y_train is None else self.check_targets(y_train)
        last = float(ref["time"].max())
        beyond = int((y["time"] > last).sum()) if y_train is not None else 0
        # said when it changes the metrics: the grid runs to the 90th percentile of the test times, so with more than
        # 10% of them after the training's last time its top is cut there
        if beyond > 0.1 * len(y):
            warnings.warn(f"{beyond} of {len(y)} test subject(s) have times beyond the training follow-up (its last "
                          f"time is {last:g}, the test's {float(y['time'].max()):g}): uno_c, integrated_brier and "
                          f"mean_auc use times up to {last:g} only", ExtrapolationWarning, stacklevel=2)
        risk = self.predict(outputs)
        out = Metrics(c_index=safe_metric(lambda: concordance_index_censored(y["event"], y["time"], risk)[0]))
        if len(y) < 2 or not y["event"].any():
            return Metrics({**out, "uno_c": math.nan, "integrated_brier": math.nan, "mean_auc": math.nan})
        yc = _clip_to_reference(y, ref)
        grid = _time_grid(yc["time"], ref["time"])
        # truncate Uno's C at the 90th percentile of test times (the grid's top): near the end of
        # follow-up the censoring survival is tiny and one late event's IPCW weight dominates
        tau = float(grid[-1]) if len(grid) else float(min(y["time"].max(), ref["time"].max()))
        out["uno_c"] = safe_metric(lambda: concordance_index_ipcw(ref, yc, risk, tau=tau)[0])
        try:
            _, surv = self.survival_function(outputs, grid)
        except RuntimeError:  # e.g. cox before calibrate(): no survival curve yet
            surv = None
        enough = len(grid) >= 2
        out["integrated_brier"] = (
            safe_metric(lambda: integrated_brier_score(ref, yc, surv, grid)) if enough and surv is not None else math.nan
        )
        # time-dependent risk 1 - S(t) where a curve exists (discrete time), else the risk score
        auc_risk = 1.0 - surv if surv is not None else risk
        out["mean_auc"] = safe_metric(lambda: cumulative_dynamic_auc(ref, yc, auc_risk, grid)[1]) if enough else math.nan
        if not enough:
            out.mark_undefined(["uno_c", "integrated_brier", "mean_auc"] if not len(grid) else ["integrated_brier", "mean_auc"],
                               f"{len(grid)} evaluation time(s) inside both the test follow-up and the training "
                               f"follow-up (up to {last:g}); at least 2 are needed")
        return out

    def undefined_metrics(self, y_true: Any) -> dict[str, str]:
        """Every survival metric needs ``MIN_EVENTS`` (10) events and ``MIN_SUBJECTS`` (10) subjects scored."""
        y = self.check_targets(y_true)
        n_events = int(y["event"].sum())
        if n_events >= MIN_EVENTS and len(y) >= MIN_SUBJECTS:
            return {}
        return dict.fromkeys(self.METRICS, f"{n_events} event(s) among {len(y)} subject(s); survival metrics need "
                                           f"at least {MIN_EVENTS} events and {MIN_SUBJECTS} subjects")

    def score(self, y_true: Any, outputs: np.ndarray) -> float:
        """Harrell's concordance index (scikit-survival's ``score``)."""
        y = self.check_targets(y_true)
        return safe_metric(lambda: concordance_index_censored(y["event"], y["time"], self.predict(outputs))[0])

    @classmethod
    def example_targets(cls, n: int, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = np.empty(n, dtype=SURVIVAL_DTYPE)
        out["time"] = rng.exponential(10.0, n) + 0.1
        out["event"] = rng.random(n) < 0.7
        out["event"][0] = True
        return out

    @classmethod
    def example_censored_targets(cls, n: int, seed: int = 0) -> np.ndarray:
        out = cls.example_targets(n, seed)
        out["event"] = False
        return out


@TASKS.register("cox")
class CoxTask(_SurvivalTask):
    """Cox proportional hazards: one output, the log-risk ``eta``.

    Loss: negative partial log-likelihood (:func:`cox_partial_nll`) with Efron's ties by default
    (``ties="breslow"`` for Breslow's; the same where no times are tied), risk sets within each batch. ``calibrate(outputs_train, y_train)`` fits the Breslow
    baseline cumulative hazard ``H0``, after which
    ``survival_function`` gives ``S(t | x) = exp(-H0(t) exp(eta))``.

    Options: ``ties`` (``"efron"`` or ``"breslow"``). ``predict`` -> risk scores ``eta`` ``[N]`` (higher = worse).
    """

    option_defaults = {"ties": "efron"}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.ties = self.options["ties"]
        if self.ties not in ("efron", "breslow"):
            raise ValueError(f"The 'ties' option of the cox task must be 'efron' or 'breslow'. Got {self.ties!r} instead.")
        self.baseline_times_: np.ndarray | None = None
        self.baseline_cumhaz_: np.ndarray | None = None

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size < 2:
            raise ValueError(f"trainer.batch_size {batch_size} (batch_size of the estimators) is too small for the cox "
                             "task: its partial likelihood compares each subject with the others of its batch, and a "
                             "batch of one has none (its loss is 0: nothing would be learned); use at least 2 (the "
                             "default is 64)")

    def fit_targets(self, y: Any) -> "CoxTask":
        self._learn_follow_up(to_survival_array(y, require_event=True))  # fail early on bad targets
        self.fitted_ = True
        return self

    @property
    def output_dim(self) -> int:
        return 1

    def encode(self, y: Any) -> Tensor:
        """Shapes: returns float64 ``[N, 2]`` = (event, time); float32 would merge distinct times (ties)."""
        s = self.check_targets(y)
        return torch.as_tensor(np.stack([s["event"], s["time"]], axis=1), dtype=torch.float64)

    def loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Shapes: outputs ``[B, 1]``, target ``[B, 2]`` (event, time) -> scalar."""
        return cox_partial_nll(outputs.reshape(-1), target[:, 0], target[:, 1], self.ties)

    def fit_linear(self, X: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Near-ridge elastic-net Cox (``l1_ratio`` 0.05, the penalty chosen by inner-CV partial likelihood as
        R's ``cv.glmnet`` does): its log-risk coefficients; no intercept (the Breslow baseline hazard absorbs
        it). On GSE7390 (3 x 5 folds, the linear model alone) this choice gave C 0.668 against 0.624 for the
        ``coxnet`` baseline's (``l1_ratio`` 0.5, penalty by C), whose choice swung between folds (0.35-0.73)."""
        from mmclin.tasks.linear_models import CoxnetCV, quiet_solvers

        y = np.empty(len(target), dtype=[("event", bool), ("time", np.float64)])
        y["event"], y["time"] = target[:, 0].astype(bool), target[:, 1]
        with quiet_solvers():
            model = CoxnetCV(l1_ratio=0.05, scoring="deviance", seed=0).fit(X, y)
        return model.calibrated_coef_.reshape(1, -1), np.zeros(1)

    def calibrate(self, outputs: np.ndarray, y: Any) -> None:
        """Fit the Breslow baseline cumulative hazard on training outputs and targets."""
        from sksurv.linear_model.coxph import BreslowEstimator

        s = to_survival_array(y, require_event=True)
        est = BreslowEstimator().fit(self.predict(outputs), s["event"], s["time"])
        self.baseline_times_ = np.asarray(est.cum_baseline_hazard_.x, dtype=np.float64)
        self.baseline_cumhaz_ = np.asarray(est.cum_baseline_hazard_.y, dtype=np.float64)

    def predict(self, outputs: np.ndarray) -> np.ndarray:
        return self.as_numpy(outputs).reshape(-1).astype(np.float64)

    def survival_function(self, outputs: np.ndarray, times: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``S(t | x)`` at ``times`` (default: the baseline's time points).

        ``H0`` is a right-continuous step function, 0 before the first training time and
        constant after the last one.

        Shapes:
            outputs ``[N, 1]`` -> (times ``[T]``, S ``[N, T]``).
        """
        if self.baseline_cumhaz_ is None or self.baseline_times_ is None:
            raise RuntimeError(
                "The 'cox' task has no baseline hazard yet; call task.calibrate(outputs_train, y_train) "
                "after training."
            )
        if times is not None:
            self._warn_outside_follow_up(times)
        times = self.baseline_times_ if times is None else np.asarray(times, dtype=np.float64).reshape(-1)
        k = np.searchsorted(self.baseline_times_, times, side="right") - 1
        h0 = np.where(k >= 0, self.baseline_cumhaz_[np.clip(k, 0, None)], 0.0)
        # clip eta so that 0 * exp(eta) never becomes 0 * inf = NaN before the first time
        hazard_ratio = np.exp(np.clip(self.predict(outputs), -500.0, 500.0))
        return times, np.exp(-hazard_ratio[:, None] * h0[None, :])

    def state_dict(self) -> dict[str, Any]:
        as_list = lambda a: None if a is None else a.tolist()  # noqa: E731
        return {"fitted": self.fitted_, "baseline_times": as_list(self.baseline_times_),
                "baseline_cumhaz": as_list(self.baseline_cumhaz_),
                "follow_up": None if self.follow_up_ is None else list(self.follow_up_)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        as_array = lambda v: None if v is None else np.asarray(v, dtype=np.float64)  # noqa: E731
        self.fitted_ = bool(state.get("fitted", False))
        self.baseline_times_ = as_array(state.get("baseline_times"))
        self.baseline_cumhaz_ = as_array(state.get("baseline_cumhaz"))
        follow_up = state.get("follow_up")
        self.follow_up_ = None if follow_up is None else (float(follow_up[0]), float(follow_up[1]))

    def follow_up_end(self) -> float | None:
        """The last training time; for a model saved before it was recorded, the baseline hazard's last time."""
        if self.follow_up_ is None and self.baseline_times_ is not None and len(self.baseline_times_):
            return float(self.baseline_times_[-1])
        return super().follow_up_end()


@TASKS.register("discrete_time")
class DiscreteTimeTask(_SurvivalTask):
    """Discrete-time survival with a logistic hazard per interval (nnet-survival / PyCox
    ``LogisticHazard``): ``n_bins`` logits ``h``, one per time interval.

    Intervals ``(edges_[k-1], edges_[k]]`` (``edges_[-1] = 0``) have as right ends the
    ``1/n_bins, 2/n_bins, ..., 1`` quantiles of the *event* times in the training targets
    (duplicate quantiles are merged, so ``output_dim`` may be below ``n_bins``). An event
    falls in the interval holding its time; a censored sample is credited with the intervals
    it survived, counting its last interval when it was followed past its midpoint (the
    actuarial half-interval convention of Gensheimer & Narasimhan). Times after the last
    edge count as censored there.

    Options:
        n_bins (int, default 10).

    ``survival_function`` -> ``S(edges_k) = prod_{j <= k} (1 - sigmoid(h_j))``, a step
    function. ``predict`` -> risk = minus the restricted mean survival time up to the last
    edge (the area under that step function), so higher = worse.
    """

    option_defaults = {"n_bins": 10}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        n_bins = self.options["n_bins"]
        if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
            raise ValueError(f"The 'n_bins' parameter of the discrete_time task must be an int >= 1. Got {n_bins!r} instead.")
        self.edges_: np.ndarray | None = None

    def fit_targets(self, y: Any) -> "DiscreteTimeTask":
        s = to_survival_array(y, require_event=True)
        q = np.linspace(0.0, 1.0, int(self.options["n_bins"]) + 1)[1:]
        self.edges_ = np.unique(np.quantile(s["time"][s["event"]], q))
        self._learn_follow_up(s)
        self.fitted_ = True
        return self

    @property
    def output_dim(self) -> int:
        self._require_fitted("edges_")
        assert self.edges_ is not None
        return len(self.edges_)

    def intervals(self, y: Any) -> tuple[np.ndarray, np.ndarray]:
        """(interval index 0..n_bins, event 0/1) per row; see the class docstring."""
        self._require_fitted("edges_")
        assert self.edges_ is not None
        s = self.check_targets(y)
        t, e, edges = s["time"], s["event"].copy(), self.edges_
        e[t > edges[-1]] = False  # after the last edge: censored there
        j = np.searchsorted(edges, t, side="left")  # events: the interval (edges[j-1], edges[j]] holding t
        full = np.searchsorted(edges, t, side="right")  # censored: intervals survived to their end
        mid = (np.r_[0.0, edges[:-1]] + edges) / 2
        half = (full < len(edges)) & (t >= mid[np.minimum(full, len(edges) - 1)])
        survived = full + half
        return np.where(e, j, survived), e.astype(np.int64)

    def encode(self, y: Any) -> Tensor:
        """Shapes: returns float ``[N, 2]`` = (interval index, event)."""
        j, e = self.intervals(y)
        return torch.as_tensor(np.stack([j, e], axis=1), dtype=torch.float32)

    def loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Shapes: outputs ``[B, n_bins]``, target ``[B, 2]`` (interval, event) -> scalar."""
        return logistic_hazard_nll(outputs, target[:, 0], target[:, 1])

    def survival_function(self, outputs: np.ndarray, times: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Step-function ``S(t | x)``: 1 before the first edge, ``S(edges_k)`` on ``[edges_k, edges_{k+1})``.

        Shapes:
            outputs ``[N, n_bins]`` -> (times ``[T]`` (default ``edges_``), S ``[N, T]``).
        """
        self._require_fitted("edges_")
        assert self.edges_ is not None
        s_edges = np.cumprod(1.0 - expit(self.as_numpy(outputs).astype(np.float64)), axis=1)
        if times is None:
            return self.edges_.copy(), s_edges
        self._warn_outside_follow_up(times)
        times = np.asarray(times, dtype=np.float64).reshape(-1)
        k = np.searchsorted(self.edges_, times, side="right")
        s = np.concatenate([np.ones((len(s_edges), 1)), s_edges], axis=1)
        return times, s[:, k]

    def predict(self, outputs: np.ndarray) -> np.ndarray:
        """Risk = -RMST up to the last edge. Shapes: ``[N, n_bins]`` -> ``[N]``."""
        _, s_edges = self.survival_function(outputs)
        assert self.edges_ is not None
        widths = np.diff(np.r_[0.0, self.edges_])
        s_start = np.concatenate([np.ones((len(s_edges), 1)), s_edges[:, :-1]], axis=1)  # S on each interval
        return -(s_start * widths).sum(axis=1)

    def state_dict(self) -> dict[str, Any]:
        return {"edges": None if self.edges_ is None else self.edges_.tolist(),
                "follow_up": None if self.follow_up_ is None else list(self.follow_up_)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.edges_ = None if state.get("edges") is None else np.asarray(state["edges"], dtype=np.float64)
        self.fitted_ = self.edges_ is not None
        follow_up = state.get("follow_up")
        self.follow_up_ = None if follow_up is None else (float(follow_up[0]), float(follow_up[1]))

    def follow_up_end(self) -> float | None:
        """The last training time; for a model saved before it was recorded, the last interval's end."""
        if self.follow_up_ is None and self.edges_ is not None and len(self.edges_):
            return float(self.edges_[-1])
        return super().follow_up_end()
