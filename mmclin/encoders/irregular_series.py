"""Irregular time series: the featurizer of kind ``irregular_series`` and a time-aware transformer.

A cell is a ``list[struct{time, code, value}]`` (see :func:`mmclin.datasets.events_to_frame`):
variables observed at their own irregular times, any of them possibly never. The featurizer
(fitted on training rows only) maps codes to ids, standardises values *per code*, keeps each
subject's most recent ``max_events`` events and stores them flat (a
:class:`~mmclin.batch.Ragged`), so batches are padded to their own longest subject.

Encoder: one token per observation, ``code_emb[c] + v * value_emb[c] + time_emb(t)`` (a
missing value uses a learned token instead of ``v * value_emb[c]``), a transformer with key
padding masks, and a learned summary token. Continuous time embedding: Time2Vec
(Kazemi et al., "Time2Vec: Learning a Vector Representation of Time", 2019); value-aware
observation tokens as in STraTS (Tipirneni & Reddy, "Self-Supervised Transformer for Sparse
and Irregularly Sampled Multivariate Clinical Time-Series", TKDD 2022).
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn

from mmclin.batch import ModalityTokens, Ragged, RaggedWindows, item_ranges, offsets_from_rows
from mmclin.datasets.event_store import STORE_OPTIONS
from mmclin.encoders.base import Featurizer, ModalityEncoder
from mmclin.registry import ENCODERS, FEATURIZERS

PAD_CODE, UNKNOWN_CODE, FIRST_CODE = 0, 1, 2
STREAM_ITEMS = 1 << 22  # events per chunk when a featurizer streams an event store (~100 MB)


def list_column_present(frame: pl.DataFrame, column: str) -> Tensor:
    """A list cell is present when it is non-null and non-empty."""
    p = frame.select(pl.col(column).is_not_null() & (pl.col(column).list.len() > 0)).to_series()
    return torch.from_numpy(p.fill_null(False).to_numpy().copy())


def check_list_struct(frame: pl.DataFrame, spec_name: str, column: str, fields: dict[str, str], example: str) -> None:
    """Raise naming modality and column unless the column is ``list[struct{fields...}]``."""
    dtype = frame.schema[column]
    inner = dtype.inner if isinstance(dtype, pl.List) else None
    names = [f.name for f in inner.fields] if isinstance(inner, pl.Struct) else None
    if names is None or any(f not in names for f in fields):
        raise ValueError(
            f"modality {spec_name!r}, column {column!r}: expected list[struct{{{', '.join(fields)}}}] ({example}), "
            f"got {dtype}; build it from a long table with mmclin.datasets.{'notes_to_frame' if 'text' in fields else 'events_to_frame'}"
        )
    for f in inner.fields:
        want = fields.get(f.name)
        ok = {"number": f.dtype.is_numeric(), "text": f.dtype == pl.String,
              "code": f.dtype == pl.String or f.dtype.is_integer() or isinstance(f.dtype, (pl.Categorical, pl.Enum))}
        if want is not None and not ok[want] and f.dtype != pl.Null:
            raise ValueError(f"modality {spec_name!r}, column {column!r}: struct field {f.name!r} has dtype {f.dtype}, expected {want}")


def flatten_events(frame: pl.DataFrame, column: str, spec_name: str) -> tuple[np.ndarray, pl.DataFrame]:
    """Rows' events as one flat frame sorted by (row, time): ``(row_of_event [E], events)``."""
    flat = (frame.select(pl.int_range(pl.len(), dtype=pl.Int64).alias("__row"), pl.col(column))
            .explode(column).filter(pl.col(column).is_not_null()).unnest(column))
    bad = flat.filter(pl.col("time").is_null() | ~pl.col("time").cast(pl.Float64).is_finite())
    if bad.height:
        raise ValueError(f"modality {spec_name!r}, column {column!r}, row {bad['__row'][0]}: an event has no finite time")
    rows = flat["__row"].to_numpy()
    t = flat["time"].cast(pl.Float64).to_numpy()
    # the builders sort already; re-sort only when a user's frame is not in (row, time) order
    if len(rows) > 1 and not np.all((np.diff(rows) > 0) | ((np.diff(rows) == 0) & (np.diff(t) >= 0))):
        flat = flat.sort(["__row", "time"], maintain_order=True)
        rows = flat["__row"].to_numpy()
    return rows, flat


