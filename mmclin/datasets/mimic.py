"""MIMIC-IV reader: hospital admissions -> a leak-free cohort (in-hospital mortality at hour N).

Reads the files of a local MIMIC-IV copy (credentialed access via PhysioNet; nothing is
downloaded), each as ``.csv.gz`` (as distributed), ``.csv`` or ``.parquet``, in the
published column layout:

* ``hosp/admissions``: subject_id, hadm_id, admittime, dischtime, deathtime, admission_type,
  admission_location, insurance, ..., hospital_expire_flag
* ``hosp/patients``: subject_id, gender, anchor_age, anchor_year, anchor_year_group, dod
* ``hosp/labevents`` (+ ``hosp/d_labitems``): subject_id, hadm_id, itemid, charttime, storetime, valuenum, ...
* ``icu/chartevents`` (+ ``icu/d_items``): subject_id, hadm_id, stay_id, charttime, storetime, itemid, valuenum, ...
* ``note/discharge``, ``note/radiology`` (MIMIC-IV-Note): note_id, subject_id, hadm_id, note_type,
  note_seq, charttime, storetime, text

One row per admission still in hospital (alive) at ``admittime + prediction_hours``; the
prediction time is that instant and the window opens at admission. Measurements and notes
are timed by ``storetime`` (when the result or report became available; ``charttime`` where
it is missing), so a lab drawn before the prediction time but resulted after it is not used,
and discharge summaries (written at discharge) never are. Outcome: ``hospital_expire_flag``.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import polars as pl

from mmclin.cohort import Cohort, ModalitySpec
from mmclin.datasets.events import events_to_frame, notes_to_frame, readable_text, scan_table

__all__ = ["read_mimic_iv"]


def _find(root: Path, name: str, required: bool = True) -> Path | None:
    for suffix in (".parquet", ".csv.gz", ".csv"):
        p = root / f"{name}{suffix}"
        if p.exists():
            return p
    if required:
        raise FileNotFoundError(f"MIMIC-IV file {name!r} not found under {str(root)!r} (looked for {name}.parquet, "
                                f"{name}.csv.gz, {name}.csv)")
    return None


def _scan(path: Path, what: str, needed: list[str]) -> pl.LazyFrame:
    frame = scan_table(str(path), what)
    cols = frame.collect_schema()
    missing = [c for c in needed if c not in cols]
    if missing:
        raise ValueError(f"{str(path)!r} ({what}) lacks columns {missing}; expected the MIMIC-IV layout with {needed}; "
                         f"it has columns {list(cols)[:20]}")
    return frame


def _timed(frame: pl.LazyFrame, time_field: str) -> pl.LazyFrame:
    schema = frame.collect_schema()
    frame = frame.with_columns(*[_dt(c, schema[c]) for c in ("charttime", "storetime") if c in schema])
    if time_field == "storetime" and "storetime" in schema:
        return frame.with_columns(pl.coalesce("storetime", "charttime").alias("__time"))
    return frame.with_columns(pl.col("charttime").alias("__time"))


def _dt(col: str, dtype: pl.DataType) -> pl.Expr:
    if isinstance(dtype, pl.Datetime):
        return pl.col(col).cast(pl.Datetime("us"))
    return pl.col(col).cast(pl.String).str.to_datetime("%Y-%m-%d %H:%M:%S", strict=False, time_unit="us")


def _measurements(path: Path, dictionary: Path | None, prefix: str, itemids: list[int] | None, time_field: str) -> pl.LazyFrame:
    ev = _scan(path, prefix, ["subject_id", "itemid", "charttime", "valuenum"])
    if itemids is not None:
        ev = ev.filter(pl.col("itemid").is_in(list(itemids)))
    ev = _timed(ev, time_field).filter(pl.col("valuenum").is_not_null())
    code = pl.format(prefix + "//{}", pl.col("itemid"))
    if dictionary is not None:
        names = _scan(dictionary, f"{prefix} dictionary", ["itemid", "label"]).select("itemid", "label")
        ev = ev.join(names, on="itemid", how="left")
        code = pl.when(pl.col("label").is_not_null()).then(pl.format(prefix + "//{}//{}", "itemid", "label")).otherwise(code)
    return ev.select("subject_id", pl.col("__time").alias("time"), code.alias("code"),
                     pl.col("valuenum").cast(pl.Float64).alias("numeric_value"))


def _text_files_under(root: str | Path) -> list[tuple[str, str]]:
    files = (p for p in sorted(Path(root).rglob("*")) if p.name.lower().endswith((".csv", ".csv.gz")))
    return [("MIMIC-IV", str(p)) for p in files]


def _named_decode_errors(func: Any) -> Any:
    """A file that is not UTF-8 is named with its byte offset (see events.readable_text)."""
    @functools.wraps(func)
    def wrapper(root: str | Path, *args: Any, **kwargs: Any) -> Any:
        with readable_text(lambda: _text_files_under(root)):
            return func(root, *args, **kwargs)

    return wrapper


def _check_times(frame: pl.LazyFrame, path: Path, schema: pl.Schema) -> None:
    """admittime / dischtime must parse in every row, deathtime wherever it is given: a silently
    null time would move an admission out of the cohort (or its death out of the outcome)."""
    for c in ("admittime", "dischtime", "deathtime"):
        parsed = _dt(c, schema[c])
        bad = parsed.is_null() & (pl.col(c).is_not_null() if c == "deathtime" else pl.lit(True))
        hit = (frame.select(pl.int_range(pl.len(), dtype=pl.Int64).alias("__row"), pl.col(c), bad.alias("__bad"))
               .filter("__bad").head(1).collect())
        if hit.height:
            value = hit[c][0]
            what = "is missing" if value is None else f"{str(value)!r} is not a 'YYYY-MM-DD HH:MM:SS' datetime"
            raise ValueError(f"{str(path)!r} (admissions) row {hit['__row'][0]}: {c} {what}")


@_named_decode_errors
def read_mimic_iv(
    root: str | Path,
    *,
    prediction_hours: float = 48.0,
    lab_itemids: list[int] | None = None,
    chart_itemids: list[int] | None = None,
    note_types: tuple[str, ...] = ("radiology", "discharge"),
    time_field: str = "storetime",
    max_events: int | None = 1024,
) -> Cohort:
    """In-hospital mortality from the first ``prediction_hours`` of each admission.

    Args:
        root: the MIMIC-IV folder (with ``hosp/``, optionally ``icu/`` and ``note/``).
        prediction_hours: hours after admission at which the prediction is made.
        lab_itemids, chart_itemids: restrict to these ``itemid``s (default: all numeric ones).
        note_types: which ``note/`` tables to read when present.
        time_field: ``"storetime"`` (when a value became available; default) or ``"charttime"``.
        max_events: each admission's most recent events kept per modality.

    Returns:
        ``Cohort`` (binary) with columns ``hadm_id`` (id), ``subject_id`` (group: a patient may
        have several admissions), static ``age, gender, admission_type, admission_location,
        insurance``, ``labs`` / ``chart`` (irregular_series, hours before the prediction time),
        ``notes`` (when note tables exist) and ``hospital_expire_flag``. Excluded admissions
        (discharged or dead before the prediction time) are counted in the description.
    """
    if time_field not in ("storetime", "charttime"):
        raise ValueError(f"time_field={time_field!r}: choose 'storetime' or 'charttime'")
    root = Path(root)
    hosp = root / "hosp"
    adm_path = _find(hosp, "admissions")
    adm = _scan(adm_path, "admissions",
                ["subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "hospital_expire_flag"])
    schema = adm.collect_schema()
    _check_times(adm, adm_path, schema)
    adm = adm.with_columns(*[_dt(c, schema[c]) for c in ("admittime", "dischtime", "deathtime")])
    pat = _scan(_find(hosp, "patients"), "patients", ["subject_id", "gender", "anchor_age", "anchor_year"])
    cut = pl.col("admittime") + pl.duration(hours=prediction_hours)
    all_adm = adm.join(pat.select("subject_id", "gender", "anchor_age", "anchor_year"), on="subject_id", how="left").with_columns(
        cut.alias("prediction_time"),
        (pl.col("anchor_age") + pl.col("admittime").dt.year() - pl.col("anchor_year")).cast(pl.Float64).alias("age"),
    ).collect()
    # still in hospital and alive at the prediction time: otherwise there is nothing to predict
    eligible = (pl.col("dischtime") > pl.col("prediction_time")) & (
        pl.col("deathtime").is_null() | (pl.col("deathtime") > pl.col("prediction_time")))
    subjects = all_adm.filter(eligible).sort("hadm_id")
    n_excluded = all_adm.height - subjects.height
    if subjects.is_empty():
        raise ValueError(f"no admission in {str(root)!r} lasts longer than {prediction_hours} h; nothing to predict")
    static = [c for c in ("age", "gender", "admission_type", "admission_location", "insurance") if c in subjects.columns]
    frame = subjects.select("hadm_id", "subject_id", "admittime", "prediction_time", *static, "hospital_expire_flag")
    common: dict[str, Any] = dict(id_column="subject_id", time_column="time", prediction_time="prediction_time",
                                  window_start="admittime", relative_to="prediction_time", time_unit="h",
                                  max_events=max_events)
    specs = [ModalitySpec(name="static", kind="tabular", columns=static)]
    sources = [("labs", _find(hosp, "labevents", False), _find(hosp, "d_labitems", False), "LAB", lab_itemids)]
    icu = root / "icu"
    sources.append(("chart", _find(icu, "chartevents", False), _find(icu, "d_items", False), "CHART", chart_itemids))
    for name, path, dictionary, prefix, itemids in sources:
        if path is None:
            continue
        frame = events_to_frame(_measurements(path, dictionary, prefix, itemids, time_field), frame, name=name, **common)
        specs.append(ModalitySpec(name=name, kind="irregular_series", columns=[name]))
    note_frames = []
    for kind in note_types:
        path = _find(root / "note", kind, False)
        if path is not None:
            nt = _timed(_scan(path, f"{kind} notes", ["subject_id", "charttime", "text"]), time_field)
            note_frames.append(nt.select("subject_id", pl.col("__time").alias("time"), pl.col("text").cast(pl.String)))
    if note_frames:
        frame = notes_to_frame(pl.concat(note_frames), frame, name="notes",
                               **{k: v for k, v in common.items() if k != "max_events"})
        specs.append(ModalitySpec(name="notes", kind="notes", columns=["notes"]))
    frame = frame.drop("admittime", "prediction_time").with_columns(pl.col("hospital_expire_flag").cast(pl.Int64))
    y = frame["hospital_expire_flag"].to_numpy()
    return Cohort(
        name="mimic_iv", frame=frame, modalities=specs, y=y, task="binary", id_column="hadm_id",
        target_columns=["hospital_expire_flag"],
        description=(f"MIMIC-IV admissions in hospital at hour {prediction_hours:g}: {frame.height} admissions of "
                     f"{frame['subject_id'].n_unique()} patients, {int(y.sum())} in-hospital deaths; {n_excluded} "
                     f"admission(s) excluded (discharged or dead before hour {prediction_hours:g}). Events timed by "
                     f"{time_field}."),
        source=f"MIMIC-IV at {str(root)!r} (Johnson et al., Sci Data 2023; PhysioNet)",
        licence="PhysioNet Credentialed Health Data License 1.5.0 (the user's own copy; mmclin ships no MIMIC data)",
        extra={"group_column": "subject_id", "n_excluded": n_excluded, "prediction_hours": prediction_hours},
    )
