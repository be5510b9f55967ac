"""Long event tables -> one row per subject, leak-free.

Hospital data come out of a warehouse as long tables: measurements
``(subject_id, time, code, numeric_value)`` (the MEDS layout), measurements in a *wide*
layout (one row per timestamp, one column per variable), and notes ``(subject_id, time,
text)``. :func:`events_to_frame` and :func:`notes_to_frame` add one modality column to a
subjects frame (one row per prediction: id, prediction time, outcome):

* ``irregular_series``: ``list[struct{time: f64, code: str, value: f64}]``, sorted by time;
* ``notes``: ``list[struct{time: f64, text: str}]``, sorted by time.

Everything runs as one lazy polars query (join on the id, filter, sort, ``group_by`` /
``agg``): no Python loop over rows, and parquet/CSV scans are read lazily. **Events after
the prediction time are removed before aggregation**, so nothing recorded after the cutoff
can reach a model; the observation window can also start at a per-subject column
(admission time) or a fixed length before the cutoff (the last 48 h). A subject without
events in its window gets a null cell: the modality is absent for that subject.

Nothing is dropped silently (logger ``mmclin.datasets``; counts, columns and row indices, never
ids, values or note text): events whose id is not in the subjects frame,
events with a null id or time, and subject rows repeating another row's id and cutoff are
reported at WARNING; events after the cutoff or before the window start, and empty notes, at
INFO. With ``lazy=True`` nothing is computed, so nothing is counted or reported.

    >>> import polars as pl
    >>> subjects = pl.DataFrame({"subject_id": [1, 2], "prediction_time": [10.0, 5.0]})
    >>> labs = pl.DataFrame({"subject_id": [1, 1, 2, 2], "time": [2.0, 12.0, 1.0, 4.0],
    ...                      "code": ["HR", "HR", "HR", "LAC"], "numeric_value": [80.0, 200.0, 90.0, 2.1]})
    >>> out = events_to_frame(labs, subjects, name="labs")   # the event at t=12 is after subject 1's cutoff
    >>> out["labs"].to_list()[0]
    [{'time': -8.0, 'code': 'HR', 'value': 80.0}]
"""
from __future__ import annotations

import codecs
import contextlib
import datetime as dt
import functools
import gzip
import inspect
import logging
from pathlib import Path
from typing import Any, Literal

import polars as pl

__all__ = ["events_to_frame", "notes_to_frame", "scan_table", "readable_text", "first_invalid_utf8", "EVENT_DTYPE",
           "NOTE_DTYPE"]

EVENT_DTYPE = pl.List(pl.Struct({"time": pl.Float64, "code": pl.String, "value": pl.Float64}))
NOTE_DTYPE = pl.List(pl.Struct({"time": pl.Float64, "text": pl.String}))
_UNIT_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6, "d": 86400e6}
_ROW = "__mmclin_row"
log = logging.getLogger("mmclin.datasets")


def scan_table(source: Any, what: str = "events") -> pl.LazyFrame:
    """A lazy frame from a polars/pandas frame, a LazyFrame, or a parquet/CSV path (glob allowed).

    ``.csv.gz`` files are read eagerly (polars cannot scan compressed CSV lazily).
    """
    if isinstance(source, pl.LazyFrame):
        return source
    if isinstance(source, pl.DataFrame):
        return source.lazy()
    if isinstance(source, (str, Path)):
        path = str(source)
        low = path.lower()
        if low.endswith((".parquet", ".pq")) or (Path(path).is_dir() and not low.endswith(".csv")):
            target = path if not Path(path).is_dir() else str(Path(path) / "**" / "*.parquet")
            return pl.scan_parquet(target)
        if low.endswith(".csv.gz") or low.endswith(".tsv.gz"):
            if not Path(path).exists():
                raise FileNotFoundError(f"{what} file {path!r} does not exist")
            sep = "\t" if low.endswith(".tsv.gz") else ","
            with readable_text([(what, path)]):
                return pl.read_csv(path, separator=sep, infer_schema_length=10000, try_parse_dates=True).lazy()
        if low.endswith((".csv", ".tsv")):
            if "*" not in path and not Path(path).exists():
                raise FileNotFoundError(f"{what} file {path!r} does not exist")
            return pl.scan_csv(path, separator="\t" if low.endswith(".tsv") else ",", infer_schema_length=10000,
                               try_parse_dates=True)
        raise ValueError(f"{what} {path!r}: expected a .parquet, .csv, .tsv or .csv.gz file (or a folder of parquet files)")
    try:
        import pandas as pd

        if isinstance(source, pd.DataFrame):
            return pl.from_pandas(source).lazy()
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"{what}: expected a polars/pandas frame, a LazyFrame or a file path, got {type(source).__name__}")