def keep_most_recent(rows: np.ndarray, n_rows: int, max_items: int | None) -> np.ndarray:
    """Bool ``[E]``: the last ``max_items`` items of each row (items sorted by time within rows)."""
    if max_items is None or len(rows) == 0:
        return np.ones(len(rows), dtype=bool)
    offsets = offsets_from_rows(rows, n_rows)
    from_end = offsets[rows + 1] - np.arange(len(rows)) - 1
    return from_end < max_items


class IrregularSeriesFeaturizer(Featurizer):
    """``list[struct{time, code, value}]`` -> Ragged ``code, value, value_missing, time`` per event.

    Options (``ModalitySpec.options``): ``max_events`` (256: each subject's most recent ones),
    ``min_code_count`` (1: rarer training codes share the "unknown code" id), ``clip`` (5.0:
    standardised values are clipped to +-clip), ``log_skewed`` (False: codes whose training
    values are all > 0 with skewness > 2, e.g. bilirubin, are log-transformed before standardising).

    Fitted on training rows only: the code vocabulary, per-code mean / sd of values, and
    the time normalisation ``t' = (t - t_max) / (t_max - t_q01)`` (so the observation window
    maps to about ``[-1, 0]``, the most recent training time to 0).
    """

    kind = "irregular_series"
    option_names: ClassVar[tuple[str, ...]] = ("max_events", "min_code_count", "clip", "log_skewed", *STORE_OPTIONS)

    @property
    def from_store(self) -> bool:
        """Out of core: the spec's ``options["events"]`` names event files, the column holds references
        (:func:`mmclin.datasets.event_store.events_to_store`) and batches are read from the event store."""
        return "events" in self.spec.options

    def _column(self, frame: pl.DataFrame) -> str:
        if self.from_store:
            return _reference_column(frame, self.spec)
        if len(self.spec.columns) != 1:
            raise ValueError(f"modality {self.spec.name!r} (irregular_series): expects exactly one list[struct{{time, code, value}}] "
                             f"column, got {self.spec.columns}")
        col = self.spec.columns[0]
        check_list_struct(frame, self.spec.name, col, {"time": "number", "code": "code", "value": "number"},
                          "one entry per observation")
        return col

    def present_rows(self, frame: pl.DataFrame) -> Tensor:
        if self.from_store:
            _, starts, stops, _ = self._windows(frame)
            return torch.from_numpy(stops > starts)
        return list_column_present(frame, self._column(frame))

    def _windows(self, frame: pl.DataFrame) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
        """``(store, starts, stops, cutoff)``: each row's events in the store (see ``store_windows``)."""
        return store_windows(frame, self.spec)

    def _events(self, frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        col = self._column(frame)
        rows, flat = flatten_events(frame, col, self.spec.name)
        t = flat["time"].cast(pl.Float64).to_numpy()
        v = flat["value"].cast(pl.Float64).to_numpy() if flat.height else np.zeros(0)
        if np.isinf(v).any():
            i = int(np.flatnonzero(np.isinf(v))[0])
            raise ValueError(f"modality {self.spec.name!r}, column {col!r}, row {rows[i]}: value {v[i]} is not finite")
        codes = flat["code"].cast(pl.String)
        return rows, t, v, codes

    def fit(self, frame: pl.DataFrame) -> "IrregularSeriesFeaturizer":
        o = self.spec.options
        self.max_events = int(o.get("max_events", 256))
        self.min_code_count = int(o.get("min_code_count", 1))
        self.clip = float(o.get("clip", 5.0))
        self.log_skewed = bool(o.get("log_skewed", False))
        if self.max_events < 1:
            raise ValueError(f"modality {self.spec.name!r}: max_events must be >= 1, got {self.max_events}")
        if self.from_store:
            return self._fit_from_store(frame)
        self.check_present_in_training(frame, self.present_rows(frame))
        rows, t, v, codes = self._events(frame)
        counts = codes.drop_nulls().value_counts(sort=True, name="n").filter(pl.col("n") >= self.min_code_count)
        self.vocab = sorted(counts[codes.name].to_list())
        ids = self._code_ids(codes)
        obs = ~np.isnan(v)
        n = len(self.vocab) + FIRST_CODE
        self.log_codes = self._skewed_codes(ids[obs], v[obs], n) if self.log_skewed else []
        v = self._log(ids, v)
        cnt = np.bincount(ids[obs], minlength=n)
        s1 = np.bincount(ids[obs], weights=v[obs], minlength=n)
        s2 = np.bincount(ids[obs], weights=v[obs] ** 2, minlength=n)
        mean = np.divide(s1, cnt, out=np.zeros(n), where=cnt > 0)
        var = np.divide(s2, cnt, out=np.ones(n), where=cnt > 0) - mean**2
        std = np.sqrt(np.clip(var, 0, None))
        self.mean = mean.tolist()
        self.std = np.where(std > 1e-12, std, 1.0).tolist()
        hi = float(t.max())
        lo = float(np.quantile(t, 0.01)) if len(t) else hi
        self.time_shift, self.time_scale = hi, (hi - lo) if hi > lo else 1.0
        return self

    @staticmethod
    def _skewed_codes(ids: np.ndarray, v: np.ndarray, n: int) -> list[int]:
        cnt = np.bincount(ids, minlength=n)
        mean = np.divide(np.bincount(ids, weights=v, minlength=n), cnt, out=np.zeros(n), where=cnt > 0)
        d = v - mean[ids]
        m2 = np.divide(np.bincount(ids, weights=d**2, minlength=n), cnt, out=np.zeros(n), where=cnt > 0)
        m3 = np.divide(np.bincount(ids, weights=d**3, minlength=n), cnt, out=np.zeros(n), where=cnt > 0)
        skew = np.divide(m3, m2**1.5, out=np.zeros(n), where=m2 > 0)
        positive = np.bincount(ids, weights=(v <= 0).astype(float), minlength=n) == 0
        return np.flatnonzero(positive & (cnt > 2) & (skew > 2.0)).tolist()

    def _log(self, ids: np.ndarray, v: np.ndarray) -> np.ndarray:
        if not self.log_codes:
            return v
        use = np.isin(ids, self.log_codes)
        # a value <= 0 of a log code (unseen in training) is clamped to the smallest positive float
        return np.where(use, np.log(np.clip(v, np.finfo(float).tiny, None)), v)

    def _code_ids(self, codes: pl.Series) -> np.ndarray:
        lookup = pl.Enum(self.vocab)
        # Enum cast with strict=False maps unseen codes to null; physical codes start at 0
        phys = codes.cast(lookup, strict=False).to_physical()
        return (phys.cast(pl.Int64) + FIRST_CODE).fill_null(UNKNOWN_CODE).to_numpy()

    def _fit_from_store(self, frame: pl.DataFrame) -> "IrregularSeriesFeaturizer":
        """:meth:`fit` over the event store, streaming the training rows' events in chunks (flat order: rows,
        then time): the same statistics, bit for bit, as over the rows held in memory (sums accumulate in
        that order, the 1% time quantile from the smallest values kept)."""
        store, starts, stops, cut = self._windows(frame)
        self.check_present_in_training(frame, torch.from_numpy(stops > starts))
        lengths = stops - starts
        unit = _time_unit_us(self.spec)
        n_store = len(store.codes)
        slots = n_store + 1  # the last slot: events without a code
        counts = np.zeros(slots, dtype=np.int64)
        # per store code, in flat order: a code's sums are then those of its model id (log_skewed aside)
        obs_n, obs_s1, obs_s2 = np.zeros(slots), np.zeros(slots), np.zeros(slots)
        n_items = int(lengths.sum())
        hi, low = -np.inf, _LowQuantile(n_items, 0.01)
        for code, v, t in _store_chunks(store, starts, lengths, cut, unit):
            slot = np.where(code < 0, n_store, code)
            counts += np.bincount(slot, minlength=slots)
            if not self.log_skewed:
                obs = ~np.isnan(v)
                np.add.at(obs_n, slot[obs], 1.0)
                np.add.at(obs_s1, slot[obs], v[obs])
                np.add.at(obs_s2, slot[obs], v[obs] ** 2)
            if len(t):
                hi = max(hi, float(t.max()))
                low.add(t)
        self.vocab = sorted(store.codes[i] for i in np.flatnonzero(counts[:-1] >= self.min_code_count))
        lookup = _store_lookup(store, self.vocab)
        n = len(self.vocab) + FIRST_CODE
        lo = low.value() if n_items else hi
        self.time_shift, self.time_scale = hi, (hi - lo) if hi > lo else 1.0
        unknown = np.flatnonzero((lookup == UNKNOWN_CODE) & (obs_n > 0))
        if not self.log_skewed and len(unknown) <= 1:
            # one slot per model id: its flat-order sums are the in-memory ones, bit for bit
            cnt, s1, s2 = np.zeros(n), np.zeros(n), np.zeros(n)
            used = np.flatnonzero(obs_n > 0)
            cnt[lookup[used]], s1[lookup[used]], s2[lookup[used]] = obs_n[used], obs_s1[used], obs_s2[used]
            self.log_codes = []
            self._set_moments(cnt, s1, s2, n)
            return self
        self.log_codes = []
        if self.log_skewed:  # the moments of _skewed_codes, accumulated in the in-memory order
            cnt, s1 = np.zeros(n), np.zeros(n)
            positive = np.zeros(n)
            for ids, v, obs in _store_values(store, starts, lengths, cut, unit, lookup):
                np.add.at(cnt, ids[obs], 1.0)
                np.add.at(s1, ids[obs], v[obs])
                np.add.at(positive, ids[obs], (v[obs] <= 0).astype(float))
            cnt_i = cnt.astype(np.int64)
            mean = np.divide(s1, cnt_i, out=np.zeros(n), where=cnt_i > 0)
            m2, m3 = np.zeros(n), np.zeros(n)
            for ids, v, obs in _store_values(store, starts, lengths, cut, unit, lookup):
                d = v[obs] - mean[ids[obs]]
                np.add.at(m2, ids[obs], d**2)
                np.add.at(m3, ids[obs], d**3)
            m2 = np.divide(m2, cnt_i, out=np.zeros(n), where=cnt_i > 0)
            m3 = np.divide(m3, cnt_i, out=np.zeros(n), where=cnt_i > 0)
            skew = np.divide(m3, m2**1.5, out=np.zeros(n), where=m2 > 0)
            self.log_codes = np.flatnonzero((positive == 0) & (cnt_i > 2) & (skew > 2.0)).tolist()
        cnt, s1, s2 = np.zeros(n), np.zeros(n), np.zeros(n)
        for ids, v, obs in _store_values(store, starts, lengths, cut, unit, lookup):
            v = self._log(ids, v)
            np.add.at(cnt, ids[obs], 1.0)
            np.add.at(s1, ids[obs], v[obs])
            np.add.at(s2, ids[obs], v[obs] ** 2)
        self._set_moments(cnt, s1, s2, n)
        return self

    def _set_moments(self, cnt: np.ndarray, s1: np.ndarray, s2: np.ndarray, n: int) -> None:
        """Per-code mean and sd from observed counts and sums, as :meth:`fit` computes them."""
        cnt = cnt.astype(np.int64)
        mean = np.divide(s1, cnt, out=np.zeros(n), where=cnt > 0)
        var = np.divide(s2, cnt, out=np.ones(n), where=cnt > 0) - mean**2
        std = np.sqrt(np.clip(var, 0, None))
        self.mean = mean.tolist()
        self.std = np.where(std > 1e-12, std, 1.0).tolist()

    def _transform_from_store(self, frame: pl.DataFrame) -> tuple[RaggedWindows, Tensor]:
        store, starts, stops, cut = self._windows(frame)
        kept = np.maximum(starts, stops - self.max_events)  # the most recent max_events
        items = _EventItems(_store_lookup(store, self.vocab), self.mean, self.std, self.log_codes, self.clip,
                            self.time_shift, self.time_scale, _time_unit_us(self.spec), store.time_kind)
        ragged = RaggedWindows({"code": store.code, "value": store.value, "time": store.time}, kept, stops - kept,
                               items, {"cutoff": cut}, ("code", "value", "value_missing", "time"))
        return ragged, torch.from_numpy(stops > starts)

    def transform(self, frame: pl.DataFrame) -> tuple[Ragged | RaggedWindows, Tensor]:
        if self.from_store:
            return self._transform_from_store(frame)
        rows, t, v, codes = self._events(frame)
        keep = keep_most_recent(rows, frame.height, self.max_events)
        if not keep.all():
            rows, t, v, codes = rows[keep], t[keep], v[keep], codes.filter(pl.Series(keep))
        ids = self._code_ids(codes)
        missing = np.isnan(v)
        v = self._log(ids, v)
        z = (v - np.asarray(self.mean)[ids]) / np.asarray(self.std)[ids]
        z = np.clip(np.where(missing, 0.0, z), -self.clip, self.clip)
        fields = {
            "code": torch.from_numpy(ids.astype(np.int64)),
            "value": torch.from_numpy(z.astype(np.float32)),
            "value_missing": torch.from_numpy(missing),
            "time": torch.from_numpy(((t - self.time_shift) / self.time_scale).astype(np.float32)),
        }
        return Ragged(fields, torch.from_numpy(offsets_from_rows(rows, frame.height))), self.present_rows(frame)

    def encoder_kwargs(self) -> dict[str, Any]:
        return {"n_codes": len(self.vocab) + FIRST_CODE}

    def feature_names(self) -> dict[str, list[str]]:
        return {"code": ["<pad>", "<unknown>", *self.vocab]}

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("vocab", "mean", "std", "time_shift", "time_scale", "max_events",
                                              "min_code_count", "clip", "log_skewed", "log_codes")}

    def load_state_dict(self, state: dict[str, Any]) -> "IrregularSeriesFeaturizer":
        for k, v in state.items():
            setattr(self, k, v)
        return self


