"""Missing-modality robustness report for any fitted model (every fusion head).

Two views of the same held-out subjects:

* **Subsets**: the metrics when only a subset ``S`` of the modalities is given (the others
  hidden for everyone), for every non-empty subset (``2^M - 1``; when that exceeds
  ``max_subsets``, the full set, each single modality, each leave-one-out and a seeded sample
  of the rest). Subjects left with no modality are not scored (``n_subjects`` says how many
  were).
* **Missingness shift**: extra test-time missingness on top of what is observed. For each
  modality (and for all at once) a ``fraction`` of the subjects who have it lose it, chosen by
  weighted sampling without replacement with weights ``exp(tilt * driver)``, where the driver
  is ``0`` (``mcar``), the model's own prediction from the *other* modalities (``mar``: depends
  on observed data only) or the true outcome (``mnar``: sicker subjects lose it more often;
  survival: early events first). A subject never loses its last modality. Repeated
  ``n_repeats`` times with different draws.

``missing_report`` returns a :class:`MissingReport` (polars tables, ``summary()``, ``plot()``,
``log_to_mlflow()``); ``mmclin evaluate CONFIG --missing-report`` and the estimators'
``missing_report(X, y)`` drive it.
"""
from __future__ import annotations

import itertools
import math
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import polars as pl

MECHANISMS = ("mcar", "mar", "mnar")
OBSERVED = "none"  # shift table: the test set as observed, nothing extra hidden
ALL = "(all)"  # shift table: every modality hidden at the same time (each with its own draw)


# --- subsets ---------------------------------------------------------------------------------
def modality_subsets(modalities: Sequence[str], max_subsets: int = 64, seed: int = 0) -> list[tuple[str, ...]]:
    """Non-empty subsets of ``modalities`` (sorted names), largest first.

    All ``2^M - 1`` when that is at most ``max_subsets``; otherwise the full set, each single
    modality, each leave-one-out, then a seeded random sample of the others up to ``max_subsets``.

        >>> modality_subsets(["b", "a"])
        [('a', 'b'), ('a',), ('b',)]
    """
    names = sorted(modalities)
    m = len(names)
    if m == 0:
        raise ValueError("a missing-modality report needs at least one modality")
    if max_subsets < 1:
        raise ValueError(f"max_subsets must be >= 1, got {max_subsets}")
    if m < 63 and 2**m - 1 <= max_subsets:
        chosen = [c for k in range(m, 0, -1) for c in itertools.combinations(names, k)]
    else:
        must = [tuple(names)] + [(n,) for n in names] + [tuple(x for x in names if x != n) for n in names if m > 2]
        chosen = list(dict.fromkeys(must))[:max_subsets]
        seen = set(chosen)
        rng = np.random.default_rng(seed)
        attempts = 0
        while len(chosen) < max_subsets and attempts < 100 * max_subsets:
            attempts += 1
            bits = rng.random(m) < 0.5
            sub = tuple(n for n, b in zip(names, bits) if b)
            if sub and sub not in seen:
                seen.add(sub)
                chosen.append(sub)
    return sorted(chosen, key=lambda s: (-len(s), s))