def _text_files(source: Any) -> list[Path]:
    """The CSV/TSV files behind a path source (glob expanded); none for frames and parquet."""
    if not isinstance(source, (str, Path)) or not str(source).lower().endswith((".csv", ".tsv", ".csv.gz", ".tsv.gz")):
        return []
    if any(ch in str(source) for ch in "*?["):
        import glob

        return [Path(p) for p in sorted(glob.glob(str(source)))]
    return [Path(source)]


def first_invalid_utf8(path: str | Path) -> tuple[int, int, bytes] | None:
    """``(byte offset, line, bad bytes)`` of the first byte sequence that is not UTF-8, or None.

    Offsets of ``.gz`` files count uncompressed bytes. Streams the file in 1 MiB chunks.
    """
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    decoder = codecs.getincrementaldecoder("utf-8")()
    fed = lines = 0
    with opener(path, "rb") as fh:
        while True:
            chunk = fh.read(1 << 20)
            pending = len(decoder.getstate()[0])  # an incomplete sequence carried from the last chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                data = err.object  # pending bytes + this chunk; pending ones hold no newline
                return fed - pending + err.start, lines + data[:err.start].count(b"\n") + 1, bytes(data[err.start:err.end])
            if not chunk:
                return None
            lines += chunk.count(b"\n")
            fed += len(chunk)


@contextlib.contextmanager
def readable_text(sources: Any):
    """Turn polars' bare "invalid utf-8 sequence" into an error naming the file, offset and line.

    ``sources``: ``[(what, path or frame), ...]``, or a callable returning it (called only on error)."""
    try:
        yield
    except pl.exceptions.ComputeError as err:
        if "utf-8" not in str(err).lower() and "utf8" not in str(err).lower():
            raise
        for what, source in (sources() if callable(sources) else sources):
            for path in _text_files(source):
                bad = first_invalid_utf8(path)
                if bad is not None:
                    offset, line, seq = bad
                    name = what if " file " in what else f"{what} file {str(path)!r}"
                    raise ValueError(
                        f"{name} is not valid UTF-8: byte(s) {seq.hex(' ').upper()} at byte offset "
                        f"{offset}{' (uncompressed)' if str(path).lower().endswith('.gz') else ''}, line {line}; "
                        "re-encode it as UTF-8 (e.g. iconv -f latin1 -t utf-8), or read it yourself with "
                        "pl.read_csv(path, encoding='utf8-lossy') (undecodable bytes become U+FFFD) and pass the frame"
                    ) from None
        raise


def _explain_decode_errors(func: Any) -> Any:
    """Decorator: decoding errors of the first two (table) arguments name the file (see readable_text)."""
    sig = inspect.signature(func)
    first, second = list(sig.parameters)[:2]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = sig.bind_partial(*args, **kwargs).arguments
        with readable_text([(first, bound.get(first)), ("subjects", bound.get(second))]):
            return func(*args, **kwargs)

    return wrapper


def _first_bad(frame: pl.LazyFrame, bad: pl.Expr, column: str) -> tuple[int, Any] | None:
    """``(row index, value)`` of the first row where ``bad`` holds (for error messages)."""
    hit = (frame.select(pl.int_range(pl.len(), dtype=pl.Int64).alias(_ROW), pl.col(column), bad.alias("__bad"))
           .filter(pl.col("__bad")).head(1).collect())
    return (int(hit[_ROW][0]), hit[column][0]) if hit.height else None