FEATURIZERS.register("irregular_series")(IrregularSeriesFeaturizer)


# --- out of core: the featurizer over an event store ----------------------------------------------
def _reference_column(frame: pl.DataFrame, spec: Any) -> str:
    """The one column of a store-backed modality: ``struct{subject_id, prediction_time[, window_start]}``."""
    if len(spec.columns) != 1:
        raise ValueError(f"modality {spec.name!r} ({spec.kind} from an event store): expects exactly one "
                         f"reference column, got {spec.columns}")
    col = spec.columns[0]
    dtype = frame.schema[col]
    names = [f.name for f in dtype.fields] if isinstance(dtype, pl.Struct) else []
    if "subject_id" not in names or "prediction_time" not in names:
        raise ValueError(f"modality {spec.name!r}, column {col!r}: options name event files ('events'), so the column "
                         f"must reference them as struct{{subject_id, prediction_time[, window_start]}}, got {dtype}; "
                         "build it with mmclin.datasets.events_to_store")
    return col


def _time_unit_us(spec: Any) -> float:
    unit = spec.options.get("time_unit", "h")
    table = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6, "d": 86400e6}
    if unit not in table:
        raise ValueError(f"modality {spec.name!r}: time_unit={unit!r}; choose one of {sorted(table)}")
    return table[unit]


