"""MEDS reader: a MEDS dataset (+ an ACES / MEDS label table) -> a :class:`~mmclin.cohort.Cohort`.

MEDS (Medical Event Data Standard, https://github.com/Medical-Event-Data-Standard/meds)
stores one event per row in parquet shards under ``data/`` (``data/**/*.parquet``):
``subject_id`` (int64), ``time`` (timestamp; null for static facts such as ``GENDER//F``),
``code`` (string), ``numeric_value`` (float32, nullable, may be omitted) and optionally
``text_value`` (string). Each shard's schema is checked against ``meds.DataSchema`` (metadata
only, nothing read); ``metadata/codes.parquet``, ``metadata/subject_splits.parquet`` and
``metadata/dataset.json`` against their ``meds`` schemas, when present. A label table (the MEDS
label schema, what ACES writes; :func:`~mmclin.datasets.meds_labels.read_meds_labels`) defines
the samples: one row per ``(subject_id, prediction_time)``.

Static events become a tabular modality (one column per static code), timed numeric events
one ``irregular_series`` modality per code-prefix group, and timed text events a ``notes``
modality, all through :func:`~mmclin.datasets.events.events_to_frame` /
:func:`~mmclin.datasets.events.notes_to_frame` on lazy scans of the shards: each sample's
events with ``time <= prediction_time`` are kept (the label schema's "up to and including"),
later ones are removed before aggregation. The dataset's own splits become a ``split`` column
(and ``cohort.extra["split"]``; :func:`meds_split_indices`).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from mmclin.cohort import Cohort, ModalitySpec
from mmclin.datasets.events import events_to_frame, notes_to_frame
from mmclin.datasets.meds_labels import (LABEL_VALUE_COLUMNS, meds_predictions_frame, read_meds_labels,
                                         write_meds_predictions)

__all__ = ["read_meds", "read_meds_labels", "meds_split_indices", "meds_predictions_frame", "write_meds_predictions"]

log = logging.getLogger("mmclin.datasets")
# MEDS DataSchema columns: (required, the schema's type, what a reader can take without changing a value)
_DATA_COLUMNS = {
    "subject_id": (True, "int64", pa.types.is_integer),
    "time": (True, "timestamp[us]", lambda t: pa.types.is_null(t) or (pa.types.is_timestamp(t) and t.tz is None)),
    "code": (True, "string", lambda t: _is_text(t) or (pa.types.is_dictionary(t) and _is_text(t.value_type))),
    "numeric_value": (False, "float", lambda t: pa.types.is_null(t) or pa.types.is_floating(t) or pa.types.is_integer(t)),
    "text_value": (False, "large_string", lambda t: pa.types.is_null(t) or _is_text(t)),
}


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", lambda _: False)(t)


def _check_shard(shard: Path) -> pa.Schema:
    """A shard's arrow schema (parquet metadata only), checked against ``meds.DataSchema``: a missing
    required column or a column whose type cannot hold the schema's values is one error naming the file."""
    try:
        schema = pq.read_schema(shard)
    except Exception as err:
        raise ValueError(f"MEDS events file {str(shard)!r} is not a readable parquet file ({err})") from None
    try:  # the meds package's own schema, when installed (pip install 'mmclin[meds]')
        from meds import DataSchema

        want = {c: str(DataSchema.column_type(c)) for c in DataSchema.columns()}
        required = set(DataSchema.required_columns())
    except ImportError:
        want = {c: t for c, (_, t, _) in _DATA_COLUMNS.items()}
        required = {c for c, (r, _, _) in _DATA_COLUMNS.items() if r}
    lacking = [c for c in _DATA_COLUMNS if c in required and c not in schema.names]
    if lacking:
        raise ValueError(f"MEDS events file {str(shard)!r} lacks column(s) {lacking}; it has columns {schema.names}; "
                         f"MEDS needs {sorted(required, key=list(_DATA_COLUMNS).index)}")
    for col, (_, _, ok) in _DATA_COLUMNS.items():
        if col in schema.names and not ok(schema.field(col).type):
            raise ValueError(f"MEDS events file {str(shard)!r} column {col!r} has type {schema.field(col).type}; "
                             f"the MEDS DataSchema wants {want[col]}")
    return schema