def _check_numbers(frame: pl.LazyFrame, schema: pl.Schema, column: str, what: str, hint: str = "") -> None:
    """A value column must be numeric; a text column names its first row that is not a number."""
    dtype = schema[column]
    if dtype.is_numeric() or dtype == pl.Null:
        return
    where = ""
    if dtype == pl.String:
        hit = _first_bad(frame, pl.col(column).is_not_null()
                         & pl.col(column).str.strip_chars().cast(pl.Float64, strict=False).is_null(), column)
        if hit is not None:
            where = f" (row {hit[0]}: {hit[1]!r} is not a number)"
    raise ValueError(f"{what} column {column!r} has dtype {dtype}{where}; expected numeric values{hint}")


def _check_time_column(frame: pl.LazyFrame, schema: pl.Schema, column: str, what: str) -> None:
    """Like _check_time, and a text column names its first row that does not parse as a datetime."""
    dtype = schema[column]
    if dtype == pl.String:
        hit = None
        with contextlib.suppress(pl.exceptions.PolarsError):  # format inference itself may fail
            hit = _first_bad(frame, pl.col(column).is_not_null()
                             & pl.col(column).str.to_datetime(strict=False).is_null(), column)
        if hit is not None:
            raise ValueError(f"{what} column {column!r} has dtype String: row {hit[0]} ({hit[1]!r}) is not a "
                             "datetime; fix or drop such rows, then parse the column (pl.col(c).str.to_datetime())")
    _check_time(dtype, column, what)


def _null_stats(frame: pl.LazyFrame, id_column: str, time_column: str) -> pl.LazyFrame:
    """Counts (and first row index) of rows with a null id or a null time: they are dropped."""
    no_id = pl.col(id_column).is_null()
    no_time = pl.col(id_column).is_not_null() & pl.col(time_column).is_null()
    return frame.select(no_id.sum().alias("null_id"), no_id.arg_true().first().alias("null_id_row"),
                        no_time.sum().alias("null_time"), no_time.arg_true().first().alias("null_time_row"))


def _report(stats: dict[str, Any], *, what: str, name: str, id_column: str, time_column: str) -> None:
    """Log what was left out (counts, columns, row indices: never ids, values or text)."""
    unit = "note(s)" if what == "notes" else "event(s)"
    if stats.get("null_id"):
        log.warning("%s for modality %r: %d %s with a null %r were dropped (first at %s row %d)", what, name,
                    stats["null_id"], unit, id_column, what, stats["null_id_row"])
    if stats.get("null_time"):
        log.warning("%s for modality %r: %d %s with a null %r were dropped (first at %s row %d); an undated %s "
                    "cannot be placed before or after a prediction time", what, name, stats["null_time"], unit,
                    time_column, what, stats["null_time_row"], unit[:-3])
    if stats.get("orphan_events"):
        # counts only: a log is no place for patient ids (an anti-join of the two tables lists them)
        log.warning("%s for modality %r: %d %s of %d %r value(s) not in the subjects frame were not used; "
                    "check that both tables use the same ids", what, name, stats["orphan_events"], unit,
                    stats["orphan_ids"], id_column)
    if stats.get("duplicate_rows"):
        log.warning("subjects: %d row(s) repeat another row's %r and prediction time, so they get the same %s for "
                    "modality %r (drop duplicates unless intended)", stats["duplicate_rows"], id_column, unit, name)
    if stats.get("empty_text"):
        log.info("notes for modality %r: %d note(s) with empty or whitespace-only text dropped (an empty note is "
                 "no note)", name, stats["empty_text"])
    parts = [f"{stats[k]} {unit} {label}" for k, label in (("after_cutoff", "after the prediction time"),
                                                           ("before_start", "before the window start")) if stats.get(k)]
    if parts:
        log.info("%s for modality %r: %s excluded before aggregation (counted once per prediction row)", what, name,
                 " and ".join(parts))