def store_windows(frame: pl.DataFrame, spec: Any, store: Any = None) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """Open (or build) the store a spec names (or use ``store``) and find each row's items:
    ``(store, starts, stops, cutoff)``, items ``starts[i]:stops[i]`` with ``window start <= time <= cutoff``
    (cutoff int64 us or float)."""
    from mmclin.datasets.event_store import event_source, open_event_store, window_length

    o = spec.options
    col = _reference_column(frame, spec)
    if store is None:
        src = event_source(o["events"], id_column=o.get("id_column", "subject_id"),
                           time_column=o.get("time_column", "time"), code_column=o.get("code_column", "code"),
                           value_column=o.get("value_column", "numeric_value"), text_column=o.get("text_column"),
                           codes=o.get("codes"), exclude_codes=o.get("exclude_codes"))
        store = open_event_store(src, o.get("store"), **({"partition_events": int(o["partition_events"])}
                                                         if "partition_events" in o else {}))
    ref = frame.select(pl.col(col).struct.unnest()) if frame.height else None
    n = frame.height
    if ref is None:
        return store, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    known = frame[col].is_not_null() & ref["subject_id"].is_not_null()
    cut_col = ref["prediction_time"]
    bad = known & cut_col.is_null()
    if bad.any():
        i = int(bad.arg_max())
        raise ValueError(f"modality {spec.name!r}, column {col!r}, row {i}: the reference has no prediction_time; "
                         "every row needs a cutoff")
    is_time = cut_col.dtype.is_temporal()
    if is_time != (store.time_kind == "datetime"):
        raise ValueError(f"modality {spec.name!r}, column {col!r}: prediction_time is {cut_col.dtype} but the events' "
                         f"times are {'datetimes' if store.time_kind == 'datetime' else 'numbers'}; both must be one kind")

    def physical(s: pl.Series) -> np.ndarray:
        if is_time:
            return s.cast(pl.Datetime("us")).to_physical().fill_null(0).to_numpy()
        return s.cast(pl.Float64).fill_null(0.0).to_numpy()

    cut = physical(cut_col)
    start = None
    if o.get("window") is not None:
        start = cut - window_length(o["window"], is_time)
    if "window_start" in ref.columns:
        ws = ref["window_start"]
        given = ws.is_not_null().to_numpy()
        wv = physical(ws)
        start = np.where(given, wv, -np.inf if not is_time else np.iinfo(np.int64).min) if start is None else \
            np.where(given, np.maximum(start, wv), start)
    starts, stops = store.windows(np.asarray(ref["subject_id"].fill_null(0).cast(pl.Int64).to_numpy()), cut, start,
                                  known.to_numpy())
    assert len(starts) == n
    return store, starts, stops, cut