# --- drivers of the shift --------------------------------------------------------------------
def _standardise(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    v = np.where(np.isfinite(v), v, np.nan)
    if np.isnan(v).all():
        return np.zeros_like(v)
    v = np.where(np.isnan(v), np.nanmean(v), v)
    sd = v.std()
    return (v - v.mean()) / sd if sd > 0 else np.zeros_like(v)


def prediction_score(task: Any, outputs: np.ndarray) -> np.ndarray:
    """One number per subject that orders the predictions: risk (survival), the prediction
    (regression), P(positive) (binary), the expected class index (multiclass), the expected
    number of labels (multilabel); a multitask uses its first sub-task.

    Shapes:
        outputs ``[N, task.output_dim]`` -> ``[N]``.
    """
    if task.problem == "multitask":
        _, sub, o_sl, _ = next(task.layout())
        return prediction_score(sub, np.asarray(outputs)[:, o_sl])
    if task.problem in ("survival", "regression"):
        return np.asarray(task.predict(outputs), dtype=float).reshape(-1)
    proba = np.asarray(task.predict_proba(outputs), dtype=float)
    if task.problem == "multilabel":
        return proba.sum(1)
    return proba @ np.arange(proba.shape[1])


def outcome_driver(task: Any, y: Any) -> np.ndarray:
    """How "sick" each subject truly is, for MNAR missingness: survival ``event - rank(time)``
    (early events highest, late censored lowest); otherwise the task's encoded target (class
    index, standardised value, number of positive labels); a multitask uses its first
    sub-task (unlabelled rows get the mean). Standardised.

    Shapes:
        returns ``[N]``.
    """
    if task.problem == "multitask":
        key, sub, _, _ = next(task.layout())
        y_sub = task.check_targets(y)[key]
        miss = sub.missing_rows(y_sub)
        out = np.full(len(miss), np.nan)
        if (~miss).any():
            out[~miss] = outcome_driver(sub, task.take_rows(y_sub, ~miss))
        return _standardise(out)
    if task.problem == "survival":
        from mmclin.tasks.survival import to_survival_array

        arr = to_survival_array(y)
        ranks = (np.argsort(np.argsort(arr["time"], kind="stable"), kind="stable") + 0.5) / len(arr)
        return _standardise(arr["event"].astype(float) - ranks)
    enc = task.encode(y).detach().cpu().numpy().reshape(task.n_rows(y), -1)
    return _standardise(enc.sum(1) if task.problem == "multilabel" else enc[:, 0])


def _weighted_pick(candidates: np.ndarray, k: int, driver: np.ndarray, tilt: float, rng: np.random.Generator) -> np.ndarray:
    """``k`` of ``candidates`` without replacement, weights ``exp(tilt * driver)`` (Gumbel top-k)."""
    if k <= 0 or len(candidates) == 0:
        return np.zeros(0, dtype=int)
    keys = tilt * driver[candidates] + rng.gumbel(size=len(candidates))
    return candidates[np.argsort(-keys, kind="stable")[:k]]


# --- the report ------------------------------------------------------------------------------
@dataclass
class MissingReport:
    """Tables of a missing-modality report (see the module docstring).

    ``subsets``: one row per (fold, subset): ``fold, subset, n_modalities``, one bool column per
    modality (given or hidden), ``n_subjects``, then the task's metrics.
    ``shift``: one row per (fold, mechanism, hidden, repeat): ``mechanism`` (``none`` = as
    observed, ``mcar``, ``mar``, ``mnar``), ``hidden`` (a modality or ``(all)``), ``fraction``,
    ``n_hidden`` (modality cells hidden), ``n_subjects``, then the metrics.
    """

    subsets: pl.DataFrame
    shift: pl.DataFrame
    modalities: list[str]
    primary_metric: str
    greater_is_better: bool = True

    @property
    def metric_names(self) -> list[str]:
        fixed = {"fold", "subset", "n_modalities", "n_subjects", *self.modalities}
        return [c for c in self.subsets.columns if c not in fixed]

    @classmethod
    def concat(cls, reports: Sequence["MissingReport"]) -> "MissingReport":
        """Reports of several folds as one (``fold`` numbered 0, 1, ... in the given order)."""
        if not reports:
            raise ValueError("no reports to combine")
        first = reports[0]
        subsets = pl.concat([r.subsets.with_columns(pl.lit(k, pl.Int32).alias("fold")) for k, r in enumerate(reports)], how="diagonal_relaxed")
        shift = pl.concat([r.shift.with_columns(pl.lit(k, pl.Int32).alias("fold")) for k, r in enumerate(reports)], how="diagonal_relaxed")
        return cls(subsets, shift, first.modalities, first.primary_metric, first.greater_is_better)

    def summary(self) -> dict[str, pl.DataFrame]:
        """Mean and standard deviation over folds (subsets) and over folds x repeats (shift):
        ``{"subsets": ..., "shift": ...}`` with columns ``<metric>`` (mean) and ``<metric>_std``."""
        metrics = self.metric_names
        aggs = [e for m in metrics for e in (pl.col(m).mean().alias(m), pl.col(m).std(ddof=1).alias(f"{m}_std"))]
        keys = ["subset", "n_modalities", *self.modalities]
        subsets = (self.subsets.group_by(keys, maintain_order=True)
                   .agg(pl.col("fold").n_unique().alias("n_folds"), pl.col("n_subjects").mean(), *aggs))
        mech_order = {m: i for i, m in enumerate((OBSERVED, *MECHANISMS))}
        hid_order = {m: i for i, m in enumerate(["", *self.modalities, ALL])}
        shift = (self.shift.group_by(["mechanism", "hidden", "fraction"], maintain_order=True)
                 .agg(pl.len().alias("n_draws"), pl.col("n_hidden").mean(), pl.col("n_subjects").mean(), *aggs)
                 .sort(pl.col("mechanism").replace_strict(mech_order, default=99),
                       pl.col("hidden").replace_strict(hid_order, default=99)))
        return {"subsets": subsets, "shift": shift}

    def plot(self, path: str | Path | None = None) -> Any:
        """A matplotlib ``Figure``: the primary metric per subset (left) and per shift scenario
        (right), mean with standard-deviation bars; written to ``path`` (PNG, SVG, PDF) if given.

        For a metric with a chance level (C-index, AUROC: 0.5; :func:`chance_level`) a dotted line
        marks it, bars start from it (a bar to the left / below is worse than chance) and the
        axis spans ``min(0.4, lowest - margin)`` to the highest value; the legend sits below
        both panels, covering nothing."""
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        s = self.summary()
        metric = self.primary_metric
        chance = chance_level(metric)
        sub, shift = s["subsets"], s["shift"]
        fig = Figure(figsize=(12, max(4.0, 0.32 * sub.height + 2.2)), layout="constrained")
        ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
        base = 0.0 if chance is None else chance
        y = np.arange(sub.height)[::-1]
        vals1 = sub[metric].fill_nan(None).fill_null(base).to_numpy()
        errs1 = sub[f"{metric}_std"].fill_nan(None).fill_null(0).to_numpy()
        ax1.barh(y, vals1 - base, left=base, xerr=errs1 if errs1.any() else None, color="#4c72b0", capsize=2)
        ax1.set_yticks(y, [f"{n} (n={int(k)})" for n, k in zip(sub["subset"], sub["n_subjects"])], fontsize=8)
        ax1.set_xlabel(metric)
        ax1.set_title("modalities given (others hidden)")
        handles: list[Any] = []
        full = sub.filter(pl.col("n_modalities") == len(self.modalities))
        if full.height:
            ax1.axvline(float(full[metric][0]), color="k", ls="--", lw=0.8)
            handles.append(Line2D([], [], color="k", ls="--", lw=0.8, label="all modalities given / as observed"))
        observed = shift.filter(pl.col("mechanism") == OBSERVED)
        rest = shift.filter(pl.col("mechanism") != OBSERVED)
        hidden = [h for h in [*self.modalities, ALL] if h in set(rest["hidden"].to_list())]
        mechs = [m for m in MECHANISMS if m in set(rest["mechanism"].to_list())]
        width = 0.8 / max(1, len(mechs))
        colors = {"mcar": "#55a868", "mar": "#dd8452", "mnar": "#c44e52"}
        words = {"mcar": "MCAR: hidden completely at random", "mar": "MAR: depends on the prediction from the other data",
                 "mnar": "MNAR: depends on the outcome (sicker lose it more)"}
        for j, mech in enumerate(mechs):
            part = {r["hidden"]: r for r in rest.filter(pl.col("mechanism") == mech).to_dicts()}
            vals = np.array([part[h][metric] if h in part and part[h][metric] is not None else np.nan for h in hidden], dtype=float)
            errs = np.nan_to_num(np.asarray([(part[h][f"{metric}_std"] or 0.0) if h in part else 0.0 for h in hidden], dtype=float))
            ax2.bar(np.arange(len(hidden)) + (j - (len(mechs) - 1) / 2) * width, vals - base, width, bottom=base,
                    yerr=errs if errs.any() else None, color=colors[mech], capsize=2)
            handles.append(Patch(color=colors[mech], label=words[mech]))
        if observed.height:
            ax2.axhline(float(observed[metric][0]), color="k", ls="--", lw=0.8)
            if not full.height:
                handles.append(Line2D([], [], color="k", ls="--", lw=0.8, label="as observed"))
        ax2.set_xticks(np.arange(len(hidden)), [f"hide {h}" for h in hidden], fontsize=8)
        ax2.set_ylabel(metric)
        frac = rest["fraction"][0] if rest.height else float("nan")
        ax2.set_title(f"missingness shift: {frac:.0%} of holders lose it")

        def span(values: list[Any], errors: list[Any]) -> tuple[float, float] | None:
            pairs = [(float(v), float(e or 0.0)) for v, e in zip(values, errors)
                     if v is not None and math.isfinite(v) and (e is None or math.isfinite(e))]
            if not pairs:
                return None
            return min(v - e for v, e in pairs), max(v + e for v, e in pairs)

        sub_span = span(sub[metric].to_list(), sub[f"{metric}_std"].to_list())
        shift_span = span([*rest[metric].to_list(), *observed[metric].to_list()],
                          [*rest[f"{metric}_std"].to_list(), *observed[f"{metric}_std"].to_list()])
        if chance is not None:
            for ax, axis_span, line in ((ax1, sub_span, ax1.axvline), (ax2, shift_span, ax2.axhline)):
                line(chance, color="#555", ls=":", lw=1.2, label=f"chance ({chance:g})")
                both = [v for v in (axis_span or ()) if v is not None]
                lo = min(CHANCE_AXIS_FLOOR, min(both, default=chance) - 0.03)
                hi = min(1.0, max([*both, chance]) + 0.03)
                (ax.set_xlim if ax is ax1 else ax.set_ylim)(max(0.0, lo), hi)
            handles.append(Line2D([], [], color="#555", ls=":", lw=1.2, label=f"chance ({chance:g})"))
        elif shift_span is not None:
            lo, hi = shift_span
            pad = max(0.02, 0.5 * (hi - lo))
            ax2.set_ylim(lo - pad, hi + pad)
        if handles:
            fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 3), fontsize=8, frameon=False)
        fig.suptitle(f"missing-modality report ({metric}, {'higher' if self.greater_is_better else 'lower'} is better)")
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig

    def log_to_mlflow(self, prefix: str = "missing_report") -> None:
        """Into the active MLflow run: ``<prefix>/`` subsets, shift and summary tables (parquet),
        the plot (PNG), and the mean primary metric per subset and per shift scenario as metrics."""
        import mlflow

        s = self.summary()
        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp)
            self.subsets.write_parquet(tmp_path / "subsets.parquet")
            self.shift.write_parquet(tmp_path / "shift.parquet")
            s["subsets"].write_parquet(tmp_path / "subsets_summary.parquet")
            s["shift"].write_parquet(tmp_path / "shift_summary.parquet")
            self.plot(tmp_path / "missing_report.png")
            mlflow.log_artifacts(tmp, artifact_path=prefix)
        metric = self.primary_metric
        values = {}
        for r in s["subsets"].to_dicts():
            values[f"{prefix}/subset/{_metric_key(r['subset'])}/{metric}"] = r[metric]
        for r in s["shift"].to_dicts():
            scenario = r["mechanism"] if r["mechanism"] == OBSERVED else f"{r['mechanism']}/{_metric_key(r['hidden'])}"
            values[f"{prefix}/shift/{scenario}/{metric}"] = r[metric]
        mlflow.log_metrics({k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)})


