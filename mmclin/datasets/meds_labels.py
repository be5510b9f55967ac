"""MEDS label tables in (ACES task labels) and MEDS-evaluation prediction tables out.

A label table in the MEDS label schema (``meds.LabelSchema``: ``subject_id`` int64,
``prediction_time`` timestamp, one of ``boolean_value`` / ``integer_value`` / ``float_value`` /
``categorical_value``) is what ACES writes: each row is one sample, a subject at one prediction
time; "data may be used from this subject up to and including this time" (the schema's own
words), so events with ``time <= prediction_time`` are used and later ones never are.

:func:`meds_predictions_frame` / :func:`write_meds_predictions` write a binary model's
predictions in the schema ``meds-evaluation`` reads (``meds_evaluation.schema.PredictionSchema``:
the label columns plus ``predicted_boolean_value`` and ``predicted_boolean_probability``).
The ``meds`` and ``meds-evaluation`` packages (``pip install 'mmclin[meds]'``) are used to
validate when installed; without them the same columns and types are checked here.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

__all__ = ["LABEL_VALUE_COLUMNS", "read_meds_labels", "meds_predictions_frame", "write_meds_predictions"]

# value column -> (mmclin task, polars dtype of the MEDS label schema)
LABEL_VALUE_COLUMNS = {"boolean_value": ("binary", pl.Boolean), "integer_value": ("multiclass", pl.Int64),
                       "float_value": ("regression", pl.Float32), "categorical_value": ("multiclass", pl.String)}
log = logging.getLogger("mmclin.datasets")


def _where(source: Any) -> str:
    return f"MEDS label file {str(source)!r}" if isinstance(source, (str, Path)) else "MEDS labels"


def _cast(frame: pl.DataFrame, column: str, dtype: pl.DataType, what: str, expected: str) -> pl.Series:
    col = frame[column]
    try:
        out = col.cast(dtype, strict=True)
    except (pl.exceptions.InvalidOperationError, pl.exceptions.ComputeError):
        out = None
    if out is None or (dtype == pl.Int64 and not col.dtype.is_integer()) or (
            dtype == pl.Datetime("us") and not col.dtype.is_temporal()):
        raise ValueError(f"{what} column {column!r} has dtype {col.dtype}; expected {expected} (the MEDS label schema)")
    return out


def read_meds_labels(labels: Any) -> tuple[pl.DataFrame, str]:
    """A MEDS label table (frame, or parquet/CSV path) checked and cast to the MEDS label schema.

    Returns ``(frame, value_column)``: ``subject_id`` (Int64), ``prediction_time`` (Datetime us) and
    the one non-empty value column (all-null value columns, as ACES writes for the unused ones, are
    dropped). Errors name the file, the column and the first bad row: no id or time, no label,
    a repeated ``(subject_id, prediction_time)``. Extra columns are ignored (logged at WARNING).
    """
    from mmclin.datasets.events import scan_table

    what = _where(labels)
    lab = scan_table(labels, what).collect()
    missing = [c for c in ("subject_id", "prediction_time") if c not in lab.columns]
    value_cols = [c for c in LABEL_VALUE_COLUMNS if c in lab.columns and lab[c].null_count() < lab.height]
    if missing or len(value_cols) != 1:
        raise ValueError(f"{what}: MEDS labels need subject_id, prediction_time and exactly one non-empty value column "
                         f"of {list(LABEL_VALUE_COLUMNS)}; got columns {lab.columns}")
    label = value_cols[0]
    extra = [c for c in lab.columns if c not in ("subject_id", "prediction_time", *LABEL_VALUE_COLUMNS)]
    if extra:
        log.warning("%s: column(s) %s are not in the MEDS label schema and are ignored", what, extra)
    for col in ("subject_id", "prediction_time", label):
        if lab[col].null_count():
            raise ValueError(f"{what} column {col!r} is null in {lab[col].null_count()} row(s), the first at row "
                             f"{int(lab[col].is_null().arg_max())}; every label row needs it")
    if lab["prediction_time"].dtype == pl.String:
        lab = lab.with_columns(pl.col("prediction_time").str.to_datetime(strict=False))
    tz = getattr(lab["prediction_time"].dtype, "time_zone", None)
    if tz is not None:
        raise ValueError(f"{what} column 'prediction_time' has time zone {tz!r}; MEDS times are naive timestamps "
                         "(convert, e.g. .dt.convert_time_zone('UTC').dt.replace_time_zone(None))")
    dtype = LABEL_VALUE_COLUMNS[label][1]
    out = pl.DataFrame({
        "subject_id": _cast(lab, "subject_id", pl.Int64, what, "integers (int64)"),
        "prediction_time": _cast(lab, "prediction_time", pl.Datetime("us"), what, "timestamps (datetime[us])"),
        label: _cast(lab, label, dtype, what, f"{dtype}"),
    })
    repeat = ~out.select(pl.struct("subject_id", "prediction_time").is_first_distinct()).to_series()
    if repeat.any():
        first = int(repeat.arg_max())
        raise ValueError(f"{what} row {first} repeats another row's subject_id and prediction_time "
                         f"(subject_id={out['subject_id'][first]}, prediction_time={out['prediction_time'][first]}); "
                         "each (subject, prediction time) is one sample")
    try:
        from meds import LabelSchema
    except ImportError:
        return out, label
    try:
        LabelSchema.align(out.to_arrow())  # safe casts only (large_string -> string)
    except Exception as err:  # flexible_schema's Schema/TableValidationError
        raise ValueError(f"{what} does not conform to meds.LabelSchema: {err}") from None
    return out, label


def _positive_probability(model: Any, frame: pl.DataFrame) -> np.ndarray:
    proba = np.asarray(model.predict_proba(frame), dtype=np.float64)
    if proba.ndim == 2:
        if proba.shape[1] != 2:
            raise ValueError(f"MEDS-evaluation predictions are for binary tasks; the model gives {proba.shape[1]} "
                             "class probabilities")
        classes = list(getattr(model, "classes_", [0, 1]))
        pos = classes.index(True) if True in classes else 1
        proba = proba[:, pos]
    return proba


def meds_predictions_frame(frame: Any, probability: Any, *, label_column: str = "boolean_value",
                           threshold: float = 0.5) -> pl.DataFrame:
    """The MEDS-evaluation prediction table of a binary task, one row per row of ``frame``.

    Args:
        frame: the samples (e.g. a :func:`~mmclin.datasets.meds.read_meds` frame): ``subject_id``,
            ``prediction_time`` and the true label ``label_column`` (booleans or 0/1; null when unknown).
        probability: predicted probability of the positive class, one per row.
        threshold: ``predicted_boolean_value`` is ``probability >= threshold``.

    Returns:
        ``subject_id`` (Int64), ``prediction_time`` (Datetime us), ``boolean_value``,
        ``predicted_boolean_value``, ``predicted_boolean_probability`` (Float32), validated with
        ``meds_evaluation.schema.PredictionSchema`` when ``meds-evaluation`` is installed.
    """
    frame = _as_frame(frame)
    need = [c for c in ("subject_id", "prediction_time", label_column) if c not in frame.columns]
    if need:
        raise ValueError(f"MEDS predictions need columns subject_id, prediction_time and the label {label_column!r} in "
                         f"the frame; it lacks {need} (columns {frame.columns[:10]})")
    p = np.asarray(probability, dtype=np.float64).reshape(-1)
    if p.shape[0] != frame.height:
        raise ValueError(f"{p.shape[0]} probabilities for a frame of {frame.height} rows")
    bad = np.flatnonzero(~np.isfinite(p) | (p < 0) | (p > 1))
    if bad.size:
        raise ValueError(f"probability at row {int(bad[0])} is {float(p[bad[0]])}; expected a number in [0, 1]")
    truth = frame[label_column]
    if truth.dtype != pl.Boolean:
        values = set(truth.drop_nulls().unique().to_list())
        if not values <= {0, 1}:
            raise ValueError(f"label column {label_column!r} holds {sorted(values, key=str)[:5]}; MEDS-evaluation's "
                             "boolean_value needs booleans or 0/1 (a binary task)")
        truth = truth.cast(pl.Boolean)
    out = pl.DataFrame({
        "subject_id": frame["subject_id"].cast(pl.Int64),
        "prediction_time": frame["prediction_time"].cast(pl.Datetime("us")),
        "boolean_value": truth,
        "predicted_boolean_value": pl.Series(p >= threshold, dtype=pl.Boolean),
        "predicted_boolean_probability": pl.Series(p, dtype=pl.Float32),
    })
    try:
        from meds_evaluation.schema import PredictionSchema
    except ImportError:
        return out
    try:
        return pl.from_arrow(PredictionSchema.align(out.to_arrow()))
    except Exception as err:  # flexible_schema's Schema/TableValidationError
        raise ValueError(f"MEDS predictions do not conform to meds_evaluation's PredictionSchema: {err}") from None


def write_meds_predictions(model: Any, frame: Any, path: str | Path, *, label_column: str = "boolean_value",
                           threshold: float = 0.5) -> pl.DataFrame:
    """Predict ``frame`` with a fitted binary ``model`` (``predict_proba``) and write the MEDS-evaluation
    table (:func:`meds_predictions_frame`) to the parquet file ``path``; returns the table.

    ``meds-evaluation`` reads it as written:
    ``evaluate_binary_classification(pl.read_parquet(path))``, or
    ``meds-evaluation-cli predictions_path=PATH output_file=results.json``.
    """
    from mmclin.persistence.atomic import write_file_atomic

    if not str(path).lower().endswith((".parquet", ".pq")):
        raise ValueError(f"MEDS predictions file {str(path)!r}: expected a .parquet path (meds-evaluation reads parquet)")
    frame = _as_frame(frame)
    out = meds_predictions_frame(frame, _positive_probability(model, frame), label_column=label_column,
                                 threshold=threshold)
    write_file_atomic(path, out.write_parquet)
    return out


def _as_frame(frame: Any) -> pl.DataFrame:
    from mmclin.datasets.events import scan_table

    return scan_table(frame, "predictions frame").collect()