def _store_lookup(store: Any, vocab: list[str]) -> np.ndarray:
    """Store code index -> model code id (as ``_code_ids``: unseen codes UNKNOWN); index -1 (no code) -> UNKNOWN."""
    phys = pl.Series(store.codes, dtype=pl.String).cast(pl.Enum(vocab), strict=False).to_physical()
    ids = (phys.cast(pl.Int64) + FIRST_CODE).fill_null(UNKNOWN_CODE).to_numpy()
    return np.append(ids, UNKNOWN_CODE).astype(np.int64)


def _relative_time(time: np.ndarray, cut: np.ndarray, unit_us: float, kind: str) -> np.ndarray:
    """Event time relative to the row's cutoff, as events_to_frame computes it (float64): through polars, whose
    division by a scalar (a multiplication by its reciprocal) differs from numpy's in the last bit."""
    if kind == "datetime":
        diff = np.asarray(time - cut)
        return (pl.Series(diff.reshape(-1)).cast(pl.Float64) / unit_us).to_numpy().reshape(diff.shape)
    return (time - cut).astype(np.float64)


def _store_chunks(store: Any, starts: np.ndarray, lengths: np.ndarray, cut: np.ndarray, unit_us: float):
    """``(code, value, relative time)`` of the rows' events in flat order (rows, then time), ~``budget`` at a time."""
    n, i, budget = len(starts), 0, STREAM_ITEMS
    csum = np.cumsum(lengths)
    while i < n:
        done = csum[i - 1] if i else 0
        j = min(n, max(i + 1, int(np.searchsorted(csum, done + budget, side="right"))))
        ids = item_ranges(starts[i:j], lengths[i:j])
        owner = np.repeat(np.arange(i, j), lengths[i:j])
        yield (np.asarray(store.code[ids]), np.asarray(store.value[ids]).astype(np.float64),
               _relative_time(np.asarray(store.time[ids]), cut[owner], unit_us, store.time_kind))
        i = j