def _need(schema: pl.Schema, columns: list[str], what: str, hint: str = "") -> None:
    import difflib

    missing = [c for c in columns if c not in schema]
    if missing:
        c = missing[0]
        close = difflib.get_close_matches(c, list(schema), n=1)
        suggestion = f" (did you mean {close[0]!r}?)" if close else ""
        table = what if " file " in what else f"the {what} table"
        raise ValueError(f"{table} has no column {c!r}{suggestion}; its columns are {list(schema)[:15]}{hint}")


def _is_time(dtype: pl.DataType) -> bool:
    return isinstance(dtype, (pl.Datetime, pl.Date))


def _check_time(dtype: pl.DataType, column: str, what: str) -> None:
    if not (dtype.is_numeric() or _is_time(dtype)):
        raise ValueError(f"{what} column {column!r} has dtype {dtype}; expected a number (hours, days, ...) or a "
                         "datetime (parse it first, e.g. pl.col(c).str.to_datetime())")


def _offset(window: Any, is_time: bool) -> pl.Expr:
    if is_time:
        if isinstance(window, str):
            return pl.duration(**_parse_duration(window))
        if isinstance(window, dt.timedelta):
            return pl.lit(window)
        raise ValueError(f"window={window!r}: with datetime times give a timedelta or a string like '48h' / '7d'")
    if isinstance(window, (int, float)) and not isinstance(window, bool):
        return pl.lit(float(window))
    raise ValueError(f"window={window!r}: with numeric times give a number in the time column's units")


def _parse_duration(text: str) -> dict[str, float]:
    import re

    m = re.fullmatch(r"\s*([0-9.]+)\s*(s|m|h|d|w)\s*", text)
    if not m:
        raise ValueError(f"window={text!r}: expected a duration like '48h', '30m', '7d' or '2w'")
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[m.group(2)]
    return {unit: float(m.group(1))}


