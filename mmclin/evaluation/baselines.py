"""Classical baselines fitted on exactly the folds and columns of an mmclin evaluation, and mmclin's
paired difference to the best of them.

What a reviewer asks first of a deep multimodal model is whether it beats a well-fitted classical
model on the same patients. The baselines are the standard ones of scikit-survival and scikit-learn:

- survival: penalised Cox (``CoxnetSurvivalAnalysis``, elastic net with ``l1_ratio`` 0.5, the
  penalty chosen by 5-fold CV on the training fold), Cox (``CoxPHSurvivalAnalysis``, Efron ties, a
  small ridge penalty so that it exists when columns outnumber events), random survival forest and
  gradient-boosted survival trees;
- binary and multiclass: penalised logistic regression (``LogisticRegressionCV``) and histogram
  gradient boosting; regression: ``RidgeCV`` and histogram gradient boosting.

Inputs are the columns of the tabular and genomics modalities and the standard hand-made summaries
of the others (:mod:`mmclin.evaluation.summaries`): per code of an irregular series its last value,
count and time since last; TF-IDF of notes. Inside each training fold numeric columns get median
imputation, a missing indicator and standardisation, categorical columns most-frequent imputation
and one-hot encoding (categories unseen in training are ignored), and the summaries' codes and
terms are chosen: nothing is fitted on a test fold. Images and slides have no classical summary;
they are listed in ``skipped``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import polars as pl
from sklearn.base import BaseEstimator, ClassifierMixin

from mmclin.cohort import ModalitySpec
from mmclin.evaluation.summaries import ROW_COLUMN, EventSummaries, NoteTfidf, event_table, note_texts
from mmclin.tasks.linear_models import CoxnetCV, fit_logistic, logistic_cv, quiet_solvers, ridge_cv

COLUMN_KINDS = ("tabular", "genomics")  # used column by column
SUMMARY_KINDS = ("irregular_series", "notes")  # used through hand-made summaries


# --- inputs -------------------------------------------------------------------------------------
def baseline_columns(specs: Sequence[ModalitySpec]) -> tuple[list[str], list[str], list[str]]:
    """``(numeric-or-list columns, categorical columns, skipped modality names)``: the columns of the
    tabular and genomics modalities, and the modalities the baselines cannot use at all."""
    columns, categorical, skipped = [], [], []
    for s in specs:
        if s.kind in COLUMN_KINDS:
            columns += s.columns
            categorical += list(s.categorical or [])
        elif s.kind not in SUMMARY_KINDS:
            skipped.append(s.name)
    return columns, categorical, skipped


def summary_inputs(frame: pl.DataFrame, specs: Sequence[ModalitySpec]) -> list[tuple[str, Any]]:
    """``(name, unfitted transformer)`` per irregular-series and notes modality: its hand-made summaries."""
    parts = []
    for s in specs:
        if s.kind == "irregular_series":
            parts.append((f"events:{s.name}", EventSummaries(event_table(frame, s), prefix=s.name)))
        elif s.kind == "notes":
            parts.append((f"notes:{s.name}", NoteTfidf(note_texts(frame, s), prefix=s.name)))
    return parts


def design_frame(frame: pl.DataFrame, columns: list[str], categorical: list[str]) -> tuple[Any, list[str], list[str]]:
    """A pandas frame of the baseline inputs (list/array columns of genomics expanded to one column
    per element, and the frame's row index for the summaries), with the names of its numeric and
    categorical columns."""
    pieces, numeric, cats = [pl.DataFrame({ROW_COLUMN: np.arange(frame.height, dtype=np.int64)})], [], []
    schema = frame.schema  # once: polars builds the whole schema on every access
    for c in columns:
        dtype = schema[c]
        if isinstance(dtype, (pl.List, pl.Array)):
            values = frame[c]
            width = int(values.list.len().max() or 0) if isinstance(dtype, pl.List) else dtype.size
            expanded = pl.DataFrame({f"{c}[{i}]": values.list.get(i, null_on_oob=True).cast(pl.Float64)
                                     for i in range(width)})
            pieces.append(expanded)
            numeric += expanded.columns
        elif c in categorical or not dtype.is_numeric() and dtype != pl.Boolean:
            pieces.append(frame.select(pl.col(c).cast(pl.String)))
            cats.append(c)
        else:
            pieces.append(frame.select(pl.col(c).cast(pl.Float64)))
            numeric.append(c)
    return pl.concat(pieces, how="horizontal").to_pandas(), numeric, cats


def _preprocessor(numeric: list[str], categorical: list[str], summaries: Sequence[tuple[str, Any]] = ()) -> Any:
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    parts = []
    if numeric:
        parts.append(("numeric", make_pipeline(SimpleImputer(strategy="median", add_indicator=True,
                                                             keep_empty_features=True), StandardScaler()), numeric))
    if categorical:
        parts.append(("categorical", make_pipeline(
            SimpleImputer(strategy="most_frequent", keep_empty_features=True),
            OneHotEncoder(handle_unknown="ignore", sparse_output=False)), categorical))
    for name, summary in summaries:
        if isinstance(summary, NoteTfidf):  # TF-IDF is used as it is (already on one scale, mostly zeros)
            parts.append((name, summary, [ROW_COLUMN]))
        else:
            parts.append((name, make_pipeline(summary, SimpleImputer(strategy="median", add_indicator=True,
                                                                     keep_empty_features=True), StandardScaler()),
                          [ROW_COLUMN]))
    return ColumnTransformer(parts, remainder="drop")


# --- models -------------------------------------------------------------------------------------
def _survival_baselines(seed: int) -> dict[str, Callable[[], Any]]:
    from sksurv.ensemble import GradientBoostingSurvivalAnalysis, RandomSurvivalForest
    from sksurv.linear_model import CoxPHSurvivalAnalysis

    return {
        "coxnet": lambda: CoxnetCV(seed=seed),
        "cox_ph": lambda: CoxPHSurvivalAnalysis(alpha=1.0, ties="efron", n_iter=200),
        "random_survival_forest": lambda: RandomSurvivalForest(n_estimators=300, min_samples_leaf=10,
                                                               max_features="sqrt", n_jobs=1, random_state=seed),
        "gradient_boosted_survival": lambda: GradientBoostingSurvivalAnalysis(
            n_estimators=200, learning_rate=0.05, max_depth=2, subsample=0.8, random_state=seed),
    }


def _classification_baselines(seed: int) -> dict[str, Callable[[], Any]]:
    from sklearn.ensemble import HistGradientBoostingClassifier

    return {
        "logistic_l2": lambda: logistic_cv(seed),
        "gradient_boosting": lambda: HistGradientBoostingClassifier(random_state=seed),
    }


def _multilabel_baselines(seed: int) -> dict[str, Callable[[], Any]]:
    """One model per label (binary relevance, scikit-learn's ``OneVsRestClassifier``): the classical baseline for
    non-exclusive labels, scored like mmclin's multilabel task (macro AUROC over the labels a fold can score)."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.multiclass import OneVsRestClassifier

    return {
        "logistic_l2": lambda: PerLabelLogistic(seed),
        "gradient_boosting": lambda: OneVsRestClassifier(HistGradientBoostingClassifier(random_state=seed)),
    }


class PerLabelLogistic(ClassifierMixin, BaseEstimator):
    """One ridge-penalised logistic regression per label (:func:`fit_logistic`: its penalty by CV, fewer folds for
    a rare label, none for a label of one row); a label constant in the training rows predicts its training rate.
    ``OneVsRestClassifier(LogisticRegressionCV)`` cannot: its 5 stratified folds refuse a label with 4 positives."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def fit(self, X: Any, Y: Any) -> "PerLabelLogistic":
        Y = np.asarray(Y).astype(np.int64)
        self.models_ = [fit_logistic(np.asarray(X), Y[:, k], self.seed) if len(np.unique(Y[:, k])) == 2
                        else float(Y[:, k].mean()) for k in range(Y.shape[1])]
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        X = np.asarray(X)
        return np.stack([np.full(len(X), m) if isinstance(m, float) else m.predict_proba(X)[:, 1]
                         for m in self.models_], 1)


def _regression_baselines(seed: int) -> dict[str, Callable[[], Any]]:
    from sklearn.ensemble import HistGradientBoostingRegressor

    return {
        "ridge": ridge_cv,
        "gradient_boosting": lambda: HistGradientBoostingRegressor(random_state=seed),
    }


BASELINES: dict[str, Callable[[int], dict[str, Callable[[], Any]]]] = {
    "survival": _survival_baselines, "binary": _classification_baselines,
    "multiclass": _classification_baselines, "multilabel": _multilabel_baselines, "regression": _regression_baselines,
}


# --- scores -------------------------------------------------------------------------------------
def primary_score(problem: str, y: Any, prediction: np.ndarray) -> float:
    """The task's primary metric from a baseline's prediction, with the function mmclin's task uses:
    Harrell's C of a risk score (survival), AUROC (binary: P(class 1); multiclass: one-vs-rest,
    macro, from class probabilities; multilabel: the mean over labels of each label's AUROC), R^2 (regression)."""
    if problem == "survival":
        from sksurv.metrics import concordance_index_censored

        return float(concordance_index_censored(y[y.dtype.names[0]].astype(bool), y[y.dtype.names[1]], prediction)[0])
    if problem == "binary":
        from sklearn.metrics import roc_auc_score

        return float(roc_auc_score(y, prediction))
    if problem == "multiclass":
        from sklearn.metrics import roc_auc_score

        return float(roc_auc_score(y, prediction, multi_class="ovr", average="macro"))
    if problem == "multilabel":  # the task's own average: labels with one class in these rows are left out
        from sklearn.metrics import roc_auc_score

        from mmclin.tasks.classification import _nanmean as nanmean, _one_vs_rest

        score = nanmean(_one_vs_rest(np.asarray(y), np.asarray(prediction), roc_auc_score))
        if not np.isfinite(score):
            raise ValueError("no label has both values among these subjects")
        return score
    from sklearn.metrics import r2_score

    return float(r2_score(y, prediction))


def task_scores(task: Any, outputs: np.ndarray) -> np.ndarray:
    """mmclin's outputs oriented like the baselines' predictions (see :func:`primary_score`)."""
    if task.problem == "binary":
        return task.predict_proba(outputs)[:, 1]
    if task.problem in ("multiclass", "multilabel"):
        return task.predict_proba(outputs)
    return np.asarray(task.predict(outputs), dtype=float)


def _predict(problem: str, model: Any, X: Any) -> np.ndarray:
    if problem == "binary":
        return model.predict_proba(X)[:, 1]
    if problem in ("multiclass", "multilabel"):  # multilabel: OneVsRestClassifier's per-label P(label)
        return model.predict_proba(X)
    return np.asarray(model.predict(X), dtype=float)


# --- the comparison -----------------------------------------------------------------------------
@dataclass
class BaselineComparison:
    """Per-fold primary metric of mmclin and of each baseline on the same folds, and mmclin's paired
    difference to the best baseline (highest mean) with a bootstrap confidence interval: test
    subjects resampled within each fold, both models scored on the same resample, averaged over folds."""

    metric: str
    folds: pl.DataFrame  # model, fold, value
    best: str
    difference: float
    ci_low: float
    ci_high: float
    n_bootstrap: int
    columns: list[str]
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    summaries: list[str] = field(default_factory=list)  # "labs: last value, count, time since last per code"

    def table(self) -> pl.DataFrame:
        """One row per model: mean, sd over folds, and the per-fold values."""
        wide = self.folds.pivot(on="fold", index="model", values="value", sort_columns=True)
        wide = wide.rename({c: f"fold {int(c) + 1}" for c in wide.columns if c != "model"})
        stats = self.folds.group_by("model", maintain_order=True).agg(
            pl.col("value").mean().alias("mean"), pl.col("value").std(ddof=1).alias("sd"))
        return stats.join(wide, on="model").sort("mean", descending=True)

    def summary_line(self) -> str:
        return (f"mmclin - {self.best} = {self.difference:+.3f} {self.metric} "
                f"(95% CI {self.ci_low:+.3f} to {self.ci_high:+.3f}; paired bootstrap over test subjects "
                f"within folds, {self.n_bootstrap} resamples)")

    def log_to_mlflow(self) -> None:
        import mlflow

        from mmclin.persistence.tracking import log_frame

        log_frame(self.folds, "baselines/folds.parquet")
        table = self.table()
        for row in table.to_dicts():
            mlflow.log_metric(f"baseline_{row['model']}_mean", row["mean"])
        mlflow.log_metrics({"paired_diff_vs_best_baseline": self.difference,
                            "paired_diff_ci_low": self.ci_low, "paired_diff_ci_high": self.ci_high})
        mlflow.set_tag("mmclin.best_baseline", self.best)
        with pl.Config(tbl_cols=-1, tbl_rows=-1, tbl_width_chars=250, float_precision=4):
            mlflow.log_text(f"{table}\n\n{self.summary_line()}\n", "baselines/table.txt")


def check_baselines(specs: Sequence[ModalitySpec], problem: str, names: Sequence[str] | None = None) -> None:
    """Refuse up front (before any training) what the baselines cannot do."""
    if problem not in BASELINES:
        raise ValueError(f"baselines: no classical baselines for {problem!r} tasks yet "
                         f"(available for {', '.join(sorted(BASELINES))})")
    if names is not None:
        known = BASELINES[problem](0)
        unknown = sorted(set(names) - set(known))
        if unknown or not names:
            raise ValueError(f"baselines: unknown {unknown}; choose from {sorted(known)}")
    if not any(s.kind in COLUMN_KINDS + SUMMARY_KINDS for s in specs):
        raise ValueError("baselines: no tabular, genomics, irregular_series or notes modality to fit them on (modalities: "
                         + ", ".join(f"{s.name} ({s.kind})" for s in specs) + ")")


@dataclass
class BaselinePredictions:
    """Each baseline's predictions on each test fold (``predictions[name][k]``) and what they used."""

    predictions: dict[str, list[np.ndarray]]
    columns: list[str]
    skipped: list[str]
    seconds: dict[str, float]
    summaries: list[str] = field(default_factory=list)


def fit_baselines(frame: pl.DataFrame, y: Any, specs: Sequence[ModalitySpec], problem: str,
                  splits: Sequence[tuple[np.ndarray, np.ndarray]], seed: int = 0,
                  names: Sequence[str] | None = None) -> BaselinePredictions:
    """Each baseline fitted on each training fold (preprocessing included) and scored on its test fold."""
    import time

    from sklearn.pipeline import make_pipeline

    check_baselines(specs, problem, names)
    columns, categorical, skipped = baseline_columns(specs)
    X, numeric, cats = design_frame(frame, columns, categorical)
    summaries = summary_inputs(frame, specs)
    makers = BASELINES[problem](seed)
    if names is not None:
        makers = {n: makers[n] for n in names}
    y_arr = y if problem == "survival" else np.asarray(y)
    predictions: dict[str, list[np.ndarray]] = {}
    seconds: dict[str, float] = {}
    for name, make in makers.items():
        t0 = time.perf_counter()
        predictions[name] = []
        for tr, te in splits:
            model = make_pipeline(_preprocessor(numeric, cats, summaries), make())
            with quiet_solvers():
                model.fit(X.iloc[tr], y_arr[tr])
            predictions[name].append(_predict(problem, model, X.iloc[te]))
        seconds[name] = time.perf_counter() - t0
    described = [f"{s.name}: " + ("last value, count, time since last per code" if s.kind == "irregular_series"
                                  else "TF-IDF of the notes") for s in specs if s.kind in SUMMARY_KINDS]
    return BaselinePredictions(predictions, columns, skipped, seconds, described)


def compare(problem: str, metric: str, y: Any, splits: Sequence[tuple[np.ndarray, np.ndarray]],
            mmclin_predictions: list[np.ndarray], baselines: BaselinePredictions, n_bootstrap: int = 500,
            seed: int = 0) -> BaselineComparison:
    """The per-fold table and the paired bootstrap of mmclin minus the best baseline.

    ``mmclin_predictions[k]``: mmclin's score on fold ``k``'s test subjects, oriented like the
    baselines' (risk for survival, P(class 1) for binary, class probabilities for multiclass).
    """
    y_arr = y if problem == "survival" else np.asarray(y)
    baseline_predictions = baselines.predictions
    thin = {k: why for k, (_, te) in enumerate(splits) if (why := fold_support(problem, y_arr[te])) is not None}
    if thin:
        import warnings

        from mmclin.tasks.base import UndefinedMetricWarning

        warnings.warn(f"{metric} undefined (NaN for mmclin and every baseline) on fold(s) "
                      + "; ".join(f"{k + 1}: {why}" for k, why in thin.items()), UndefinedMetricWarning, stacklevel=2)
    rows = []
    for k, (_, te) in enumerate(splits):
        rows.append({"model": "mmclin", "fold": k,
                     "value": np.nan if k in thin else _safe(problem, y_arr[te], mmclin_predictions[k])})
        for name, preds in baseline_predictions.items():
            rows.append({"model": name, "fold": k, "value": np.nan if k in thin else _safe(problem, y_arr[te], preds[k])})
    folds = pl.DataFrame(rows)
    means = folds.filter(pl.col("model") != "mmclin").group_by("model").agg(
        pl.col("value").filter(pl.col("value").is_not_nan()).mean())
    best = means.sort(["value", "model"], descending=[True, False], nulls_last=True)["model"][0]
    observed = float(_nanmean([r["value"] for r in rows if r["model"] == "mmclin"])
                     - _nanmean([r["value"] for r in rows if r["model"] == best]))
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_bootstrap):
        per_fold = []
        for k, (_, te) in enumerate(splits):
            if k in thin:
                continue
            pick = rng.integers(0, len(te), len(te))
            a = _safe(problem, y_arr[te][pick], mmclin_predictions[k][pick])
            b = _safe(problem, y_arr[te][pick], baseline_predictions[best][k][pick])
            if np.isfinite(a) and np.isfinite(b):
                per_fold.append(a - b)
        if per_fold:
            diffs.append(np.mean(per_fold))
    low, high = (np.percentile(diffs, [2.5, 97.5]) if diffs else (np.nan, np.nan))
    return BaselineComparison(metric, folds, best, observed, float(low), float(high), len(diffs), baselines.columns,
                              baselines.skipped, baselines.seconds, baselines.summaries)


def _nanmean(values: list[float]) -> float:
    arr = np.asarray(values, dtype=float)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")


def fold_support(problem: str, y: Any) -> str | None:
    """Why the primary metric is undefined on the test subjects ``y`` (too few subjects, events or subjects of a
    class: the thresholds of :mod:`mmclin.tasks.base`), or None when it is supported."""
    from mmclin.tasks.base import MIN_EVENTS, MIN_PER_CLASS, MIN_SUBJECTS

    n = len(y)
    if problem == "survival":
        events = int(np.asarray(y[y.dtype.names[0]]).astype(bool).sum())
        if events < MIN_EVENTS or n < MIN_SUBJECTS:
            return f"{events} event(s) among {n} subject(s), at least {MIN_EVENTS} events and {MIN_SUBJECTS} subjects needed"
        return None
    if problem in ("binary", "multiclass"):
        values, counts = np.unique(np.asarray(y), return_counts=True)
        thin = [f"{v!s} ({c} of {n})" for v, c in zip(values.tolist(), counts.tolist())
                if c < MIN_PER_CLASS or n - c < MIN_PER_CLASS]
        if problem == "binary" and len(values) < 2:
            thin = [f"{values[0]!s} only" if len(values) else "no subject"]
        if thin:
            return f"class(es) {', '.join(thin)}: at least {MIN_PER_CLASS} subjects in and out of each class needed"
        return None
    if problem == "multilabel":  # as the task's macro AUROC: every label present needs enough rows in and out of it
        from mmclin.tasks.classification import _thin_columns

        arr = np.asarray(y)
        thin = _thin_columns(arr, [f"label {k}" for k in range(arr.shape[1])], "label", absent_too=False)
        if thin or not any(len(np.unique(arr[:, k])) == 2 for k in range(arr.shape[1])):
            return (f"{', '.join(thin) or 'no label with both values'}: at least {MIN_PER_CLASS} subjects in and "
                    "out of each label needed")
        return None
    if n < MIN_SUBJECTS:
        return f"{n} subject(s), at least {MIN_SUBJECTS} needed"
    return None


def _safe(problem: str, y: Any, prediction: np.ndarray) -> float:
    """The score, or NaN where it is undefined on this sample (one class, no event, no comparable pair)."""
    try:
        return primary_score(problem, y, prediction)
    except (ValueError, ZeroDivisionError):
        return float("nan")
