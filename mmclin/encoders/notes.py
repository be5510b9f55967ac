"""Clinical notes: the ``notes`` featurizer and a built-in hashed n-gram encoder with time attention.

A cell is a ``list[struct{time, text}]`` (see :func:`mmclin.datasets.notes_to_frame`). The
featurizer keeps each subject's most recent ``max_notes`` notes, normalises their times like
the irregular-series featurizer, and turns each note's text into features with the *text
featurizer of the chosen encoder* (``encoder.text_featurizer``): here hashed word 1-2-grams
and character 3-5-grams (scikit-learn's ``HashingVectorizer``, murmurhash, nothing to
download) weighted by sublinear TF x IDF (IDF fitted on training notes only), L2-normalised.

Encoder: a note's embedding is a learned projection of its TF-IDF vector (an
``EmbeddingBag`` over the hashed terms), then an MLP; notes sit on the time axis (plus a
Time2Vec embedding of their time) and an attention pooling over the subject's notes (with a
learned "no note" slot, so an empty subject gives no NaN) makes one token.
"""
from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn

from mmclin.batch import ModalityTokens, Ragged, RaggedWindows, item_ranges, offsets_from_rows
from mmclin.datasets.event_store import STORE_OPTIONS
from mmclin.encoders.base import Featurizer, ModalityEncoder
from mmclin.encoders.irregular_series import (TimeEmbedding, _reference_column, _relative_time, _time_unit_us,
                                              check_list_struct, keep_most_recent, store_windows)
from mmclin.registry import ENCODERS, FEATURIZERS

HASHING_VERSION = "hashed-ngrams-1"  # word 1-2-grams + char_wb 3-5-grams: part of a notes store's key