def _scan_shard(shard: Path, schema: pa.Schema) -> pl.LazyFrame:
    """One shard, lazily, in the canonical dtypes (so shards written by different tools concatenate)."""
    names = set(schema.names)
    return pl.scan_parquet(shard).select(
        pl.col("subject_id").cast(pl.Int64), pl.col("time").cast(pl.Datetime("us")), pl.col("code").cast(pl.String),
        (pl.col("numeric_value") if "numeric_value" in names else pl.lit(None)).cast(pl.Float64).alias("numeric_value"),
        (pl.col("text_value") if "text_value" in names else pl.lit(None)).cast(pl.String).alias("text_value"))


def _read_metadata(root: Path) -> dict[str, Any]:
    """``metadata/`` files, each checked against its ``meds`` schema (when meds is installed)."""
    meta = root / "metadata"
    out: dict[str, Any] = {}
    try:
        import meds
    except ImportError:
        meds = None
    path = meta / "dataset.json"
    if path.exists():
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"MEDS metadata file {str(path)!r} is not valid JSON ({err})") from None
        if not isinstance(info, dict):
            raise ValueError(f"MEDS metadata file {str(path)!r} holds a {type(info).__name__}; expected a JSON object")
        if meds is not None:
            try:
                meds.DatasetMetadataSchema.validate(info)
            except Exception as err:
                cause = getattr(err.__cause__, "message", None) or str(err)
                where = "/".join(str(p) for p in getattr(err.__cause__, "path", [])) or "?"
                raise ValueError(f"MEDS metadata file {str(path)!r} field {where!r}: {cause} "
                                 "(meds.DatasetMetadataSchema)") from None
        out["dataset_metadata"] = info
    for name, schema_name, key in (("codes.parquet", "CodeMetadataSchema", "code_metadata"),
                                   ("subject_splits.parquet", "SubjectSplitSchema", "subject_splits")):
        path = meta / name
        if not path.exists():
            continue
        table = pq.read_table(path)
        need = {"codes.parquet": ["code"], "subject_splits.parquet": ["subject_id", "split"]}[name]
        lacking = [c for c in need if c not in table.schema.names]
        if lacking:
            raise ValueError(f"MEDS metadata file {str(path)!r} lacks column(s) {lacking}; it has {table.schema.names}")
        if meds is not None:
            schema = getattr(meds, schema_name)
            try:
                schema.align(table.select(need if name == "subject_splits.parquet" else table.schema.names))
            except Exception as err:
                raise ValueError(f"MEDS metadata file {str(path)!r} does not conform to meds.{schema_name}: {err}") from None
        frame = pl.from_arrow(table)
        if name == "subject_splits.parquet":
            frame = frame.select(pl.col("subject_id").cast(pl.Int64), pl.col("split").cast(pl.String))
            dup = ~frame["subject_id"].is_first_distinct()
            if dup.any():
                i = int(dup.arg_max())
                raise ValueError(f"MEDS metadata file {str(path)!r} row {i}: subject_id {frame['subject_id'][i]} "
                                 "has more than one split; a subject sits in exactly one")
        out[key] = frame
    return out