def _store_values(store: Any, starts: np.ndarray, lengths: np.ndarray, cut: np.ndarray, unit_us: float,
                  lookup: np.ndarray):
    """``(model code ids, values, observed)`` chunks, as :func:`_store_chunks`."""
    for code, v, _ in _store_chunks(store, starts, lengths, cut, unit_us):
        yield lookup[code], v, ~np.isnan(v)


class _LowQuantile:
    """``np.quantile(x, q)`` (linear) of a stream of ``n`` values, keeping only its smallest ``k + 2``."""

    def __init__(self, n: int, q: float) -> None:
        self.n, self.q = n, q
        self.virtual = (n - 1) * q
        self.j = int(np.floor(self.virtual)) if n else 0
        self.keep = min(self.j + 2, n)
        self.buf = np.zeros(0)

    def add(self, x: np.ndarray) -> None:
        both = np.concatenate([self.buf, x])
        if len(both) > self.keep:
            both = np.partition(both, self.keep - 1)[:self.keep]
        self.buf = both

    def value(self) -> float:
        s = np.sort(self.buf)
        a, b = s[self.j], s[min(self.j + 1, self.n - 1)]
        # np.quantile of [a, b] at the fractional part: numpy's own interpolation, bit for bit
        return float(np.quantile(np.array([a, b]), self.virtual - self.j))