def _prepare(
    events: Any, subjects: Any, *, id_column: str, time_column: str, prediction_time: str | float | None,
    window: Any, window_start: str | None, relative_to: str | None, time_unit: str, what: str,
) -> tuple[pl.LazyFrame, pl.LazyFrame, pl.Expr, pl.LazyFrame]:
    """Join events to subject rows and keep only each row's observation window (before aggregation).

    Also returns a one-row frame of counts of what was left out (see :func:`_report`)."""
    ev = scan_table(events, what)
    subj = scan_table(subjects, "subjects")
    ev_schema, subj_schema = ev.collect_schema(), subj.collect_schema()
    _need(ev_schema, [id_column, time_column], what)
    _need(subj_schema, [id_column], "subjects")
    time_dtype = ev_schema[time_column]
    _check_time(time_dtype, time_column, what)
    is_time = _is_time(time_dtype)
    if time_unit not in _UNIT_US:
        raise ValueError(f"time_unit={time_unit!r}: choose one of {sorted(_UNIT_US)}")
    a, b = ev_schema[id_column], subj_schema[id_column]
    if a != b and not (a.is_integer() and b.is_integer()) and pl.Null not in (a, b):
        raise ValueError(f"{what} column {id_column!r} has dtype {a} but subjects column {id_column!r} has dtype {b}; "
                         f"the ids cannot match: cast one of them (e.g. pl.col({id_column!r}).cast(pl.{b}))")

    subj = subj.with_row_index(_ROW)
    keys = [pl.col(_ROW), pl.col(id_column)]
    if isinstance(prediction_time, str):
        _need(subj_schema, [prediction_time], "subjects",
              "; prediction_time names the subjects' column with each row's cutoff (or pass a constant, or None "
              "if the events were already cut)")
        _check_time(subj_schema[prediction_time], prediction_time, "subjects")
        if _is_time(subj_schema[prediction_time]) != is_time:
            raise ValueError(f"subjects column {prediction_time!r} is {subj_schema[prediction_time]} but {what} column "
                             f"{time_column!r} is {time_dtype}; both must be datetimes or both numbers")
        keys.append(pl.col(prediction_time).alias("__cut"))
    elif prediction_time is not None:
        keys.append(pl.lit(prediction_time).alias("__cut"))
    if window_start is not None:
        _need(subj_schema, [window_start], "subjects")
        keys.append(pl.col(window_start).alias("__start"))
    key_frame = subj.select(keys)
    if isinstance(prediction_time, str):
        bad = key_frame.filter(pl.col("__cut").is_null()).select(_ROW, id_column).head(1).collect()
        if bad.height:
            raise ValueError(f"subjects row {bad[_ROW][0]} ({id_column}={bad[id_column][0]!r}) has no prediction time "
                             f"in column {prediction_time!r}; every row needs a cutoff")

    if window is not None:
        if prediction_time is None:
            raise ValueError("window= counts back from the prediction time: give prediction_time too")
        lo = pl.col("__cut") - _offset(window, is_time)
        lo = pl.max_horizontal(lo, pl.col("__start")) if window_start is not None else lo
        key_frame = key_frame.with_columns(lo.alias("__start"))
    elif window_start is None:
        key_frame = key_frame.with_columns(pl.lit(None, dtype=time_dtype).alias("__start"))

    reference = {"prediction_time": "__cut", "window_start": "__start", None: None}
    if relative_to not in reference:
        raise ValueError(f"relative_to={relative_to!r}: choose 'prediction_time', 'window_start' or None")
    ref = reference[relative_to]
    if ref == "__cut" and prediction_time is None:
        raise ValueError("relative_to='prediction_time' needs prediction_time; pass relative_to=None for raw times")
    if ref == "__start" and window is None and window_start is None:
        raise ValueError("relative_to='window_start' needs window= or window_start=")

    dated = ev.filter(pl.col(id_column).is_not_null() & pl.col(time_column).is_not_null())
    # one left join (cached) serves both the events kept and the counts of those left out: events of ids
    # not in the subjects frame have no subject row; the others are counted against their row's window
    linked = dated.join(key_frame, on=id_column, how="left").cache()
    orphan = pl.col(_ROW).is_null()
    cut_key = [id_column, "__cut"] if "__cut" in key_frame.collect_schema() else [id_column]
    dups = key_frame.select((pl.len() - pl.struct(cut_key).n_unique()).alias("duplicate_rows"))
    t = pl.col(time_column)
    counts = linked.select(
        orphan.sum().alias("orphan_events"), pl.col(id_column).filter(orphan).n_unique().alias("orphan_ids"),
        ((t > pl.col("__cut")).sum() if prediction_time is not None else pl.lit(0)).alias("after_cutoff"),
        ((t < pl.col("__start")).sum() if (window is not None or window_start is not None) else pl.lit(0))
        .alias("before_start"))
    stats = pl.concat([counts, dups], how="horizontal")
    joined = linked.filter(~orphan)
    # the cutoff and the window are applied here, BEFORE any aggregation
    if prediction_time is not None:
        joined = joined.filter(pl.col(time_column) <= pl.col("__cut"))
    if window is not None or window_start is not None:
        joined = joined.filter(pl.col("__start").is_null() | (pl.col(time_column) >= pl.col("__start")))
    t = pl.col(time_column)
    if ref is not None:
        diff = t - pl.col(ref)
        rel = (diff.dt.total_microseconds().cast(pl.Float64) / _UNIT_US[time_unit]) if is_time else diff.cast(pl.Float64)
    else:
        rel = (t.cast(pl.Datetime("us")).dt.epoch("us").cast(pl.Float64) / _UNIT_US[time_unit]) if is_time else t.cast(pl.Float64)
    return joined, subj, rel.alias("time"), stats


