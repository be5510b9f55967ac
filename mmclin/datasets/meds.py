"""MEDS reader: a MEDS dataset (+ a MEDS label table) -> a :class:`~mmclin.cohort.Cohort`.

MEDS (Medical Event Data Standard, https://github.com/Medical-Event-Data-Standard/meds)
stores one event per row in parquet shards under ``data/``: ``subject_id`` (int64),
``time`` (datetime; null for static facts such as ``GENDER//F``), ``code`` (string),
``numeric_value`` (float, nullable) and optionally ``text_value`` (string). A label table
(the MEDS label schema) has ``subject_id``, ``prediction_time`` and one of
``boolean_value`` / ``integer_value`` / ``float_value`` / ``categorical_value``; each label
row is one prediction. ``metadata/subject_splits.parquet`` (``subject_id``, ``split``), when
present, is returned in ``cohort.extra["split"]``.

Static events become a tabular modality (one column per static code), timed numeric events
one ``irregular_series`` modality per code-prefix group, and timed text events a ``notes``
modality; events after each row's ``prediction_time`` are removed before aggregation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from mmclin.cohort import Cohort, ModalitySpec
from mmclin.datasets.events import events_to_frame, notes_to_frame, scan_table

__all__ = ["read_meds"]

_LABEL_TASKS = {"boolean_value": "binary", "integer_value": "multiclass", "categorical_value": "multiclass",
                "float_value": "regression"}


def _prefix_filter(prefixes: list[str]) -> pl.Expr:
    if not prefixes or prefixes == [""]:
        return pl.lit(True)
    return pl.any_horizontal([pl.col("code").str.starts_with(p) for p in prefixes])


def read_meds(
    root: str | Path,
    labels: Any,
    *,
    series: dict[str, list[str]] | None = None,
    notes: dict[str, list[str]] | None = None,
    window: Any = None,
    time_unit: str = "h",
    max_events: int | None = None,
    max_static_codes: int = 50,
) -> Cohort:
    """Read a MEDS dataset and a MEDS label table into a one-row-per-prediction cohort.

    Args:
        root: the dataset folder (with ``data/``), or a folder / file of event parquet shards.
        labels: label table (frame or parquet/CSV path) in the MEDS label schema.
        series: ``{modality: [code prefixes]}`` for numeric events (default: all of them in
            one ``events`` modality); an event goes to the first modality whose prefix matches.
        notes: ``{modality: [code prefixes]}`` for text events (default: all text events in
            ``notes`` when there are any).
        window: observation window before each prediction time (``"48h"``, a timedelta).
        time_unit: unit of event times relative to the prediction time. max_events: most recent kept.
        max_static_codes: static codes (null time) kept as tabular columns, most frequent first.

    Returns:
        ``Cohort`` whose frame has ``sample_id`` (``"<subject_id>@<prediction_time>"``),
        ``subject_id`` (use it as the group column: one subject may have several rows), the
        static columns, one column per modality and the label column; ``task`` follows the
        label column (boolean -> binary, integer/categorical -> multiclass, float -> regression).
    """
    root = Path(root)
    data = root / "data" if (root / "data").is_dir() else root
    if not data.exists():
        raise FileNotFoundError(f"MEDS data {str(data)!r} does not exist (expected <root>/data/*.parquet)")
    # each shard's own schema (parquet metadata only): a shard lacking a column is named, not the folder
    if data.is_dir():
        shards = sorted(data.rglob("*.parquet"))
        if not shards:
            raise FileNotFoundError(f"MEDS data folder {str(data)!r} holds no .parquet files")
    else:
        shards = [data] if data.suffix.lower() in (".parquet", ".pq") else []
    for shard in shards:
        cols = pl.read_parquet_schema(shard)
        lacking = [c for c in ("subject_id", "time", "code", "numeric_value") if c not in cols]
        if lacking:
            raise ValueError(f"MEDS events file {str(shard)!r} lacks column(s) {lacking}; it has columns {list(cols)}; "
                             "MEDS needs subject_id, time, code, numeric_value")
    events = scan_table(str(data) if data.is_dir() else data, "MEDS events")
    schema = events.collect_schema()
    missing = [c for c in ("subject_id", "time", "code", "numeric_value") if c not in schema]
    if missing:
        raise ValueError(f"MEDS events in {str(data)!r} lack columns {missing}; MEDS needs subject_id, time, code, numeric_value")
    lab = scan_table(labels, "MEDS labels").collect()
    value_cols = [c for c in _LABEL_TASKS if c in lab.columns and lab[c].null_count() < lab.height]
    if "subject_id" not in lab.columns or "prediction_time" not in lab.columns or len(value_cols) != 1:
        raise ValueError("MEDS labels need subject_id, prediction_time and exactly one non-empty value column of "
                         f"{list(_LABEL_TASKS)}; got columns {lab.columns}")
    label = value_cols[0]
    subjects = lab.select(
        pl.format("{}@{}", "subject_id", pl.col("prediction_time").dt.strftime("%Y-%m-%dT%H:%M:%S")).alias("sample_id"),
        "subject_id", "prediction_time", label)

    # static facts (null time) -> tabular columns; numeric_value when given, else 1 (the fact holds)
    static = (events.filter(pl.col("time").is_null())
              .select("subject_id", "code", pl.col("numeric_value").cast(pl.Float64).fill_null(1.0).alias("v"))
              .collect())
    keep = static["code"].value_counts(sort=True).head(max_static_codes)["code"].to_list()
    static_cols: list[str] = []
    frame = subjects
    if keep:
        wide = (static.filter(pl.col("code").is_in(keep)).group_by("subject_id", "code").agg(pl.col("v").last())
                .pivot(on="code", index="subject_id", values="v"))
        static_cols = sorted(c for c in wide.columns if c != "subject_id")
        frame = frame.join(wide.select("subject_id", *static_cols), on="subject_id", how="left")

    timed = events.filter(pl.col("time").is_not_null())
    has_text = "text_value" in schema
    numeric = timed.filter(pl.col("text_value").is_null()) if has_text else timed
    specs = [ModalitySpec(name="static", kind="tabular", columns=static_cols)] if static_cols else []
    groups = series or {"events": [""]}
    taken = pl.lit(False)
    common = dict(id_column="subject_id", time_column="time", prediction_time="prediction_time", window=window,
                  time_unit=time_unit)
    for name, prefixes in groups.items():
        match = _prefix_filter(prefixes)
        frame = events_to_frame(numeric.filter(match & ~taken), frame, name=name, max_events=max_events, **common)
        taken = taken | match
        specs.append(ModalitySpec(name=name, kind="irregular_series", columns=[name]))
    if has_text:
        text_groups = notes or {"notes": [""]}
        for name, prefixes in text_groups.items():
            txt = timed.filter(pl.col("text_value").is_not_null() & _prefix_filter(prefixes))
            frame = notes_to_frame(txt, frame, name=name, text_column="text_value", **common)
            if notes is not None or frame[name].is_not_null().any():
                specs.append(ModalitySpec(name=name, kind="notes", columns=[name]))
            else:
                frame = frame.drop(name)
    frame = frame.drop("prediction_time")
    task = _LABEL_TASKS[label]
    y = frame[label].cast(pl.Int64).to_numpy() if label == "boolean_value" else frame[label].to_numpy()
    extra: dict[str, Any] = {"group_column": "subject_id", "label_column": label}
    splits = root / "metadata" / "subject_splits.parquet"
    if splits.exists():
        split = frame.select("subject_id").join(pl.read_parquet(splits), on="subject_id", how="left")["split"]
        extra["split"] = split.to_numpy()
    return Cohort(
        name=root.name or "meds", frame=frame, modalities=specs, y=y, task=task, id_column="sample_id",
        target_columns=[label],
        description=(f"MEDS dataset {str(root)!r}: {frame.height} predictions for {frame['subject_id'].n_unique()} subjects; "
                     f"modalities {[s.name for s in specs]}; label {label!r}."),
        source=str(root), licence="as the source dataset's", extra=extra,
    )