def meds_split_indices(cohort: Cohort) -> dict[str, np.ndarray]:
    """Row indices of each of the dataset's own splits (``metadata/subject_splits.parquet``):
    ``{"train": [...], "tuning": [...], "held_out": [...]}`` (whatever names the file uses).
    Rows whose subject has no split are in none of them."""
    split = cohort.extra.get("split")
    if split is None:
        raise ValueError(f"cohort {cohort.name!r} has no MEDS splits (no metadata/subject_splits.parquet was read)")
    split = np.asarray(split, dtype=object)
    return {str(name): np.flatnonzero(split == name) for name in dict.fromkeys(s for s in split if s is not None)}


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
    store: str | Path | None = None,
) -> Cohort:
    """Read a MEDS dataset and a MEDS (ACES) label table into a one-row-per-prediction cohort.

    Args:
        root: the dataset folder (with ``data/`` and optionally ``metadata/``), or a folder / file
            of event parquet shards.
        labels: label table (frame or parquet/CSV path) in the MEDS label schema; each row is one
            sample, and a subject may have many (one per prediction time).
        series: ``{modality: [code prefixes]}`` for numeric events (default: all of them in
            one ``events`` modality); an event goes to the first modality whose prefix matches.
        notes: ``{modality: [code prefixes]}`` for text events (default: all text events in
            ``notes`` when there are any).
        window: observation window before each prediction time (``"48h"``, a timedelta).
        time_unit: unit of event times relative to the prediction time. max_events: most recent kept.
        max_static_codes: static codes (null time) kept as tabular columns, most frequent first.
        store: out of core: a folder of event stores (:mod:`mmclin.datasets.event_store`). The series and
            notes modalities' columns then hold references (``struct{subject_id, prediction_time}``) and
            their events are read from the stores per batch (notes: hashed once into a notes store when the
            featurizer first fits); ``max_events`` becomes the featurizer's (each row's most recent events in
            a batch). Default None: the events are aggregated into the frame.

    Returns:
        ``Cohort`` whose frame has ``sample_id`` (``"<subject_id>@<prediction_time>"``),
        ``subject_id`` (the group column: one subject may have several rows; ``extra["group_column"]``),
        ``prediction_time``, the label column, ``split`` (when the dataset has
        ``metadata/subject_splits.parquet``), the static columns and one column per modality;
        ``task`` follows the label column (boolean -> binary, integer/categorical -> multiclass,
        float -> regression). Every modality of a row holds only events with
        ``time <= prediction_time`` of that row.
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
        if data.suffix.lower() not in (".parquet", ".pq"):
            raise ValueError(f"MEDS data {str(data)!r}: expected a folder of .parquet shards or a .parquet file")
        shards = [data]
    scans = [_scan_shard(shard, _check_shard(shard)) for shard in shards]
    events = pl.concat(scans, how="vertical") if len(scans) > 1 else scans[0]
    has_text = any("text_value" in pq.read_schema(shard).names for shard in shards)
    meta = _read_metadata(root) if (root / "metadata").is_dir() else {}

    lab, label = read_meds_labels(labels)
    ts = pl.col("prediction_time")
    stamp = pl.when(ts.dt.microsecond() != 0).then(ts.dt.strftime("%Y-%m-%dT%H:%M:%S%.6f")) \
        .otherwise(ts.dt.strftime("%Y-%m-%dT%H:%M:%S"))
    frame = lab.select(pl.format("{}@{}", "subject_id", stamp).alias("sample_id"), "subject_id", "prediction_time",
                       label)
    extra: dict[str, Any] = {"group_column": "subject_id", "label_column": label}
    if "subject_splits" in meta:
        frame = frame.join(meta["subject_splits"], on="subject_id", how="left", maintain_order="left")
        n_none = frame["split"].null_count()
        if n_none:
            log.warning("MEDS labels: %d of %d row(s) are of subjects absent from metadata/subject_splits.parquet "
                        "(split null; the first at row %d)", n_none, frame.height, int(frame["split"].is_null().arg_max()))
        extra["split"] = frame["split"].to_numpy()
    for key in ("dataset_metadata", "code_metadata"):
        if key in meta:
            extra[key] = meta[key]

    # static facts (null time) -> tabular columns; numeric_value when given, else 1 (the fact holds); of
    # several values of one code for one subject, the last in the shards' order (path order, then row order)
    static = (events.filter(pl.col("time").is_null())
              .select("subject_id", "code", pl.col("numeric_value").fill_null(1.0).alias("v"))
              .collect())
    keep = static["code"].value_counts(sort=True).sort(["count", "code"], descending=[True, False]) \
        .head(max_static_codes)["code"].to_list()
    static_cols: list[str] = []
    if keep:
        wide = (static.filter(pl.col("code").is_in(keep)).group_by("subject_id", "code", maintain_order=True)
                .agg(pl.col("v").last()).pivot(on="code", index="subject_id", values="v"))
        static_cols = sorted(c for c in wide.columns if c != "subject_id")
        clash = [c for c in static_cols if c in frame.columns]
        if clash:
            raise ValueError(f"MEDS static code(s) {clash} have the name of a column of the cohort frame; they cannot "
                             "become tabular columns")
        frame = frame.join(wide.select("subject_id", *static_cols), on="subject_id", how="left", maintain_order="left")

    timed = events.filter(pl.col("time").is_not_null())
    numeric = timed.filter(pl.col("text_value").is_null())
    specs = [ModalitySpec(name="static", kind="tabular", columns=static_cols)] if static_cols else []
    groups = series or {"events": [""]}
    taken = pl.lit(False)
    common = dict(id_column="subject_id", time_column="time", prediction_time="prediction_time", window=window,
                  time_unit=time_unit)
    earlier: list[str] = []
    for name, prefixes in groups.items():
        if store is not None:  # out of core: the frame holds references, the store the events
            from mmclin.datasets.event_store import events_to_store

            frame, spec = events_to_store(root, frame, name=name, store=store, prediction_time="prediction_time",
                                          window=window, time_unit=time_unit, codes=[p for p in prefixes if p] or None,
                                          exclude_codes=list(earlier) or None,
                                          **({"max_events": max_events} if max_events is not None else {}))
            earlier += [p for p in prefixes if p] if "" not in prefixes and prefixes else [""]
            specs.append(spec)
            continue
        match = _prefix_filter(prefixes)
        frame = events_to_frame(numeric.filter(match & ~taken), frame, name=name, max_events=max_events, **common)
        taken = taken | match
        specs.append(ModalitySpec(name=name, kind="irregular_series", columns=[name]))
    if has_text:
        text_groups = notes or {"notes": [""]}
        for name, prefixes in text_groups.items():
            if store is not None:  # out of core: references; the notes featurizer builds its notes store
                codes = [p for p in prefixes if p] if "" not in prefixes and prefixes else None
                match = timed.filter(pl.col("text_value").is_not_null() & _prefix_filter(prefixes))
                if notes is None and not match.head(1).select(pl.len()).collect(engine="streaming").item():
                    continue
                frame = frame.with_columns(pl.struct(subject_id=pl.col("subject_id").cast(pl.Int64),
                                                     prediction_time="prediction_time").alias(name))
                options = {"events": str(root), "store": str(store), "time_unit": time_unit, "text_column": "text_value",
                           "codes": codes, "window": window if not isinstance(window, dt.timedelta)
                           else f"{window.total_seconds()}s"}
                specs.append(ModalitySpec(name=name, kind="notes", columns=[name],
                                          options={k: v for k, v in options.items() if v is not None}))
                continue
            txt = timed.filter(pl.col("text_value").is_not_null() & _prefix_filter(prefixes))
            frame = notes_to_frame(txt, frame, name=name, text_column="text_value", **common)
            if notes is not None or frame[name].is_not_null().any():
                specs.append(ModalitySpec(name=name, kind="notes", columns=[name]))
            else:
                frame = frame.drop(name)
    task = LABEL_VALUE_COLUMNS[label][0]
    y = frame[label].cast(pl.Int64).to_numpy() if label == "boolean_value" else frame[label].to_numpy()
    name = (meta.get("dataset_metadata") or {}).get("dataset_name") or root.name or "meds"
    return Cohort(
        name=str(name), frame=frame, modalities=specs, y=y, task=task, id_column="sample_id",
        target_columns=[label],
        description=(f"MEDS dataset {str(root)!r}: {frame.height} predictions for {frame['subject_id'].n_unique()} subjects; "
                     f"modalities {[s.name for s in specs]}; label {label!r}."),
        source=str(root), licence=str((meta.get("dataset_metadata") or {}).get("license") or "as the source dataset's"),
        extra=extra,
    )