def _finish(subj: pl.LazyFrame, agg: pl.LazyFrame, name: str, max_events: int | None, lazy: bool,
            stats: pl.LazyFrame, **where: str) -> Any:
    if max_events is not None:
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {max_events}")
        agg = agg.with_columns(pl.col(name).list.tail(max_events))  # the most recent ones
    out = subj.join(agg, on=_ROW, how="left", maintain_order="left").drop(_ROW)
    if lazy:
        return out
    out, counts = pl.collect_all([out, stats])  # one pass: the scans are shared
    _report(counts.row(0, named=True), name=name, **where)
    return out


@_explain_decode_errors
def events_to_frame(
    events: Any,
    subjects: Any,
    *,
    name: str = "events",
    id_column: str = "subject_id",
    time_column: str = "time",
    code_column: str = "code",
    value_column: str | None = "numeric_value",
    layout: Literal["meds", "wide"] = "meds",
    value_columns: list[str] | None = None,
    prediction_time: str | float | None = "prediction_time",
    window: Any = None,
    window_start: str | None = None,
    relative_to: str | None = "prediction_time",
    time_unit: str = "h",
    max_events: int | None = None,
    lazy: bool = False,
) -> pl.DataFrame | pl.LazyFrame:
    """``subjects`` plus one ``irregular_series`` column ``name``: each row's events in its window.

    Args:
        events: long table (polars/pandas frame, LazyFrame, or parquet/CSV path).
            ``layout="meds"``: columns ``id_column, time_column, code_column, value_column``
            (``value_column=None`` or a null value: a code-only event). ``layout="wide"``: one row
            per ``(id, time)``, one column per variable (``value_columns``, default all other
            numeric columns); each non-null cell becomes an event whose code is the column name.
        subjects: one row per prediction (id, prediction time, outcome, baseline columns);
            several rows may share an id (several prediction times); all columns are kept.
        prediction_time: the subjects' column holding each row's cutoff, a constant, or None
            (events already cut). Events with ``time <= cutoff`` are kept.
        window: keep only events within this long before the cutoff (number in the time
            column's units; a ``timedelta`` or ``"48h"`` for datetimes).
        window_start: subjects' column where the window opens (e.g. admission time).
        relative_to: ``"prediction_time"`` (times <= 0), ``"window_start"`` (times >= 0) or None.
        time_unit: unit of the output ``time`` for datetime inputs (``"h"``, ``"d"``, ...).
        max_events: keep only each row's most recent ``max_events`` events.
        lazy: return the LazyFrame (nothing computed yet).

    Returns:
        ``subjects`` (row order kept) with column ``name`` of dtype
        ``list[struct{time: f64, code: str, value: f64}]`` sorted by time; null where a row
        has no event in its window.
    """
    what = _label("events", events)
    ev = scan_table(events, what)
    schema = ev.collect_schema()
    _need(schema, [id_column, time_column], what)
    _check_time_column(ev, schema, time_column, what)
    nulls = _null_stats(ev, id_column, time_column)
    if layout == "wide":
        cols = value_columns or [c for c, d in schema.items() if c not in (id_column, time_column) and d.is_numeric()]
        if not cols:
            raise ValueError("layout='wide': the events table has no numeric variable columns; pass value_columns=[...]")
        _need(schema, cols, what)
        for c in cols:
            _check_numbers(ev, schema, c, f"layout='wide': {what}")
        ev = (ev.select(id_column, time_column, *[pl.col(c).cast(pl.Float64) for c in cols])
              .unpivot(index=[id_column, time_column], on=cols, variable_name="__code", value_name="__value")
              .drop_nulls("__value"))
    elif layout == "meds":
        _need(schema, [id_column, time_column, code_column] + ([value_column] if value_column else []), what)
        if value_column:
            _check_numbers(ev, schema, value_column, what, " (text values belong in notes_to_frame)")
        ev = ev.select(id_column, time_column, pl.col(code_column).cast(pl.String).alias("__code"),
                       (pl.col(value_column) if value_column else pl.lit(None)).cast(pl.Float64).alias("__value"))
    else:
        raise ValueError(f"layout={layout!r}: choose 'meds' or 'wide'")
    joined, subj, rel, stats = _prepare(ev, subjects, id_column=id_column, time_column=time_column,
                                        prediction_time=prediction_time, window=window, window_start=window_start,
                                        relative_to=relative_to, time_unit=time_unit, what=what)
    # sorting inside each group is cheaper than one global sort; code and value break ties, so
    # the order is deterministic whatever order the (multi-threaded) join produced
    agg = (joined.select(_ROW, rel, pl.col("__code").alias("code"), pl.col("__value").alias("value"))
           .group_by(_ROW)
           .agg(pl.struct("time", "code", "value").sort_by("time", "code", "value", nulls_last=True).alias(name)))
    _check_name(subj, name)
    return _finish(subj, agg, name, max_events, lazy, pl.concat([nulls, stats], how="horizontal"), what="events",
                   id_column=id_column, time_column=time_column)