class _EventItems:
    """A batch's raw store items -> model inputs, with the featurizer's fitted state (picklable)."""

    def __init__(self, lookup: np.ndarray, mean: list[float], std: list[float], log_codes: list[int], clip: float,
                 time_shift: float, time_scale: float, unit_us: float, kind: str) -> None:
        self.lookup, self.mean, self.std = lookup, np.asarray(mean), np.asarray(std)
        self.log = np.zeros(len(self.mean), dtype=bool)
        self.log[np.asarray(log_codes, dtype=np.int64)] = True
        self.any_log = bool(len(log_codes))
        self.clip, self.time_shift, self.time_scale, self.unit_us, self.kind = clip, time_shift, time_scale, unit_us, kind

    def __call__(self, items: dict[str, np.ndarray], rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = self.lookup[items["code"]]
        v = items["value"].astype(np.float64)
        missing = np.isnan(v)
        if self.any_log:
            v = np.where(self.log[ids], np.log(np.clip(v, np.finfo(float).tiny, None)), v)
        z = (v - self.mean[ids]) / self.std[ids]
        z = np.clip(np.where(missing, 0.0, z), -self.clip, self.clip)
        t = _relative_time(items["time"], rows["cutoff"], self.unit_us, self.kind)
        return {"code": ids, "value": z.astype(np.float32), "value_missing": missing,
                "time": ((t - self.time_shift) / self.time_scale).astype(np.float32)}


class TimeEmbedding(nn.Module):
    """Time2Vec: ``phi(t) = [w0 t + b0, sin(w t + b)]``, projected to ``d_model``.

    Frequencies start log-spaced (periods from ~0.05 to ~10 normalised windows) and are learned.

    Shapes:
        t: ``[...]`` float -> ``[..., d_model]``.
    """

    def __init__(self, d_model: int, n_freq: int = 16) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 1)
        self.periodic = nn.Linear(1, n_freq)
        with torch.no_grad():
            self.periodic.weight.copy_((2 * math.pi / torch.logspace(math.log10(0.05), 1, n_freq)).unsqueeze(1))
            self.periodic.bias.uniform_(0, 2 * math.pi)
        self.out = nn.Linear(n_freq + 1, d_model)

    def forward(self, t: Tensor) -> Tensor:
        x = t.unsqueeze(-1)
        return self.out(torch.cat([self.linear(x), torch.sin(self.periodic(x))], dim=-1))