# metrics whose value for a model that ranks at random is known: a line marks it on the plots
CHANCE = {"c_index": 0.5, "uno_c": 0.5, "mean_auc": 0.5, "auroc": 0.5}
CHANCE_AXIS_FLOOR = 0.4  # a metric with a chance level: its axis starts at min(0.4, lowest - margin)


def chance_level(metric: str) -> float | None:
    """The chance level of ``metric`` (``c_index``, ``auroc``, ``death/auroc``, ``auroc/<label>``: 0.5),
    or None for metrics without one (``r2``, ``log_loss``, ...)."""
    for part in metric.split("/"):
        if part in CHANCE:
            return CHANCE[part]
    return None


def _metric_key(name: str) -> str:
    """MLflow metric names allow letters, digits, ``_ - . : /`` and spaces."""
    return re.sub(r"[^A-Za-z0-9_\-.: ]", ":", name.replace("+", ":"))


def missing_report(
    fitted: Any,
    frame: Any,
    y: Any,
    y_train: Any = None,
    *,
    max_subsets: int = 64,
    mechanisms: Sequence[str] = MECHANISMS,
    fraction: float = 0.5,
    n_repeats: int = 5,
    tilt: float = 2.0,
    seed: int = 0,
) -> MissingReport:
    """Evaluate ``fitted`` (a :class:`~mmclin.training.core.FittedModel`) on ``frame``/``y``
    under every modality subset and under MCAR/MAR/MNAR missingness shifts.

    Args:
        frame, y: held-out subjects and their targets (the task's target format).
        y_train: training targets (survival: the censoring distribution for Uno's C, Brier).
        max_subsets: cap on the subsets evaluated (``2^M - 1`` when it fits).
        mechanisms: any of ``"mcar", "mar", "mnar"``; empty for subsets only.
        fraction: share of the subjects holding a modality that lose it in a shift scenario.
        n_repeats: draws per shift scenario. tilt: log-weight per SD of the driver.
        seed: seeds the subset sample and the draws.
    """
    import torch

    from mmclin.cohort import to_polars

    bad = [m for m in mechanisms if m not in MECHANISMS]
    if bad:
        raise ValueError(f"The 'mechanisms' parameter of missing_report must contain only {list(MECHANISMS)}. Got {bad} instead.")
    if not 0 < fraction <= 1:
        raise ValueError(f"The 'fraction' parameter of missing_report must be in (0, 1]. Got {fraction} instead.")
    if n_repeats < 1:
        raise ValueError(f"The 'n_repeats' parameter of missing_report must be >= 1. Got {n_repeats} instead.")
    task = fitted.task
    frame = to_polars(frame)
    y = task.check_targets(y)
    if task.n_rows(y) != frame.height:
        raise ValueError(f"X has {frame.height} rows but y has {task.n_rows(y)}")
    if y_train is not None:
        y_train = task.check_targets(y_train)
    table = fitted.table(frame)
    names = sorted(table.present)
    clash = sorted(set(names) & {"fold", "subset", "n_modalities", "n_subjects"})
    if clash:
        raise ValueError(f"modality name(s) {clash} clash with the report's own columns; rename the modality")
    observed = {m: table.present[m].clone() for m in names}

    def evaluate(present: dict[str, Any]) -> tuple[int, dict[str, float]]:
        rows = np.flatnonzero(np.any([present[m].numpy() for m in names], axis=0))
        if len(rows) == 0:
            return 0, {}
        outputs = fitted.outputs_from_table(replace(table, present=present))
        return len(rows), task.reported_metrics(task.take_rows(y, rows), outputs[rows], y_train=y_train)

    subset_rows = []
    for sub in modality_subsets(names, max_subsets, seed):
        present = {m: observed[m] if m in sub else torch.zeros_like(observed[m]) for m in names}
        n, metrics = evaluate(present)
        subset_rows.append({"subset": "+".join(sub), "n_modalities": len(sub), **{m: m in sub for m in names},
                            "n_subjects": n, **metrics})

    shift_rows = []
    n0, metrics0 = evaluate(observed)
    shift_rows.append({"mechanism": OBSERVED, "hidden": "", "fraction": 0.0, "repeat": 0, "n_hidden": 0,
                       "n_subjects": n0, **metrics0})
    if len(names) > 1 and mechanisms:
        drivers = {"mcar": {m: np.zeros(frame.height) for m in names}}
        if "mnar" in mechanisms:
            d = outcome_driver(task, y)
            drivers["mnar"] = {m: d for m in names}
        if "mar" in mechanisms:  # the model's view of the subject without modality m: observed data only
            drivers["mar"] = {}
            for m in names:
                without = {k: torch.zeros_like(v) if k == m else v for k, v in observed.items()}
                drivers["mar"][m] = _standardise(prediction_score(task, fitted.outputs_from_table(replace(table, present=without))))
        rng = np.random.default_rng(seed)
        for mech in [m for m in MECHANISMS if m in mechanisms]:
            for hidden in [*names, ALL]:
                targets = names if hidden == ALL else [hidden]
                for r in range(n_repeats):
                    present = {m: v.clone() for m, v in observed.items()}
                    n_hidden = 0
                    for m in targets:
                        others = np.any([present[k].numpy() for k in names if k != m], axis=0)
                        candidates = np.flatnonzero(present[m].numpy() & others)
                        holders = int(observed[m].sum())
                        k = min(len(candidates), int(round(fraction * holders)))
                        picked = _weighted_pick(candidates, k, drivers[mech][m], tilt, rng)
                        present[m][picked] = False
                        n_hidden += len(picked)
                    n, metrics = evaluate(present)
                    shift_rows.append({"mechanism": mech, "hidden": hidden, "fraction": float(fraction), "repeat": r,
                                       "n_hidden": n_hidden, "n_subjects": n, **metrics})
    subsets = pl.DataFrame(subset_rows).with_columns(pl.lit(0, pl.Int32).alias("fold")).select("fold", pl.exclude("fold"))
    shift = pl.DataFrame(shift_rows).with_columns(pl.lit(0, pl.Int32).alias("fold")).select("fold", pl.exclude("fold"))
    return MissingReport(subsets, shift, names, task.primary_metric, bool(task.greater_is_better))