@_explain_decode_errors
def notes_to_frame(
    notes: Any,
    subjects: Any,
    *,
    name: str = "notes",
    id_column: str = "subject_id",
    time_column: str = "time",
    text_column: str = "text",
    prediction_time: str | float | None = "prediction_time",
    window: Any = None,
    window_start: str | None = None,
    relative_to: str | None = "prediction_time",
    time_unit: str = "h",
    max_notes: int | None = None,
    lazy: bool = False,
) -> pl.DataFrame | pl.LazyFrame:
    """``subjects`` plus one ``notes`` column ``name``: ``list[struct{time: f64, text: str}]``.

    Same window rules as :func:`events_to_frame` (notes written after the cutoff are removed
    before aggregation; use the time a note became *available*, e.g. MIMIC's ``storetime``).
    A note whose text is null, empty or whitespace only is *no note* (dropped, counted at INFO):
    a subject whose only notes are empty gets a null cell (notes absent), never a present
    row of empty notes. The notes featurizer applies the same rule to frames built by hand.
    """
    what = _label("notes", notes)
    nt = scan_table(notes, what)
    schema = nt.collect_schema()
    _need(schema, [id_column, time_column, text_column], what)
    if schema[text_column] not in (pl.String, pl.Null):
        hint = " (binary: decode it first, e.g. pl.col(c).cast(pl.String))" if schema[text_column] == pl.Binary else ""
        raise ValueError(f"{what} column {text_column!r} has dtype {schema[text_column]}; expected text (String){hint}")
    _check_time_column(nt, schema, time_column, what)
    nulls = _null_stats(nt, id_column, time_column)
    text = pl.col("__text").cast(pl.String)
    empty = text.is_null() | (text.str.strip_chars().str.len_chars() == 0)
    nt = nt.select(id_column, time_column, pl.col(text_column).alias("__text"))
    dated = pl.col(id_column).is_not_null() & pl.col(time_column).is_not_null()
    nulls = pl.concat([nulls, nt.select((empty & dated).sum().alias("empty_text"))], how="horizontal")
    nt = nt.filter(~empty).with_columns(text)
    joined, subj, rel, stats = _prepare(nt, subjects, id_column=id_column, time_column=time_column,
                                        prediction_time=prediction_time, window=window, window_start=window_start,
                                        relative_to=relative_to, time_unit=time_unit, what=what)
    agg = (joined.select(_ROW, rel, pl.col("__text").alias("text"))
           .group_by(_ROW)
           .agg(pl.struct("time", "text").sort_by("time", "text").alias(name)))
    _check_name(subj, name)
    return _finish(subj, agg, name, max_notes, lazy, pl.concat([nulls, stats], how="horizontal"), what="notes",
                   id_column=id_column, time_column=time_column)


def _label(what: str, source: Any) -> str:
    """How errors name a table: ``"events"`` or ``"events file '/data/labs.csv'"``."""
    return f"{what} file {str(source)!r}" if isinstance(source, (str, Path)) else what


def _check_name(subj: pl.LazyFrame, name: str) -> None:
    if name in subj.collect_schema():
        raise ValueError(f"the subjects frame already has a column {name!r}; choose another name= for the modality")