def example_events(batch_size: int, n_codes: int, seed: int = 0, max_len: int = 7) -> dict[str, Tensor]:
    """A padded batch of irregular events for conformance checks: varied lengths (one row
    empty when ``batch_size > 2``), unknown codes and missing values present.

    Shapes:
        code ``[B, L]`` long, value ``[B, L]``, value_missing ``[B, L]`` bool, time ``[B, L]``
        (sorted ascending in ``[-1, 0]`` per row), mask ``[B, L]`` bool.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (batch_size,), generator=g)
    lengths[0] = max_len
    if batch_size > 2:
        lengths[2] = 0  # a subject whose modality is present but empty after the window (edge case)
    mask = torch.arange(max_len) < lengths.unsqueeze(1)
    code = torch.randint(FIRST_CODE, n_codes, (batch_size, max_len), generator=g)
    code[0, 0] = UNKNOWN_CODE
    value = torch.randn(batch_size, max_len, generator=g)
    missing = torch.rand(batch_size, max_len, generator=g) < 0.2
    missing[0, 1] = True
    time = -torch.rand(batch_size, max_len, generator=g).sort(dim=1, descending=True).values
    return {"code": code.masked_fill(~mask, PAD_CODE), "value": value.masked_fill(~mask | missing, 0.0),
            "value_missing": missing & mask, "time": time.masked_fill(~mask, 0.0), "mask": mask}


class ObservationEmbedding(nn.Module):
    """``code_emb[c] + (v * value_emb[c] | missing_value) + time_emb(t)`` per observation.

    Shapes:
        code, value, value_missing, time: ``[B, L]`` -> ``[B, L, d_model]``.
    """

    def __init__(self, n_codes: int, d_model: int, n_freq: int = 16) -> None:
        super().__init__()
        self.code = nn.Embedding(n_codes, d_model, padding_idx=PAD_CODE)
        self.value = nn.Embedding(n_codes, d_model)
        nn.init.normal_(self.value.weight, std=d_model**-0.5)
        self.missing_value = nn.Parameter(torch.randn(d_model) * 0.02)
        self.time = TimeEmbedding(d_model, n_freq)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        code = inputs["code"]
        val = inputs["value"].unsqueeze(-1) * self.value(code)
        val = torch.where(inputs["value_missing"].unsqueeze(-1), self.missing_value.to(val.dtype), val)
        return self.norm(self.code(code) + val + self.time(inputs["time"]))


@ENCODERS.register("irregular_series")
class IrregularSeriesTransformer(ModalityEncoder):
    """Time-aware transformer over observation tokens with a learned summary token.

    Args:
        n_codes: code vocabulary size incl. pad/unknown (from the data).
        d_model: token width D. n_layers, n_heads, dropout: transformer settings.
        n_time_freq: Time2Vec frequencies. output: ``"pooled"`` (the summary token, T = 1)
            or ``"tokens"`` (summary + one token per observation, T = 1 + L, with mask).

    Shapes:
        inputs: ``code, value, value_missing, time, mask``: ``[B, L]`` (padded per batch).
        output: tokens ``[B, 1, D]`` (or ``[B, 1 + L, D]``), mask ``[B, T]``.
    """

    kind = "irregular_series"

    def __init__(self, n_codes: int, d_model: int = 64, n_layers: int = 2, n_heads: int = 4, dropout: float = 0.1,
                 n_time_freq: int = 16, output: str = "pooled") -> None:
        super().__init__()
        if output not in ("pooled", "tokens"):
            raise ValueError(f"output={output!r}: choose 'pooled' or 'tokens'")
        self.output_dim, self.n_codes, self.output = d_model, n_codes, output
        self.embed = ObservationEmbedding(n_codes, d_model, n_time_freq)
        self.summary = nn.Parameter(torch.randn(1, 1, d_model) * 0.02)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d_model, n_heads, 2 * d_model, dropout, batch_first=True, norm_first=True),
            n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, inputs: dict[str, Tensor]) -> ModalityTokens:
        x = self.embed(inputs)
        b = x.shape[0]
        # the summary token is always a valid key: a subject with no events gets no all-masked row (no NaN)
        x = torch.cat([self.summary.expand(b, -1, -1).to(x.dtype), x], dim=1)
        mask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=x.device), inputs["mask"]], dim=1)
        h = self.norm(self.encoder(x, src_key_padding_mask=~mask))
        if self.output == "pooled":
            return ModalityTokens(h[:, :1], mask[:, :1])
        return ModalityTokens(h * mask.unsqueeze(-1), mask)

    @classmethod
    def example(cls) -> "IrregularSeriesTransformer":
        return cls(n_codes=6, d_model=8, n_layers=1, n_heads=2)

    def example_input(self, batch_size: int, seed: int = 0) -> dict[str, Tensor]:
        return example_events(batch_size, self.n_codes, seed)