class HashedNgrams:
    """Text -> sparse hashed n-gram TF-IDF (fit: IDF on training notes only).

    Options: ``n_features`` (2**17: half word 1-2-grams, half char_wb 3-5-grams),
    ``max_terms`` (1024 highest-weighted terms kept per note).
    """

    option_names: ClassVar[tuple[str, ...]] = ("n_features", "max_terms")

    def __init__(self, n_features: int = 2**17, max_terms: int = 1024) -> None:
        if n_features < 2 or n_features % 2:
            raise ValueError(f"n_features must be an even number >= 2, got {n_features}")
        self.n_features, self.max_terms = int(n_features), int(max_terms)
        self.idf: np.ndarray | None = None

    def _counts(self, texts: list[str]):
        from scipy import sparse
        from sklearn.feature_extraction.text import HashingVectorizer

        half = self.n_features // 2
        kw = dict(n_features=half, alternate_sign=False, norm=None, lowercase=True, dtype=np.float32)
        words = HashingVectorizer(analyzer="word", ngram_range=(1, 2), token_pattern=r"(?u)\b\w+\b", **kw)
        chars = HashingVectorizer(analyzer="char_wb", ngram_range=(3, 5), **kw)
        return sparse.hstack([words.transform(texts), chars.transform(texts)], format="csr")

    def fit(self, texts: list[str]) -> "HashedNgrams":
        counts = self._counts(texts)
        df = np.bincount(counts.indices, minlength=self.n_features)
        # smoothed IDF as scikit-learn's TfidfVectorizer; unseen terms get the largest weight
        self.idf = (np.log((1 + len(texts)) / (1 + df)) + 1.0).astype(np.float32)
        return self

    def transform(self, texts: list[str]) -> tuple[dict[str, Tensor], np.ndarray]:
        """``({"term": [T] long, "weight": [T] float}, offsets [n_notes + 1])``."""
        counts = self._counts(texts)
        w = (1.0 + np.log(counts.data)) * self.idf[counts.indices]  # sublinear tf x idf
        row = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
        norm = np.sqrt(np.bincount(row, weights=w.astype(np.float64) ** 2, minlength=counts.shape[0]))
        w = w / np.maximum(norm[row], 1e-12)
        terms = counts.indices.astype(np.int64)
        if self.max_terms and len(w):
            order = np.lexsort((-w, row))  # by note, heaviest first
            rank = np.arange(len(order)) - counts.indptr[row[order]]
            keep = np.sort(order[rank < self.max_terms])
            row, terms, w = row[keep], terms[keep], w[keep]
        offsets = offsets_from_rows(row, counts.shape[0])
        return {"term": torch.from_numpy(terms), "weight": torch.from_numpy(w.astype(np.float32))}, offsets

    def encoder_kwargs(self) -> dict[str, Any]:
        return {"n_features": self.n_features}

    def state_dict(self) -> dict[str, Any]:
        nz = np.flatnonzero(self.idf != self.idf.max())  # store only the terms seen in training
        return {"n_features": self.n_features, "max_terms": self.max_terms, "idf_max": float(self.idf.max()),
                "idf_index": nz.tolist(), "idf_value": self.idf[nz].tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> "HashedNgrams":
        self.n_features, self.max_terms = state["n_features"], state["max_terms"]
        self.idf = np.full(self.n_features, state["idf_max"], dtype=np.float32)
        self.idf[np.asarray(state["idf_index"], dtype=np.int64)] = np.asarray(state["idf_value"], dtype=np.float32)
        return self


class NotesFeaturizer(Featurizer):
    """``list[struct{time, text}]`` -> two-level Ragged: notes (``note_time``) -> the text
    featurizer's per-note fields (hashed terms, token ids, or one cached embedding per note).

    Options (``ModalitySpec.options``): ``max_notes`` (32 most recent per subject) plus the
    options of the encoder's text featurizer (see :class:`HashedNgrams` and
    :mod:`mmclin.encoders.notes_hf`).
    """

    kind = "notes"
    option_names: ClassVar[tuple[str, ...]] = ("max_notes", *HashedNgrams.option_names, "model_path", "mode",
                                               "max_length", "embed_batch_size", *STORE_OPTIONS)

    @property
    def from_store(self) -> bool:
        """Out of core: ``options["events"]`` names event files (MEDS ``text_value`` events, or a notes table
        with ``text_column``); the column holds references and notes are read from a notes store."""
        return "events" in self.spec.options

    def _store(self, text: Any) -> Any:
        from mmclin.datasets.event_store import event_source, open_event_store

        if not isinstance(text, HashedNgrams):
            raise ValueError(f"modality {self.spec.name!r}: notes from an event store work with the built-in 'notes' "
                             f"encoder (hashed n-grams), not {self.spec.encoder_name!r}; aggregate the notes into the "
                             "frame with notes_to_frame for it")
        o = self.spec.options
        src = event_source(o["events"], id_column=o.get("id_column", "subject_id"),
                           time_column=o.get("time_column", "time"), code_column=o.get("code_column", "code"),
                           text_column=o.get("text_column"), codes=o.get("codes"), exclude_codes=o.get("exclude_codes"),
                           kind="notes", text_key=f"{HASHING_VERSION}:{text.n_features}")
        return open_event_store(src, o.get("store"), counter=text._counts,
                                **({"partition_events": int(o["partition_events"])} if "partition_events" in o else {}))

    def _kept(self, frame: pl.DataFrame, text: Any) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(store, starts, stops, kept starts, cutoff)``: each row's notes and its most recent ``max_notes``."""
        store, starts, stops, cut = store_windows(frame, self.spec, self._store(text))
        return store, starts, stops, np.maximum(starts, stops - self.max_notes), cut

    def _text_featurizer(self) -> Any:
        from mmclin.registry import load_builtin_components

        load_builtin_components()
        enc = ENCODERS.get(self.spec.encoder_name)
        factory = getattr(enc, "text_featurizer", None)
        if factory is None:
            raise ValueError(f"modality {self.spec.name!r}: encoder {self.spec.encoder_name!r} has no text featurizer "
                             "(notes encoders define a 'text_featurizer' classmethod)")
        return factory(self.spec.options)

    def _column(self, frame: pl.DataFrame) -> str:
        if self.from_store:
            return _reference_column(frame, self.spec)
        if len(self.spec.columns) != 1:
            raise ValueError(f"modality {self.spec.name!r} (notes): expects exactly one list[struct{{time, text}}] column, "
                             f"got {self.spec.columns}")
        col = self.spec.columns[0]
        check_list_struct(frame, self.spec.name, col, {"time": "number", "text": "text"}, "one entry per note")
        return col

    def _notes(self, frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, list[str]]:
        col = self._column(frame)
        flat = (frame.select(pl.int_range(pl.len(), dtype=pl.Int64).alias("__row"), pl.col(col))
                .explode(col).filter(pl.col(col).is_not_null()).unnest(col)
                .filter(_has_text(pl.col("text")))  # an empty note is no note (as in notes_to_frame)
                .with_columns(pl.col("time").cast(pl.Float64)))
        bad = flat.filter(pl.col("time").is_null() | ~pl.col("time").is_finite())
        if bad.height:
            raise ValueError(f"modality {self.spec.name!r}, column {col!r}, row {bad['__row'][0]}: a note has no finite time")
        flat = flat.sort(["__row", "time"], maintain_order=True)
        rows, t = flat["__row"].to_numpy(), flat["time"].to_numpy()
        keep = keep_most_recent(rows, frame.height, self.max_notes)
        return rows[keep], t[keep], flat["text"].filter(pl.Series(keep)).to_list()

    def present_rows(self, frame: pl.DataFrame) -> Tensor:
        """Present when the row has at least one note with non-blank text: a row of empty notes is
        absent (the same rule as :func:`mmclin.datasets.notes_to_frame`), never an all-padding row."""
        if self.from_store:
            _, starts, stops, _ = store_windows(frame, self.spec, self._store(self._text_featurizer()))
            return torch.from_numpy(stops > starts)
        col = self._column(frame)
        p = frame.select(pl.col(col).list.eval(_has_text(pl.element().struct.field("text"))).list.any()).to_series()
        return torch.from_numpy(p.fill_null(False).to_numpy().copy())

    def fit(self, frame: pl.DataFrame) -> "NotesFeaturizer":
        self.max_notes = int(self.spec.options.get("max_notes", 32))
        if self.max_notes < 1:
            raise ValueError(f"modality {self.spec.name!r}: max_notes must be >= 1, got {self.max_notes}")
        if self.from_store:
            return self._fit_from_store(frame)
        present = self.present_rows(frame)
        col = self._column(frame)
        if frame.height and not bool(present.any()) and frame[col].list.len().fill_null(0).sum() > 0:
            raise ValueError(f"modality {self.spec.name!r}, column {col!r}: every training note has empty or "
                             "whitespace-only text (an empty note is no note); the modality has no data in training")
        self.check_present_in_training(frame, present)
        rows, t, texts = self._notes(frame)
        text = self._text_featurizer()
        foreign = sorted(set(self.spec.options) & set(self.option_names) - {"max_notes", *text.option_names})
        if foreign:
            raise ValueError(f"modality {self.spec.name!r}: option(s) {foreign} do not apply to encoder "
                             f"{self.spec.encoder_name!r} (its text options: {list(text.option_names)})")
        self.text = text.fit(texts)
        hi = float(t.max())
        lo = float(np.quantile(t, 0.01))
        self.time_shift, self.time_scale = hi, (hi - lo) if hi > lo else 1.0
        return self

    def _fit_from_store(self, frame: pl.DataFrame) -> "NotesFeaturizer":
        """:meth:`fit` over a notes store: IDF from the term counts of the training rows' most recent notes
        (hashed once, when the store was built), times as in memory; the same state, bit for bit."""
        text = self._text_featurizer()
        foreign = sorted(set(self.spec.options) & set(self.option_names) - {"max_notes", *text.option_names,
                                                                             *STORE_OPTIONS})
        if foreign:
            raise ValueError(f"modality {self.spec.name!r}: option(s) {foreign} do not apply to encoder "
                             f"{self.spec.encoder_name!r} (its text options: {list(text.option_names)})")
        store, starts, stops, kept, cut = self._kept(frame, text)
        self.check_present_in_training(frame, torch.from_numpy(stops > starts))
        notes = item_ranges(kept, stops - kept)  # rows x max_notes at most
        df = np.zeros(text.n_features, dtype=np.int64)
        for c in np.array_split(notes, max(1, len(notes) // 200_000)):
            if len(c):
                terms = item_ranges(np.asarray(store.term_offsets[c]), np.asarray(store.term_offsets[c + 1] - store.term_offsets[c]))
                df += np.bincount(np.asarray(store.term[terms]), minlength=text.n_features)
        text.idf = (np.log((1 + len(notes)) / (1 + df)) + 1.0).astype(np.float32)
        self.text = text
        owner = np.repeat(np.arange(len(kept)), stops - kept)
        t = _relative_time(np.asarray(store.time[notes]), cut[owner], _time_unit_us(self.spec), store.time_kind)
        hi = float(t.max())
        lo = float(np.quantile(t, 0.01))
        self.time_shift, self.time_scale = hi, (hi - lo) if hi > lo else 1.0
        return self

    def transform(self, frame: pl.DataFrame) -> tuple[Ragged | RaggedWindows, Tensor]:
        if self.from_store:
            store, starts, stops, kept, cut = self._kept(frame, self.text)
            mask_key = getattr(self.text, "mask_key", "term_mask")
            ragged = RaggedWindows({"time": store.time}, kept, stops - kept,
                                   _NoteTimes(self.time_shift, self.time_scale, _time_unit_us(self.spec), store.time_kind),
                                   {"cutoff": cut}, ("note_time",), "note_mask",
                                   _NoteTerms(store, self.text, mask_key), ("term", "weight", mask_key))
            return ragged, torch.from_numpy(stops > starts)
        rows, t, texts = self._notes(frame)
        fields, inner_offsets = self.text.transform(texts)
        note_fields = {"note_time": torch.from_numpy(((t - self.time_shift) / self.time_scale).astype(np.float32))}
        note_fields.update({k: v for k, v in fields.items() if inner_offsets is None})
        inner = None
        if inner_offsets is not None:
            inner = Ragged(fields, torch.from_numpy(inner_offsets), mask_key=getattr(self.text, "mask_key", "term_mask"))
        outer = Ragged(note_fields, torch.from_numpy(offsets_from_rows(rows, frame.height)), "note_mask", inner)
        return outer, self.present_rows(frame)

    def encoder_kwargs(self) -> dict[str, Any]:
        return self.text.encoder_kwargs()

    def state_dict(self) -> dict[str, Any]:
        return {"max_notes": self.max_notes, "time_shift": self.time_shift, "time_scale": self.time_scale,
                "text": self.text.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> "NotesFeaturizer":
        self.max_notes, self.time_shift, self.time_scale = state["max_notes"], state["time_shift"], state["time_scale"]
        self.text = self._text_featurizer().load_state_dict(state["text"])
        return self


FEATURIZERS.register("notes")(NotesFeaturizer)


class _NoteTimes:
    """Note times of a batch, normalised as the featurizer was fitted (picklable)."""

    def __init__(self, shift: float, scale: float, unit_us: float, kind: str) -> None:
        self.shift, self.scale, self.unit_us, self.kind = shift, scale, unit_us, kind

    def __call__(self, items: dict[str, np.ndarray], rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t = _relative_time(items["time"], rows["cutoff"], self.unit_us, self.kind)
        return {"note_time": ((t - self.shift) / self.scale).astype(np.float32)}


class _NoteTerms:
    """The inner level of a notes batch: each note's stored term counts -> TF-IDF weights (as
    :meth:`HashedNgrams.transform`, on the batch's notes only), padded to ``[B, L, T]``."""

    def __init__(self, store: Any, text: HashedNgrams, mask_key: str) -> None:
        self.store, self.idf, self.max_terms, self.mask_key = store, text.idf, text.max_terms, mask_key

    def __call__(self, src: np.ndarray, mask: np.ndarray) -> dict[str, Tensor]:
        st = self.store
        notes = src[mask]
        lo = np.asarray(st.term_offsets[notes])
        lens = np.asarray(st.term_offsets[notes + 1]) - lo
        ids = item_ranges(lo, lens)
        indices, data = np.asarray(st.term[ids]), np.asarray(st.count[ids])
        indptr = np.concatenate([[0], np.cumsum(lens)])
        n = len(notes)
        w = (1.0 + np.log(data)) * self.idf[indices]  # the arithmetic of HashedNgrams.transform
        row = np.repeat(np.arange(n), lens)
        norm = np.sqrt(np.bincount(row, weights=w.astype(np.float64) ** 2, minlength=n))
        w = w / np.maximum(norm[row], 1e-12)
        terms = indices.astype(np.int64)
        if self.max_terms and len(w):
            order = np.lexsort((-w, row))
            rank = np.arange(len(order)) - indptr[row[order]]
            keep = np.sort(order[rank < self.max_terms])
            row, terms, w = row[keep], terms[keep], w[keep]
        # (one empty note when the batch has none, so the padding below indexes a valid offset)
        inner = Ragged({"term": torch.from_numpy(terms), "weight": torch.from_numpy(w.astype(np.float32))},
                       torch.from_numpy(offsets_from_rows(row, max(n, 1))), mask_key=self.mask_key)
        flat = mask.reshape(-1)
        slot = np.zeros(len(flat), dtype=np.int64)
        slot[flat] = np.arange(n)
        out = inner._pad_rows(torch.from_numpy(slot), torch.from_numpy(flat))
        return {k: v.reshape(*mask.shape, *v.shape[1:]) for k, v in out.items()}


def _has_text(text: pl.Expr) -> pl.Expr:
    """Non-null text with at least one non-whitespace character (null-safe: null -> False)."""
    return text.is_not_null() & (text.cast(pl.String).str.strip_chars().str.len_chars() > 0).fill_null(False)


class TimeAttentionPool(nn.Module):
    """Attention pooling of notes on the time axis, with a learned "no note" slot.

    ``h_j = x_j + time_emb(t_j)``, ``a = softmax_j(v^T tanh(W h_j))`` over the valid notes and
    the null slot, ``pooled = sum_j a_j h_j + mean_j x_j`` (the mean over the valid notes; 0 when none).

    Shapes:
        x ``[B, L, D]``, time ``[B, L]``, mask ``[B, L]`` -> ``[B, D]``.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.time = TimeEmbedding(d_model)
        self.score = nn.Sequential(nn.Linear(d_model, d_model), nn.Tanh(), nn.Linear(d_model, 1, bias=False))  # softmax: a bias cancels
        self.null = nn.Parameter(torch.randn(d_model) * 0.02)

    def forward(self, x: Tensor, time: Tensor, mask: Tensor) -> Tensor:
        h = x + self.time(time)
        h = torch.cat([self.null.to(h.dtype).expand(h.shape[0], 1, -1), h], 1)
        valid = torch.cat([torch.ones_like(mask[:, :1]), mask], 1)
        a = self.score(h).squeeze(-1).masked_fill(~valid, float("-inf")).softmax(-1)
        # plus the plain mean of the notes: attention alone tends to pick one note and drop the rest
        m = mask.unsqueeze(-1).to(x.dtype)
        return (a.unsqueeze(-1) * h).sum(1) + (x * m).sum(1) / m.sum(1).clamp_min(1.0)


@ENCODERS.register("notes")
class HashedNotesEncoder(ModalityEncoder):
    """Notes from hashed n-gram TF-IDF: learned projection + MLP per note, time attention pooling.

    Args:
        n_features: hashed feature space (from the data). d_model: width D. dropout.

    Shapes:
        inputs: ``note_time, note_mask``: ``[B, L]``; ``term`` (long), ``weight``, ``term_mask``: ``[B, L, K]``.
        output: tokens ``[B, 1, D]``, mask True.
    """

    kind = "notes"

    def __init__(self, n_features: int, d_model: int = 64, dropout: float = 0.1) -> None:
        super().__init__()
        self.output_dim, self.n_features = d_model, n_features
        self.project = nn.EmbeddingBag(n_features, d_model, mode="sum")
        nn.init.normal_(self.project.weight, std=0.1)
        self.bias = nn.Parameter(torch.zeros(d_model))
        self.mlp = nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.Linear(d_model, d_model))
        self.norm = nn.LayerNorm(d_model)
        self.pool = TimeAttentionPool(d_model)

    @classmethod
    def text_featurizer(cls, options: dict[str, Any]) -> HashedNgrams:
        return HashedNgrams(**{k: options[k] for k in HashedNgrams.option_names if k in options})

    def forward(self, inputs: dict[str, Tensor]) -> ModalityTokens:
        b, length, k = inputs["term"].shape
        weight = (inputs["weight"] * inputs["term_mask"]).reshape(b * length, k)
        x = self.project(inputs["term"].reshape(b * length, k), per_sample_weights=weight).view(b, length, -1)
        x = x + self.bias
        x = self.norm(x + self.mlp(x))  # residual: the linear TF-IDF projection reaches the pooling unchanged
        pooled = self.pool(x, inputs["note_time"], inputs["note_mask"])
        return ModalityTokens(pooled.unsqueeze(1), torch.ones(b, 1, dtype=torch.bool, device=pooled.device))

    @classmethod
    def example(cls) -> "HashedNotesEncoder":
        return cls(n_features=64, d_model=8)

    def example_input(self, batch_size: int, seed: int = 0) -> dict[str, Tensor]:
        return example_notes(batch_size, seed, {"term": lambda g, shape: torch.randint(0, self.n_features, shape, generator=g),
                                                "weight": lambda g, shape: torch.rand(shape, generator=g)}, "term_mask")


def example_notes(batch_size: int, seed: int, inner: dict[str, Any], inner_mask: str | None,
                  max_notes: int = 3, max_terms: int = 5) -> dict[str, Tensor]:
    """A padded notes batch for conformance checks: varied note counts (row 2 empty when
    ``batch_size > 2``) and per-note lengths.

    Shapes:
        note_time, note_mask ``[B, L]``; each ``inner`` field ``[B, L, K]`` (or ``[B, L, ...]``
        when ``inner_mask`` is None: one vector per note), ``inner_mask`` ``[B, L, K]``.
    """
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(1, max_notes + 1, (batch_size,), generator=g)
    n[0] = max_notes
    if batch_size > 2:
        n[2] = 0
    note_mask = torch.arange(max_notes) < n.unsqueeze(1)
    out = {"note_time": (-torch.rand(batch_size, max_notes, generator=g)).masked_fill(~note_mask, 0.0), "note_mask": note_mask}
    if inner_mask is None:
        for key, make in inner.items():
            v = make(g, (batch_size, max_notes))
            out[key] = v * note_mask.view(*note_mask.shape, *([1] * (v.dim() - 2))).to(v.dtype)
        return out
    k = torch.randint(1, max_terms + 1, (batch_size, max_notes), generator=g)
    k[0, 0] = max_terms
    term_mask = (torch.arange(max_terms) < k.unsqueeze(-1)) & note_mask.unsqueeze(-1)
    for key, make in inner.items():
        v = make(g, (batch_size, max_notes, max_terms))
        out[key] = v * term_mask.to(v.dtype)
    out[inner_mask] = term_mask
    return out


def text_digest(texts: list[str]) -> str:
    """A short content hash of texts (cache keys)."""
    h = hashlib.sha1()
    for t in texts:
        h.update(t.encode("utf-8", "replace"))
        h.update(b"\x00")
    return h.hexdigest()[:16]
