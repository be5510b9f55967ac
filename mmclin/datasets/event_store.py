"""Out-of-core event store: a long event table on disk -> per-subject flat arrays, memory-mapped.

At hospital scale (10^8 - 10^9 events) the event table is never held in memory. The store is
built once from the files (a MEDS dataset's ``data/**/*.parquet`` shards, or any long parquet /
CSV table) and holds every subject's events, sorted by ``(time, code, value)``, as flat ``.npy``
arrays plus per-subject offsets:

    <store>/<key>/subjects.npy  int64 [S]      subject ids (in storage order)
                  offsets.npy   int64 [S + 1]  subject i owns events offsets[i]:offsets[i + 1]
                  time.npy      int64 [E]      microseconds since 1970 (datetimes) or float64 (numbers)
                  code.npy      int32 [E]      index into codes.json (-1: no code)
                  value.npy     float [E]      NaN where the event has no value (float32 kept as float32)
                  codes.json, manifest.json

It is read with ``np.load(mmap_mode="r")``: a batch touches only its rows' pages. A *sample* (a
subject at a prediction time) is a window into its subject's events found by binary search:
events with ``time <= cutoff`` (and ``>= window start``). The cutoff is applied per sample when
rows are indexed, so one store serves every label file, fold and run, and no event after a
sample's cutoff is ever read for it.

Building streams: one pass over the id column (run-length encoded, one row group at a time) plans
partitions of about ``partition_events`` rows. When every subject's rows are contiguous in one
file (MEDS shards) a partition is a row range of one file cut at subject boundaries, read once by
row group with codes kept dictionary-encoded; otherwise it is a range of subject ids read with a
filter from every file. Each partition is sorted where needed (MEDS shards only need ties within
one time ordered) and appended to the flat files. The key (the store folder's name) hashes the
input files (path, size, mtime), the columns and the code filters. Builds are atomic (a hidden
``.<key>.partial`` folder renamed into place when complete: no visible partial store), resumable
(``progress.json`` records the finished partitions; a killed build is truncated back to them and
continues) and locked (two processes never build one store together: DDP ranks wait, then reuse).
Peak memory: one partition plus one entry per subject, whatever the number of events.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import glob
import hashlib
import json
import logging
import os
import shutil
import time as _time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import polars as pl

from mmclin.persistence.atomic import check_writable_parent, refused_write, write_json_atomic

__all__ = ["EventSource", "EventStore", "NoteStore", "event_source", "open_event_store", "default_store_dir",
           "events_to_store", "notes_to_store", "STORE_OPTIONS"]

FORMAT_VERSION = 1
log = logging.getLogger("mmclin.datasets")
PARTITION_EVENTS = 2_000_000  # ~16 MB arrays: reused by malloc (fresh pages are slow to fault in)
# the ModalitySpec options that say where a store-backed modality's events come from
STORE_OPTIONS = ("events", "store", "id_column", "time_column", "code_column", "value_column", "text_column",
                 "codes", "exclude_codes", "time_unit", "window", "partition_events")
_UNIT_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6, "d": 86400e6}


def default_store_dir() -> Path:
    """``$MMCLIN_STORE_DIR``, else ``$XDG_CACHE_HOME/mmclin/event_stores`` (``~/.cache/...``)."""
    if os.environ.get("MMCLIN_STORE_DIR"):
        return Path(os.environ["MMCLIN_STORE_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "mmclin" / "event_stores"


@dataclass(frozen=True)
class EventSource:
    """What a store is built from: files and how to read them (all of it goes into the store's key)."""

    files: tuple[str, ...]
    id_column: str = "subject_id"
    time_column: str = "time"
    code_column: str = "code"
    value_column: str | None = "numeric_value"
    text_column: str | None = None  # events with a non-null text here are notes, not series events (MEDS)
    codes: tuple[str, ...] = ()  # keep codes starting with one of these (empty: every code)
    exclude_codes: tuple[str, ...] = ()  # ... and starting with none of these
    kind: str = "events"  # "notes": the rows with a text (text_column), hashed by the notes featurizer
    text_key: str = ""  # notes: how texts become term counts (the text featurizer and its options)

    def options(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "files"}

    def key(self) -> str:
        """Hash of the format, the options and each file's path, size and modification time."""
        stats = []
        for f in self.files:
            st = os.stat(f)
            stats.append([f, st.st_size, st.st_mtime_ns])
        text = json.dumps([FORMAT_VERSION, self.options(), stats], sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    @property
    def all_parquet(self) -> bool:
        return all(f.lower().endswith((".parquet", ".pq")) for f in self.files)


def _is_meds_root(path: Path) -> bool:
    return path.is_dir() and (path / "data").is_dir()


def event_source(events: Any, *, id_column: str = "subject_id", time_column: str = "time", code_column: str = "code",
                 value_column: str | None = "numeric_value", text_column: str | None = None,
                 codes: Any = None, exclude_codes: Any = None, kind: str = "events", text_key: str = "") -> EventSource:
    """An :class:`EventSource` from a path (or list of paths): a MEDS dataset folder (its
    ``data/**/*.parquet``; events with a ``text_value`` are notes and left out), a folder of parquet
    files, a parquet/CSV file, or a glob. Every file's columns and types are checked here (parquet:
    from its metadata only), and a bad one is named with the column."""
    paths = events if isinstance(events, (list, tuple)) else [events]
    files: list[str] = []
    meds = False
    for p in paths:
        if not isinstance(p, (str, os.PathLike)):
            raise TypeError(f"events: an out-of-core modality reads files; got a {type(p).__name__} (write the table to "
                            "parquet first, or use events_to_frame for a table in memory)")
        path = Path(p)
        if any(ch in str(p) for ch in "*?["):
            found = sorted(glob.glob(str(p), recursive=True))
        elif _is_meds_root(path):
            meds = True
            found = sorted(str(f) for f in (path / "data").rglob("*.parquet"))
        elif path.is_dir():
            found = sorted(str(f) for f in path.rglob("*.parquet"))
        elif path.exists():
            found = [str(path)]
        else:
            raise FileNotFoundError(f"events {str(p)!r} does not exist")
        if not found:
            raise FileNotFoundError(f"events {str(p)!r} holds no .parquet files")
        files += [str(Path(f).resolve()) for f in found]
    if meds and text_column is None:
        text_column = "text_value"
    prefixes = tuple(codes or ()) if not isinstance(codes, str) else (codes,)
    excluded = tuple(exclude_codes or ()) if not isinstance(exclude_codes, str) else (exclude_codes,)
    if kind == "notes":
        if text_column is None:
            raise ValueError("notes from event files need text_column (MEDS: text_value)")
        value_column = None
    src = EventSource(tuple(files), id_column, time_column, code_column, value_column, text_column,
                      tuple(p for p in prefixes if p != "") if "" not in prefixes else (), excluded, kind, text_key)
    _check_files(src)
    return src


def _file_schema(path: str) -> dict[str, Any]:
    """Column -> arrow type (parquet: metadata only; CSV: polars' inferred types); cached per file version."""
    st = os.stat(path)
    return _schema_of(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _schema_of(path: str, size: int, mtime_ns: int) -> dict[str, Any]:
    import pyarrow.parquet as pq

    if path.lower().endswith((".parquet", ".pq")):
        try:
            schema = pq.read_schema(path)
        except Exception as err:
            raise ValueError(f"events file {path!r} is not a readable parquet file ({err})") from None
        return {n: schema.field(n).type for n in schema.names}
    from mmclin.datasets.events import scan_table

    schema = scan_table(path, f"events file {path!r}").collect_schema()
    return {n: pl.Series([], dtype=dt).to_arrow().type for n, dt in schema.items()}


def _check_files(src: EventSource) -> None:
    """Columns present with types the store can hold, per file (one error naming the file and column)."""
    import pyarrow as pa

    for f in src.files:
        schema = _file_schema(f)
        need = [src.id_column, src.time_column] + ([src.code_column] if src.kind == "events" or src.codes
                                                     or src.exclude_codes else []) + \
            ([src.text_column] if src.kind == "notes" else [])
        lacking = [c for c in need if c not in schema]
        if lacking:
            raise ValueError(f"events file {f!r} has no column {lacking[0]!r}; its columns are {list(schema)[:15]}")
        t = schema[src.id_column]
        if not (pa.types.is_integer(t) or pa.types.is_null(t)):
            raise ValueError(f"events file {f!r} column {src.id_column!r} has type {t}; the event store needs integer "
                             "ids (map text ids to numbers first)")
        t = schema[src.time_column]
        if pa.types.is_timestamp(t) and t.tz is not None:
            raise ValueError(f"events file {f!r} column {src.time_column!r} has time zone {t.tz!r}; expected naive "
                             "timestamps (MEDS times are naive)")
        if not (pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_integer(t) or pa.types.is_floating(t)
                or pa.types.is_null(t)):
            raise ValueError(f"events file {f!r} column {src.time_column!r} has type {t}; expected a datetime or a "
                             "number (parse text times first)")
        if src.value_column and src.value_column in schema:
            t = schema[src.value_column]
            if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t)):
                raise ValueError(f"events file {f!r} column {src.value_column!r} has type {t}; expected numeric values "
                                 "(text values belong in notes)")
    kinds = {_time_kind(_file_schema(f)[src.time_column]) for f in src.files} - {None}
    if len(kinds) > 1:
        raise ValueError(f"events files mix datetime and numeric {src.time_column!r} columns ({sorted(src.files)[:2]}...)")


def _time_kind(t: Any) -> str | None:
    import pyarrow as pa

    if pa.types.is_null(t):
        return None
    return "datetime" if (pa.types.is_timestamp(t) or pa.types.is_date(t)) else "number"


# --- the store ----------------------------------------------------------------------------
@dataclass
class EventStore:
    """Per-subject events as flat arrays (memory-mapped when on disk); see the module docstring."""

    subjects: np.ndarray  # [S] int64, in storage order
    offsets: np.ndarray  # [S + 1]
    time: np.ndarray
    code: np.ndarray
    value: np.ndarray
    codes: list[str]
    time_kind: str
    path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._order = np.argsort(self.subjects, kind="stable")  # for id lookups: subjects need not be sorted
        self._sorted = self.subjects[self._order]

    @property
    def n_events(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_subjects(self) -> int:
        return int(len(self.subjects))

    @classmethod
    def open(cls, path: str | Path) -> "EventStore":
        path = Path(path)
        info = json.loads((path / "manifest.json").read_text())
        if info.get("format") != FORMAT_VERSION:
            raise ValueError(f"event store {str(path)!r} has format {info.get('format')}, this mmclin reads "
                             f"{FORMAT_VERSION}; delete it to rebuild")

        def load(name: str) -> np.ndarray:
            return np.load(path / name, mmap_mode="r")

        return cls(np.load(path / "subjects.npy"), np.load(path / "offsets.npy"), load("time.npy"), load("code.npy"),
                   load("value.npy"), json.loads((path / "codes.json").read_text()), info["time_kind"], path, info)

    def windows(self, ids: np.ndarray, cutoff: np.ndarray, start: np.ndarray | None = None,
                known: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(starts, stops)`` of each row's events with ``start <= time <= cutoff`` (binary searches over
        its subject's sorted times; a subject without events, or ``known`` False, gives an empty window).

        Shapes: ids, cutoff, start ``[N]`` -> starts, stops int64 ``[N]``."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._sorted, ids), max(len(self._sorted) - 1, 0))
        found = (self._sorted[pos] == ids) if len(self._sorted) else np.zeros(len(ids), bool)
        if known is not None:
            found &= known
        row = self._order[pos] if len(self._order) else pos
        lo = np.where(found, self.offsets[row] if len(self._order) else 0, 0)
        hi = np.where(found, self.offsets[row + 1] if len(self._order) else 0, 0)
        stop = _segment_search(self.time, lo, hi, cutoff, right=True)  # first event after the cutoff
        begin = lo if start is None else _segment_search(self.time, lo, stop, start, right=False)
        return begin.astype(np.int64), stop.astype(np.int64)


def _segment_search(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, target: np.ndarray, right: bool) -> np.ndarray:
    """Per row, the first index in ``[lo, hi)`` whose value is ``> target`` (``right``) or ``>= target``; ``hi``
    if none. ``values`` sorted within each range; vectorised (one gather per halving step)."""
    lo, hi = lo.astype(np.int64).copy(), hi.astype(np.int64).copy()
    target = np.asarray(target)
    active = np.flatnonzero(lo < hi)
    while len(active):
        mid = (lo[active] + hi[active]) // 2
        v = values[mid]
        tg = target[active]
        go = (v <= tg) if right else (v < tg)
        lo[active] = np.where(go, mid + 1, lo[active])
        hi[active] = np.where(go, hi[active], mid)
        active = active[lo[active] < hi[active]]
    return lo


# --- building -------------------------------------------------------------------------------
@dataclass
class _Part:
    """One partition's events, each subject's contiguous and sorted by (time, code, value; no value last):
    ``subjects``/``counts`` in storage order, ``code`` indexing ``codes`` (-1: none)."""

    subjects: np.ndarray
    counts: np.ndarray
    time: np.ndarray
    code: np.ndarray
    value: np.ndarray
    codes: list[str]


def _runs(ids: np.ndarray, valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run-length encoding of an id column: ``(values, lengths, is_null)``."""
    if len(ids) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool)
    null = ~valid if valid is not None else np.zeros(len(ids), bool)
    change = np.flatnonzero((ids[1:] != ids[:-1]) | (null[1:] != null[:-1])) + 1
    starts = np.concatenate([[0], change])
    return ids[starts].astype(np.int64), np.diff(np.append(starts, len(ids))), null[starts]


def _file_runs(path: str, id_column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of equal ids of one file, in row order (parquet: one row group's id column at a time)."""
    vals, lens, nulls = [], [], []
    if path.lower().endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        for g in range(pf.num_row_groups):
            col = pf.read_row_group(g, columns=[id_column]).column(0)
            ids = col.fill_null(0).to_numpy() if col.null_count else col.to_numpy()
            valid = col.is_valid().to_numpy(zero_copy_only=False) if col.null_count else None
            v, n, z = _runs(np.asarray(ids), valid)
            vals.append(v), lens.append(n), nulls.append(z)
    else:
        from mmclin.datasets.events import scan_table

        col = scan_table(path, f"events file {path!r}").select(pl.col(id_column).cast(pl.Int64)).collect().to_series()
        v, n, z = _runs(col.fill_null(0).to_numpy(), col.is_not_null().to_numpy())
        vals.append(v), lens.append(n), nulls.append(z)
    v, n, z = (np.concatenate(x) if x else np.zeros(0, t) for x, t in ((vals, np.int64), (lens, np.int64), (nulls, bool)))
    if len(v) > 1:  # runs split at row-group edges: merge
        cont = np.concatenate([[False], (v[1:] == v[:-1]) & (z[1:] == z[:-1])])
        group = np.cumsum(~cont) - 1
        n = np.bincount(group, weights=n).astype(np.int64)
        v, z = v[~cont], z[~cont]
    return v, n, z


def _plan(src: EventSource, partition_events: int) -> dict[str, Any]:
    """How the rows are cut into partitions, from one pass over the id column (memory: one entry per run of
    equal ids, i.e. per subject in subject-sorted files).

    * ``clustered`` (each subject's rows contiguous in one file, as in MEDS shards): partitions are row
      ranges ``[file, start, stop)`` of one file cut at subject boundaries, read once, in order;
    * otherwise ranges of subject ids ``[lo, hi]``, each read with a filter from every file."""
    runs = [_file_runs(f, src.id_column) for f in src.files]
    n_null = int(sum(n[z].sum() for _, n, z in runs))
    if n_null:
        log.warning("events for the event store: %d row(s) with a null %r were dropped", n_null, src.id_column)
    ids = np.concatenate([v[~z] for v, _, z in runs]) if runs else np.zeros(0, np.int64)
    if len(np.unique(ids)) == len(ids):
        parts = []
        for i, (v, n, z) in enumerate(runs):
            ends = np.cumsum(n)
            start = 0
            while start < (ends[-1] if len(ends) else 0):
                stop = int(ends[min(np.searchsorted(ends, start + partition_events, side="left"), len(ends) - 1)])
                parts.append([i, start, stop])
                start = stop
        return {"clustered": True, "parts": parts}
    counts = np.concatenate([n[~z] for _, n, z in runs])
    uniq, inverse = np.unique(ids, return_inverse=True)
    per = np.bincount(inverse, weights=counts).astype(np.int64)
    cum, parts, start = np.cumsum(per), [], 0
    while start < len(uniq):
        stop = max(int(np.searchsorted(cum, cum[start] - per[start] + partition_events, side="right")), start + 1)
        parts.append([int(uniq[start]), int(uniq[stop - 1])])
        start = stop
    return {"clustered": False, "parts": parts}


class _RowGroups:
    """Reads row ranges of parquet files by row group, keeping the last row group decoded (a range's last
    row group is usually the next range's first)."""

    def __init__(self, src: EventSource) -> None:
        self.src, self.files, self.last = src, {}, None

    def read(self, path: str, start: int, stop: int) -> Any:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if path not in self.files:
            pf = pq.ParquetFile(path, read_dictionary=[c for c in [self.src.code_column] if c in _file_schema(path)])
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            self.files = {path: (pf, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))}
        pf, bounds = self.files[path]
        schema = _file_schema(path)
        cols = [c for c in (self.src.id_column, self.src.time_column, self.src.code_column, self.src.value_column,
                            self.src.text_column) if c and c in schema]
        pieces = []
        for g in range(int(np.searchsorted(bounds, start, side="right")) - 1, len(bounds) - 1):
            lo, hi = int(bounds[g]), int(bounds[g + 1])
            if lo >= stop:
                break
            if self.last is not None and self.last[:2] == (path, g):
                table = self.last[2]
            else:
                table = pf.read_row_group(g, columns=cols)
                self.last = (path, g, table)
            pieces.append(table.slice(max(start - lo, 0), min(stop, hi) - max(start, lo)))
        return pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]


def _keep_rows(t: Any, src: EventSource) -> Any:
    """Rows with an id and a time (and, with a text column, no text: those are notes); only where some
    row must go (a filter copies every column)."""
    import pyarrow.compute as pc

    cols = [t.column(src.id_column), t.column(src.time_column)]
    drop = sum(c.null_count for c in cols)
    if src.kind == "notes":
        mask = pc.and_(pc.and_(pc.is_valid(cols[0]), pc.is_valid(cols[1])), pc.is_valid(t.column(src.text_column)))
        return t.filter(mask)
    if src.text_column and src.text_column in t.column_names:
        text = t.column(src.text_column)
        drop += len(text) - text.null_count
        t = t.drop_columns([src.text_column]) if text.null_count == len(text) else t
    if not drop:
        return t
    mask = pc.and_(pc.is_valid(cols[0]), pc.is_valid(cols[1]))
    if src.text_column and src.text_column in t.column_names:
        mask = pc.and_(mask, pc.is_null(t.column(src.text_column)))
    return t.filter(mask)


def _read_part(src: EventSource, plan: dict[str, Any], part: list[int], time_kind: str,
               reader: _RowGroups | None = None) -> Any:
    """One partition's events as an arrow table (id, time, code, value), filters applied."""
    if plan["clustered"]:
        i, start, stop = part
        path = src.files[i]
        if path.lower().endswith((".parquet", ".pq")):
            t = (reader or _RowGroups(src)).read(path, start, stop)
        else:
            from mmclin.datasets.events import scan_table

            t = scan_table(path, f"events file {path!r}").slice(start, stop - start).collect().to_arrow()
        return _normalise(_keep_rows(t, src), src, time_kind)
    return _read_range(src, part[0], part[1], time_kind)


def _read_range(src: EventSource, lo: int, hi: int, time_kind: str) -> Any:
    """The events of subjects ``lo..hi`` from every file (pyarrow filters; statistics prune row groups)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    tables = []
    for f in src.files:
        schema = _file_schema(f)
        cols = [c for c in (src.id_column, src.time_column, src.code_column, src.value_column, src.text_column)
                if c and c in schema]
        if f.lower().endswith((".parquet", ".pq")):
            import pyarrow.dataset as ds

            fmt = ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns={src.code_column}))
            t = ds.dataset(f, format=fmt).to_table(
                columns=cols, filter=(pc.field(src.id_column) >= lo) & (pc.field(src.id_column) <= hi))
        else:
            from mmclin.datasets.events import scan_table

            t = (scan_table(f, f"events file {f!r}").filter(pl.col(src.id_column).is_between(lo, hi))
                 .select(cols).collect().to_arrow())
        tables.append(_normalise(_keep_rows(t, src), src, time_kind))
    tables = [t for t in tables if t.num_rows] or tables[:1]
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]


def _normalise(t: Any, src: EventSource, time_kind: str) -> Any:
    """A table in the store's column types: int64 id, int64 us / float64 time, dictionary code, float32 or
    float64 value (float32 is kept as it is: widening it later is exact); notes: id, time, code, text."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out = {"id": pc.cast(t.column(src.id_column), pa.int64())}
    if src.kind == "notes":
        tm = t.column(src.time_column)
        if time_kind == "datetime":
            tm = pc.cast(pc.cast(pc.cast(tm, pa.timestamp("us")) if pa.types.is_date(tm.type) else tm,
                                 pa.timestamp("us"), safe=False), pa.int64())
        out["time"] = tm if time_kind == "datetime" else pc.cast(tm, pa.float64())
        code = t.column(src.code_column) if src.code_column in t.column_names else pa.nulls(t.num_rows, pa.string())
        out["code"] = pc.cast(code.cast(code.type.value_type) if pa.types.is_dictionary(code.type) else code, pa.string())
        out["text"] = pc.cast(t.column(src.text_column), pa.string())
        return pa.table(out)
    tm = t.column(src.time_column)
    if time_kind == "datetime":
        if pa.types.is_date(tm.type):
            tm = pc.cast(tm, pa.timestamp("us"))
        out["time"] = pc.cast(pc.cast(tm, pa.timestamp("us"), safe=False), pa.int64())
    else:
        out["time"] = pc.cast(tm, pa.float64())
    code = t.column(src.code_column)
    if pa.types.is_dictionary(code.type):
        if not (pa.types.is_string(code.type.value_type) or pa.types.is_large_string(code.type.value_type)):
            code = pc.dictionary_encode(pc.cast(code.cast(code.type.value_type), pa.string()))
    else:
        if not (pa.types.is_string(code.type) or pa.types.is_large_string(code.type)):
            code = pc.cast(code, pa.string())
        code = pc.dictionary_encode(code)
    out["code"] = code
    if src.value_column and src.value_column in t.column_names:
        v = t.column(src.value_column)
        out["value"] = v if pa.types.is_float32(v.type) else pc.cast(v, pa.float64())
    else:
        out["value"] = pa.nulls(t.num_rows, pa.float32())
    return pa.table(out)


def _codes_of(col: Any) -> tuple[np.ndarray, list[str]]:
    """Dictionary column -> (int32 index into the returned strings, -1 for null; the strings)."""
    import pyarrow as pa

    col = col.unify_dictionaries() if isinstance(col, pa.ChunkedArray) else pa.chunked_array([col])
    if col.num_chunks == 0:
        return np.zeros(0, dtype=np.int64), []
    dictionary = col.chunk(0).dictionary.to_pylist()
    parts = []
    for ch in col.chunks:
        idx = ch.indices.fill_null(-1) if ch.null_count else ch.indices
        parts.append(idx.to_numpy(zero_copy_only=False).astype(np.int32, copy=False))
    return (np.concatenate(parts) if len(parts) > 1 else parts[0] if parts else np.zeros(0, np.int32)), dictionary


def _column(table: Any, name: str) -> np.ndarray:
    col = table.column(name)
    return np.asarray(col.to_numpy() if col.num_chunks != 1 else col.chunk(0).to_numpy(zero_copy_only=False))


def _process(table: Any, src: EventSource, where: str, contiguous: bool = False) -> _Part:
    """One partition's arrow table -> its sorted arrays (see :class:`_Part`)."""
    subject, t, value = _column(table, "id"), _column(table, "time"), _column(table, "value")
    idx, dictionary = _codes_of(table.column("code"))
    if not np.issubdtype(value.dtype, np.floating):
        value = value.astype(np.float64)
    # code filters are decided once per dictionary entry, then looked up per event
    if src.codes or src.exclude_codes:
        keep_entry = np.ones(len(dictionary) + 1, dtype=bool)
        keep_entry[:-1] = [(not src.codes or c.startswith(src.codes)) and not (src.exclude_codes and
                           c.startswith(src.exclude_codes)) for c in dictionary]
        keep_entry[-1] = not src.codes  # a null code matches no prefix
        keep = keep_entry[idx]  # idx -1 -> the last entry
        subject, t, idx, value = subject[keep], t[keep], idx[keep], value[keep]
    if src.value_column is None:
        value = np.full(len(subject), np.nan, dtype=np.float32)
    elif np.isinf(value).any():
        i = int(np.flatnonzero(np.isinf(value))[0])
        raise ValueError(_locate_bad_value(src, int(subject[i]), where))
    # the partition's own dictionary: used entries only, ranked in string order (ranks sort like the strings)
    used = np.flatnonzero(np.bincount(idx[idx >= 0], minlength=len(dictionary))) if len(dictionary) else np.zeros(0, int)
    names = [dictionary[i] for i in used]
    order = sorted(range(len(names)), key=names.__getitem__)
    rank = np.full(len(dictionary) + 1, -1, dtype=np.int32)
    rank[used[order]] = np.arange(len(names), dtype=np.int32)
    code = rank[idx]
    perm = _sort_order(subject, t, code, value, contiguous)
    if perm is not None:
        subject, t, code, value = subject[perm], t[perm], code[perm], value[perm]
    if len(subject):
        first = np.concatenate([[0], np.flatnonzero(subject[1:] != subject[:-1]) + 1])
        subjects, counts = subject[first], np.diff(np.append(first, len(subject)))
    else:
        subjects, counts = np.zeros(0, np.int64), np.zeros(0, np.int64)
    return _Part(subjects.astype(np.int64), counts.astype(np.int64), t, code, value, [names[i] for i in order])


def _sort_order(subject: np.ndarray, t: np.ndarray, code: np.ndarray, value: np.ndarray,
                contiguous: bool = False) -> np.ndarray | None:
    """A permutation making each subject's events contiguous and sorted by (time, code, value; NaN last),
    None when they already are. Subjects need not be in id order.

    MEDS shards come sorted by (subject, time): then only ties within one time need an order, which one
    stable sort of a (tie group, code) key gives in near-linear time (timsort on runs)."""
    n = len(subject)
    if n < 2:
        return None
    new = subject[1:] != subject[:-1]
    first = None
    runs = subject[np.concatenate([[0], np.flatnonzero(new) + 1])] if not contiguous else None
    if runs is not None and len(np.unique(runs)) != len(runs):  # a subject in pieces (several files): group them
        first = np.argsort(subject, kind="stable")
        subject, t, code, value = subject[first], t[first], code[first], value[first]
        new = subject[1:] != subject[:-1]
    perm = _sort_within(new, t, code, value)
    if first is None:
        return perm
    return first if perm is None else first[perm]


def _sort_within(new: np.ndarray, t: np.ndarray, code: np.ndarray, value: np.ndarray) -> np.ndarray | None:
    """:func:`_sort_order` once subjects are contiguous (``new[i]``: a subject starts at ``i + 1``)."""
    dt = np.diff(t)
    if np.any((dt < 0) & ~new):  # times not sorted within a subject: the full sort
        group = np.concatenate([[0], np.cumsum(new)])
        frame = pl.DataFrame({"s": group, "t": t, "c": code, "v": value, "i": np.arange(len(t))})
        frame = frame.with_columns(pl.col("v").fill_nan(None))  # NaN is "no value": last, as nulls
        return frame.sort(["s", "t", "c", "v"], nulls_last=True)["i"].to_numpy()
    same = dt == 0
    same &= ~new
    pos = np.flatnonzero(same)  # i: events i and i + 1 share subject and time
    if not len(pos):
        return None
    c0, c1 = code[pos], code[pos + 1]
    eq = c1 == c0
    unordered = bool(np.any(c1 < c0))
    if not unordered and eq.any():
        v0, v1 = value[pos[eq]], value[pos[eq] + 1]
        n0, n1 = np.isnan(v0), np.isnan(v1)
        unordered = bool(np.any(((v1 < v0) & ~n1) | (n0 & ~n1)))
    if not unordered:
        return None
    # one stable sort of (tie group, code): near-linear on these runs (timsort)
    key = np.cumsum(~same, dtype=np.int64)
    key = np.concatenate([[0], key]).view(np.uint64)
    bits = max(int(code.max()) + 2, 2).bit_length()
    key <<= np.uint64(bits)
    key |= (code + 1).astype(np.uint64)
    perm = np.argsort(key, kind="stable")
    # equal (time, code): order by value (NaN last); rare, so sorted only where it happens
    k = key[perm]
    tie = np.flatnonzero(k[1:] == k[:-1])
    if len(tie):
        v0, v1 = value[perm[tie]], value[perm[tie + 1]]
        n0, n1 = np.isnan(v0), np.isnan(v1)
        bad = tie[((v1 < v0) & ~n1) | (n0 & ~n1)]
        if len(bad):
            run = np.concatenate([[0], np.cumsum(k[1:] != k[:-1])])  # runs of equal (time, code)
            hit = np.zeros(int(run[-1]) + 1, dtype=bool)
            hit[run[bad]] = True
            sub = np.flatnonzero(hit[run])
            v = value[perm[sub]]
            vn = np.isnan(v)
            within = np.lexsort((np.where(vn, np.inf, v), vn, run[sub]))
            perm[sub] = perm[sub][within]
    return perm


def _process_notes(table: Any, src: EventSource, counter: Any) -> dict[str, np.ndarray]:
    """One partition's notes -> arrays: each subject's notes with non-blank text, sorted by (time, text), and
    their term counts (``counter``: the text featurizer's hashing; stateless, so done once here)."""
    frame = pl.from_arrow(table)
    keep = pl.col("text").str.strip_chars().str.len_chars() > 0
    if src.codes or src.exclude_codes:
        code = pl.col("code")
        if src.codes:
            keep = keep & pl.any_horizontal([code.str.starts_with(p) for p in src.codes]).fill_null(False)
        if src.exclude_codes:
            keep = keep & ~pl.any_horizontal([code.str.starts_with(p) for p in src.exclude_codes]).fill_null(False)
    frame = frame.filter(keep)
    # subjects keep their first appearance's order (contiguous), notes sorted within a subject
    first = frame.select(pl.col("id").rle_id().alias("run"), "id").group_by("id", maintain_order=True).agg(
        pl.col("run").first())
    frame = (frame.join(first, on="id", how="left", maintain_order="left")
             .sort(["run", "time", "text"], maintain_order=True))
    texts = frame["text"].to_list()
    counts = counter(texts) if texts else None
    subject = frame["id"].to_numpy()
    if len(subject):
        start = np.concatenate([[0], np.flatnonzero(subject[1:] != subject[:-1]) + 1])
        subjects, per = subject[start], np.diff(np.append(start, len(subject)))
    else:
        subjects, per = np.zeros(0, np.int64), np.zeros(0, np.int64)
    return {"time": frame["time"].to_numpy(),
            "term_counts": np.diff(counts.indptr) if counts is not None else np.zeros(0, np.int64),
            "term": counts.indices if counts is not None else np.zeros(0, np.int32),
            "count": counts.data if counts is not None else np.zeros(0, np.float32),
            "subjects": subjects, "counts": per}


@dataclass
class NoteStore:
    """Per-subject notes on disk: note times and each note's hashed term counts (memory-mapped).

    Shapes: subjects ``[S]``, offsets ``[S + 1]`` (over notes), time ``[N]``, term_offsets ``[N + 1]``,
    term / count ``[T]``."""

    subjects: np.ndarray
    offsets: np.ndarray
    time: np.ndarray
    term_offsets: np.ndarray
    term: np.ndarray
    count: np.ndarray
    time_kind: str
    path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._order = np.argsort(self.subjects, kind="stable")
        self._sorted = self.subjects[self._order]

    windows = EventStore.windows

    @classmethod
    def open(cls, path: str | Path) -> "NoteStore":
        path = Path(path)
        info = json.loads((path / "manifest.json").read_text())

        def load(name: str) -> np.ndarray:
            return np.load(path / f"{name}.npy", mmap_mode="r")

        return cls(np.load(path / "subjects.npy"), np.load(path / "offsets.npy"), load("time"), load("term_offsets"),
                   load("term"), load("count"), info["time_kind"], path, info)


def _locate_bad_value(src: EventSource, subject: int, where: str) -> str:
    """Error text naming the file and row of the first infinite value of ``subject`` (found on the error path
    only: one scan per file)."""
    from mmclin.datasets.events import scan_table

    for f in src.files:
        lf = scan_table(f, f"events file {f!r}").with_row_index("__row")
        hit = (lf.filter((pl.col(src.id_column) == subject) & pl.col(src.value_column).cast(pl.Float64).is_infinite())
               .select("__row", src.value_column).head(1).collect())
        if hit.height:
            return (f"events file {f!r} column {src.value_column!r} row {hit['__row'][0]}: value "
                    f"{hit[src.value_column][0]} is not finite; expected a finite number or null")
    return f"events ({where}) column {src.value_column!r}: a value is not finite; expected a finite number or null"


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock (``flock``) on ``path``: builders of one store take turns."""
    import fcntl

    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


_HEADER = 128  # bytes of every .npy header the writer leaves (rewritten with the final length at the end)


def _npy_header(dtype: np.dtype, n: int) -> bytes:
    """A version 1.0 .npy header of exactly ``_HEADER`` bytes (padded with spaces, as the format allows)."""
    text = "{'descr': %r, 'fortran_order': False, 'shape': (%d,), }" % (np.lib.format.dtype_to_descr(np.dtype(dtype)), n)
    body = text.ljust(_HEADER - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1")


class _Writer:
    """Appends finished partitions to the store's flat files; ``progress.json`` records what is complete
    (each file's length), so a killed build is truncated back to it and continues with the next partition.
    ``code`` arrays arrive as partition-local indices and get store-wide ids (order of first appearance);
    ``counts`` / ``term_counts`` become ``offsets`` / ``term_offsets`` at the end."""

    OFFSETS = {"counts": "offsets", "term_counts": "term_offsets"}

    def __init__(self, folder: Path, dtypes: dict[str, Any]) -> None:
        self.folder, self.dtypes = folder, {k: np.dtype(v) for k, v in dtypes.items()}
        path = folder / "progress.json"
        self.progress = json.loads(path.read_text()) if path.exists() else {
            "done": 0, "lengths": {k: 0 for k in self.dtypes}, "n_codes": 0}
        codes = []
        if (folder / "codes.txt").exists():  # one JSON string a line; lines past n_codes are a killed partition's
            codes = [json.loads(line) for line in (folder / "codes.txt").read_text(encoding="utf-8").splitlines()]
        codes = codes[: self.progress["n_codes"]]
        with open(folder / "codes.txt", "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(c) + "\n" for c in codes))
        self.lookup = {c: i for i, c in enumerate(codes)}
        for name, dtype in self.dtypes.items():
            n = self.progress["lengths"][name]
            with open(folder / f"{name}.npy", "r+b" if (folder / f"{name}.npy").exists() else "wb") as f:
                f.truncate(_HEADER + n * dtype.itemsize)  # drops what a killed partition left
                f.seek(0)
                f.write(_npy_header(dtype, n))

    @property
    def done(self) -> int:
        return int(self.progress["done"])

    def append(self, arrays: dict[str, np.ndarray], codes: list[str] | None = None) -> None:
        if codes is not None:
            ids = np.empty(len(codes) + 1, dtype=np.int32)
            for j, c in enumerate(codes):  # codes get store-wide ids in order of first appearance
                ids[j] = self.lookup.setdefault(c, len(self.lookup))
            ids[-1] = -1
            arrays = {**arrays, "code": ids[arrays["code"]]}
        lengths = dict(self.progress["lengths"])
        for name, arr in arrays.items():
            with open(self.folder / f"{name}.npy", "ab") as f:
                np.ascontiguousarray(arr, dtype=self.dtypes[name]).tofile(f)
            lengths[name] += len(arr)
        known = self.progress["n_codes"]
        if len(self.lookup) > known:  # this partition's new codes, appended (rewriting the whole list is not free)
            with open(self.folder / "codes.txt", "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(c) + "\n" for c in list(self.lookup)[known:]))
        self.progress = {"done": self.done + 1, "lengths": lengths, "n_codes": len(self.lookup)}
        write_json_atomic(self.folder / "progress.json", self.progress)

    def finish(self) -> dict[str, Any]:
        for name, dtype in self.dtypes.items():
            with open(self.folder / f"{name}.npy", "r+b") as f:
                f.write(_npy_header(dtype, self.progress["lengths"][name]))
        subjects = np.load(self.folder / "subjects.npy")
        if len(np.unique(subjects)) != len(subjects):
            raise ValueError("event store: a subject's events came out in two partitions (did the input files change "
                             "during the build?); delete the partial build and retry")
        for counts_name, offsets_name in self.OFFSETS.items():
            if counts_name in self.dtypes:
                counts = np.load(self.folder / f"{counts_name}.npy")
                offsets = np.zeros(len(counts) + 1, dtype=np.int64)
                np.cumsum(counts, out=offsets[1:])
                np.save(self.folder / f"{offsets_name}.npy", offsets)
                (self.folder / f"{counts_name}.npy").unlink()
        (self.folder / "codes.json").write_text(json.dumps(list(self.lookup)))
        (self.folder / "progress.json").unlink()
        (self.folder / "codes.txt").unlink()
        n_items = int(np.load(self.folder / "offsets.npy", mmap_mode="r")[-1])
        return {"n_events": n_items, "n_subjects": int(len(subjects)), "n_codes": len(self.lookup)}


def _value_dtype(src: EventSource) -> np.dtype:
    import pyarrow as pa

    types = [_file_schema(f).get(src.value_column) for f in src.files] if src.value_column else []
    types = [t for t in types if t is not None and not pa.types.is_null(t)]
    return np.dtype(np.float32) if types and all(pa.types.is_float32(t) for t in types) else np.dtype(np.float64)


def _store_time_kind(src: EventSource) -> str:
    kinds = {_time_kind(_file_schema(f)[src.time_column]) for f in src.files} - {None}
    return kinds.pop() if kinds else "datetime"


def build_store(src: EventSource, dest: Path, partition_events: int = PARTITION_EVENTS, counter: Any = None) -> Any:
    """Build the store of ``src`` at ``dest`` (see the module docstring): locked, resumable, atomic.
    Notes (``src.kind == "notes"``) need ``counter``: texts -> scipy CSR of term counts (the text featurizer's)."""
    dest = Path(dest)
    check_writable_parent(dest, "event store", writable=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _lock(dest.parent / f".{dest.name}.lock"):
            if (dest / "manifest.json").exists():  # built by another process while this one waited
                return NoteStore.open(dest) if src.kind == "notes" else EventStore.open(dest)
            return _build_locked(src, dest, partition_events, counter)
    except Exception as err:
        refused = refused_write(err, dest, dest.parent)
        if refused is not None:
            raise refused from None
        raise


def _build_locked(src: EventSource, dest: Path, partition_events: int, counter: Any = None) -> Any:
    t0 = _time.perf_counter()
    partial = dest.parent / f".{dest.name}.partial"
    partial.mkdir(exist_ok=True)
    plan_file = partial / "plan.json"
    plan = json.loads(plan_file.read_text()) if plan_file.exists() else None
    if plan is None or plan.get("partition_events") != partition_events:
        for old in partial.iterdir():
            old.unlink()
        plan = {**_plan(src, partition_events), "partition_events": partition_events}
        write_json_atomic(plan_file, plan)
    time_kind, value_dtype = _store_time_kind(src), _value_dtype(src)
    time_dtype = np.int64 if time_kind == "datetime" else np.float64
    if src.kind == "notes":
        dtypes = {"time": time_dtype, "term_counts": np.int64, "term": np.int32, "count": np.float32,
                  "subjects": np.int64, "counts": np.int64}
    else:
        dtypes = {"time": time_dtype, "code": np.int32, "value": value_dtype, "subjects": np.int64, "counts": np.int64}
    writer = _Writer(partial, dtypes)
    if writer.done:
        log.info("event store %s: %d of %d partition(s) kept from an interrupted build", dest.name, writer.done,
                 len(plan["parts"]))
    reader = _RowGroups(src)
    for i in range(writer.done, len(plan["parts"])):
        part = plan["parts"][i]
        where = f"rows {part[1]}..{part[2]} of {src.files[part[0]]!r}" if plan["clustered"] else f"subjects {part}"
        table = _read_part(src, plan, part, time_kind, reader)
        if src.kind == "notes":
            writer.append(_process_notes(table, src, counter))
        else:
            p = _process(table, src, where, plan["clustered"])
            writer.append({"time": p.time, "code": p.code, "value": p.value, "subjects": p.subjects,
                           "counts": p.counts}, p.codes)
    counts = writer.finish()
    plan_file.unlink()
    info = {"format": FORMAT_VERSION, "key": dest.name, "source": src.options(), "files": list(src.files),
            "time_kind": time_kind, "value_dtype": str(value_dtype), "partitions": len(plan["parts"]),
            "clustered": plan["clustered"], "build_seconds": round(_time.perf_counter() - t0, 3), **counts}
    write_json_atomic(partial / "manifest.json", info)
    os.replace(partial, dest)  # the store appears complete, or not at all
    log.info("event store %s: %d %s of %d subjects in %.1f s", dest, counts["n_events"], src.kind,
             counts["n_subjects"], info["build_seconds"])
    return NoteStore.open(dest) if src.kind == "notes" else EventStore.open(dest)


def build_in_memory(src: EventSource, partition_events: int = PARTITION_EVENTS) -> EventStore:
    """The same arrays as :func:`build_store`, in memory (nothing written; for small data and comparisons)."""
    time_kind, value_dtype = _store_time_kind(src), _value_dtype(src)
    plan = _plan(src, partition_events)
    reader = _RowGroups(src)
    parts = [_process(_read_part(src, plan, p, time_kind, reader), src, f"part {p}", plan["clustered"])
             for p in plan["parts"]]
    lookup: dict[str, int] = {}
    code = []
    for p in parts:
        ids = np.array([lookup.setdefault(c, len(lookup)) for c in p.codes] + [-1], dtype=np.int32)
        code.append(ids[p.code])

    def cat(xs: list[np.ndarray], dtype: Any) -> np.ndarray:
        return np.concatenate(xs).astype(dtype, copy=False) if xs else np.zeros(0, dtype)

    counts = cat([p.counts for p in parts], np.int64)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return EventStore(cat([p.subjects for p in parts], np.int64), offsets,
                      cat([p.time for p in parts], np.int64 if time_kind == "datetime" else np.float64),
                      cat(code, np.int32), cat([p.value for p in parts], value_dtype), list(lookup), time_kind, None,
                      {"source": src.options(), "n_events": int(offsets[-1]), "clustered": plan["clustered"]})


def window_length(window: Any, is_time: bool) -> Any:
    """A window option in the store's time units: microseconds (int) for datetimes, the number itself
    otherwise; ``"48h"`` / ``"7d"`` as :func:`~mmclin.datasets.events.events_to_frame` reads them."""
    import datetime as dt

    from mmclin.datasets.events import _parse_duration

    if is_time:
        if isinstance(window, str):
            window = pl.select(pl.duration(**_parse_duration(window))).item()
        if not isinstance(window, dt.timedelta):
            raise ValueError(f"window={window!r}: with datetime times give a string like '48h' / '7d'")
        return int(window / dt.timedelta(microseconds=1))
    if isinstance(window, (int, float)) and not isinstance(window, bool):
        return float(window)
    raise ValueError(f"window={window!r}: with numeric times give a number in the time column's units")


def open_event_store(src: EventSource, store: str | Path | None = None,
                     partition_events: int = PARTITION_EVENTS, counter: Any = None) -> Any:
    """The store of ``src``: opened from ``store`` (a folder holding stores; default
    :func:`default_store_dir`) when built before, else built there first; ``store="memory"`` builds
    the arrays in memory (nothing written)."""
    if isinstance(store, str) and store == "memory":
        if src.kind == "notes":
            raise ValueError("notes from event files need an on-disk store (store: a folder), not 'memory'")
        return build_in_memory(src)
    root = Path(store) if store is not None else default_store_dir()
    dest = root / src.key()
    if (dest / "manifest.json").exists():
        return NoteStore.open(dest) if src.kind == "notes" else EventStore.open(dest)
    return build_store(src, dest, partition_events, counter)


def events_to_store(events: Any, subjects: Any, *, name: str = "events", store: str | Path | None = None,
                    id_column: str = "subject_id", time_column: str = "time", code_column: str = "code",
                    value_column: str | None = "numeric_value", prediction_time: str = "prediction_time",
                    window: Any = None, window_start: str | None = None, time_unit: str = "h",
                    codes: Any = None, exclude_codes: Any = None, text_column: str | None = None,
                    **featurizer_options: Any) -> tuple[pl.DataFrame, Any]:
    """Out-of-core :func:`~mmclin.datasets.events.events_to_frame`: ``(frame, spec)``.

    Builds (or reuses) the event store of ``events`` (files: a MEDS dataset folder, parquet / CSV files,
    a folder or a glob) under ``store`` and returns ``subjects`` plus a reference column ``name``
    (``struct{subject_id, prediction_time[, window_start]}``: which events each row may see; null =
    modality absent) and the ``irregular_series`` :class:`~mmclin.cohort.ModalitySpec` that reads them,
    its ``options`` naming the files, the store and the window (featurizer options such as
    ``max_events`` go through ``featurizer_options``). Train with the spec as with any other: the
    featurizer reads the store per batch, fitted on training rows only.
    """
    from mmclin.cohort import ModalitySpec

    src = event_source(events, id_column=id_column, time_column=time_column, code_column=code_column,
                       value_column=value_column, text_column=text_column, codes=codes, exclude_codes=exclude_codes)
    open_event_store(src, store, int(featurizer_options.get("partition_events", PARTITION_EVENTS)))
    frame = _reference_frame(subjects, name, id_column, prediction_time, window_start)
    options = {**_source_options(events, store, id_column, time_column, time_unit, window, code_column=code_column,
                                 value_column=value_column, codes=codes, exclude_codes=exclude_codes,
                                 text_column=text_column), **featurizer_options}
    return frame, ModalitySpec(name=name, kind="irregular_series", columns=[name], options=options)


def notes_to_store(notes: Any, subjects: Any, *, name: str = "notes", store: str | Path | None = None,
                   id_column: str = "subject_id", time_column: str = "time", text_column: str = "text",
                   prediction_time: str = "prediction_time", window: Any = None, window_start: str | None = None,
                   time_unit: str = "h", codes: Any = None, code_column: str = "code",
                   **featurizer_options: Any) -> tuple[pl.DataFrame, Any]:
    """Out-of-core :func:`~mmclin.datasets.events.notes_to_frame`: ``(frame, spec)`` as :func:`events_to_store`,
    for a ``notes`` modality. The files are checked now; the notes store (note times and hashed term counts)
    is built when the featurizer first needs it, since the hashing is the text featurizer's."""
    from mmclin.cohort import ModalitySpec

    event_source(notes, id_column=id_column, time_column=time_column, code_column=code_column, text_column=text_column,
                 codes=codes, kind="notes")
    frame = _reference_frame(subjects, name, id_column, prediction_time, window_start)
    options = _source_options(notes, store, id_column, time_column, time_unit, window, codes=codes,
                              text_column=text_column, code_column=code_column if codes else None)
    return frame, ModalitySpec(name=name, kind="notes", columns=[name], options={**options, **featurizer_options})


def _reference_frame(subjects: Any, name: str, id_column: str, prediction_time: str,
                     window_start: str | None) -> pl.DataFrame:
    """``subjects`` plus the reference column ``name``: ``struct{subject_id, prediction_time[, window_start]}``."""
    from mmclin.datasets.events import scan_table

    subj = subjects if isinstance(subjects, pl.DataFrame) else scan_table(subjects, "subjects").collect()
    for col in [id_column, prediction_time] + ([window_start] if window_start else []):
        if col not in subj.columns:
            raise ValueError(f"the subjects table has no column {col!r}; its columns are {subj.columns[:15]}")
    if name in subj.columns:
        raise ValueError(f"the subjects frame already has a column {name!r}; choose another name= for the modality")
    fields = {"subject_id": pl.col(id_column).cast(pl.Int64), "prediction_time": pl.col(prediction_time)}
    if window_start:
        fields["window_start"] = pl.col(window_start)
    return subj.with_columns(pl.struct(**fields).alias(name))


def _source_options(events: Any, store: Any, id_column: str, time_column: str, time_unit: str, window: Any,
                    **more: Any) -> dict[str, Any]:
    """A store-backed spec's options (JSON: they are saved with the model)."""
    if isinstance(window, dt.timedelta):
        window = f"{window.total_seconds()}s"
    options = {"events": [str(e) for e in events] if isinstance(events, (list, tuple)) else str(events),
               "store": str(store) if store is not None else None, "id_column": id_column, "time_column": time_column,
               "time_unit": time_unit, "window": window,
               **{k: list(v) if isinstance(v, tuple) else v for k, v in more.items()}}
    return {k: v for k, v in options.items() if v is not None or k == "value_column"}  # None: code-only events
