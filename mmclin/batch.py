"""The tensors that flow between data, encoders, fusion heads and tasks (batches, tokens, ragged rows)."""
from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass
class ModalityTokens:
    """An encoder's output.

    Shapes:
        tokens: ``[B, T, D]``; a pooled vector is ``T = 1``.
        mask: ``[B, T]`` bool, True where a token is real.
    """

    tokens: Tensor
    mask: Tensor

    def validate(self, name: str = "?") -> None:
        if self.tokens.dim() != 3:
            raise ValueError(f"modality {name!r}: tokens must be [B, T, D], got shape {tuple(self.tokens.shape)}")
        if self.mask.shape != self.tokens.shape[:2]:
            raise ValueError(
                f"modality {name!r}: mask has shape {tuple(self.mask.shape)} but tokens are "
                f"{tuple(self.tokens.shape)}; expected mask [B, T] = {tuple(self.tokens.shape[:2])}"
            )
        if self.mask.dtype != torch.bool:
            raise ValueError(f"modality {name!r}: mask must be bool, got {self.mask.dtype}")

    def pooled(self) -> Tensor:
        """Masked mean over tokens, ``[B, D]``; zeros where a sample has no token."""
        m = self.mask.unsqueeze(-1).to(self.tokens.dtype)
        return (self.tokens * m).sum(1) / m.sum(1).clamp_min(1.0)


@dataclass
class FusionOutput:
    """A fusion head's output.

    Shapes:
        pooled: ``[B, D]``.
        aux_loss: scalar or None (e.g. a contrastive term).
        per_step: optional dict of ``[B, D]`` intermediate states (e.g. one per modality).
    """

    pooled: Tensor
    aux_loss: Tensor | None = None
    per_step: dict[str, Tensor] | None = None


@dataclass
class ModalityBatch:
    """One mini-batch.

    Shapes:
        inputs[m][k]: ``[B, ...]`` for every modality ``m`` and input tensor ``k``.
        present[m]: ``[B]`` bool; False means the modality is absent for that sample.
        target: ``[B, ...]`` tensor, or None at prediction time.
    """

    inputs: dict[str, dict[str, Tensor]]
    present: dict[str, Tensor]
    target: Tensor | None = None
    index: Tensor | None = field(default=None)

    @property
    def batch_size(self) -> int:
        return int(next(iter(self.present.values())).shape[0])

    def validate(self) -> None:
        if set(self.inputs) != set(self.present):
            raise ValueError(
                f"inputs have modalities {sorted(self.inputs)} but present has {sorted(self.present)}"
            )
        sizes: dict[str, int] = {}
        for name in sorted(self.present):
            p = self.present[name]
            if p.dim() != 1 or p.dtype != torch.bool:
                raise ValueError(f"present[{name!r}] must be a 1-D bool tensor, got {p.dtype} {tuple(p.shape)}")
            sizes[f"present[{name!r}]"] = p.shape[0]
            for key, t in sorted(self.inputs[name].items()):
                sizes[f"{name!r}/{key!r}"] = t.shape[0]
        if self.target is not None:
            sizes["target"] = self.target.shape[0]
        first_name, first = next(iter(sizes.items()))
        for name, n in sizes.items():
            if n != first:
                raise ValueError(f"{name} has {n} samples but {first_name} has {first}")

    def to(self, device: torch.device | str) -> "ModalityBatch":
        device = torch.device(device)
        tensors = [*self.present.values(), *(t for d in self.inputs.values() for t in d.values()),
                   *([] if self.target is None else [self.target])]
        if device.index is None and all(t.device.type == device.type for t in tensors):
            return self  # already there: fifteen no-op copies per step are measurable on a small model
        return ModalityBatch(
            inputs={m: {k: t.to(device, non_blocking=True) for k, t in d.items()} for m, d in self.inputs.items()},
            present={m: p.to(device, non_blocking=True) for m, p in self.present.items()},
            target=None if self.target is None else self.target.to(device, non_blocking=True),
            index=self.index,
        )

    def select(self, idx: Tensor) -> "ModalityBatch":
        return ModalityBatch(
            inputs={m: {k: t[idx] for k, t in d.items()} for m, d in self.inputs.items()},
            present={m: p[idx] for m, p in self.present.items()},
            target=None if self.target is None else self.target[idx],
            index=None if self.index is None else self.index[idx],
        )


def describe(obj: Any) -> str:
    if isinstance(obj, Tensor):
        return f"{obj.dtype} {tuple(obj.shape)}"
    return type(obj).__name__


@dataclass
class Ragged:
    """Variable-length rows (events, notes) stored flat and padded per batch, never per table.

    A subject with 20,000 events and one with 3 live in the same table as one flat array of
    items plus row offsets; a batch is padded only to the longest row *in that batch*. Every
    step is a vectorised gather (no Python loop over rows).

        >>> r = Ragged({"x": torch.tensor([1.0, 2.0, 3.0, 4.0])}, torch.tensor([0, 3, 3, 4]))
        >>> out = r.pad(torch.tensor([1, 2]))   # rows of length 0 and 1: padded to 1, not to 3
        >>> out["x"].tolist(), out["mask"].tolist()
        ([[0.0], [4.0]], [[False], [True]])

    Args:
        fields: ``{name: [E, ...]}`` item-level tensors, all rows' items back to back.
        offsets: long ``[N + 1]``; row ``i`` owns items ``offsets[i]:offsets[i + 1]``.
        mask_key: name of the padding mask in :meth:`pad`'s output.
        inner: optional ``Ragged`` whose rows are these items (notes -> the tokens of each note).

    Shapes:
        ``pad(idx)`` for ``B = len(idx)`` rows whose longest has ``L`` items (``L >= 1``):
        ``fields[k]: [B, L, ...]``, ``mask_key: [B, L]`` bool; inner fields ``[B, L, L2, ...]``
        with ``inner.mask_key: [B, L, L2]``. Padded slots hold 0 (False for bool fields).
    """

    fields: dict[str, Tensor]
    offsets: Tensor
    mask_key: str = "mask"
    inner: "Ragged | None" = None
    _lengths: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.offsets = torch.as_tensor(self.offsets, dtype=torch.long)
        if self.offsets.dim() != 1 or self.offsets.numel() < 1 or int(self.offsets[0]) != 0:
            raise ValueError(f"Ragged offsets must be a 1-D tensor starting at 0, got {tuple(self.offsets.shape)}")
        n_items = int(self.offsets[-1])
        for k, t in self.fields.items():
            if t.shape[0] != n_items:
                raise ValueError(f"Ragged field {k!r} has {t.shape[0]} items but offsets end at {n_items}")
        if self.inner is not None and len(self.inner) != n_items:
            raise ValueError(f"Ragged inner level has {len(self.inner)} rows but this level has {n_items} items")
        names = self.keys()
        if len(set(names)) != len(names):
            raise ValueError(f"Ragged output names collide: {names}")

    def __len__(self) -> int:
        return int(self.offsets.numel() - 1)

    def keys(self) -> list[str]:
        inner = self.inner.keys() if self.inner is not None else []
        return [*self.fields, self.mask_key, *inner]

    @property
    def lengths(self) -> Tensor:
        """Items per row, ``[N]``."""
        if self._lengths is None:
            self._lengths = self.offsets[1:] - self.offsets[:-1]
        return self._lengths

    @property
    def n_items(self) -> int:
        return int(self.offsets[-1])

    # --- subsetting and padding ----------------------------------------------------------
    def take(self, idx: Tensor | np.ndarray) -> "Ragged":
        """The rows ``idx`` as a compact ``Ragged`` (for train/validation subsets)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        lengths = self.lengths[idx]
        items = _item_ids(self.offsets[idx], lengths)
        offsets = torch.zeros(len(idx) + 1, dtype=torch.long)
        torch.cumsum(lengths, 0, out=offsets[1:])
        inner = self.inner.take(items) if self.inner is not None else None
        return Ragged({k: t[items] for k, t in self.fields.items()}, offsets, self.mask_key, inner)

    def pad(self, idx: Tensor, max_len: int | None = None) -> dict[str, Tensor]:
        """Dense tensors for rows ``idx``, padded to the longest of them (see the class Shapes)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        return self._pad_rows(idx, torch.ones(len(idx), dtype=torch.bool), max_len)

    def _pad_rows(self, rows: Tensor, valid: Tensor, max_len: int | None = None) -> dict[str, Tensor]:
        starts = self.offsets[rows]
        lengths = torch.where(valid, self.offsets[rows + 1] - starts, 0)
        if max_len is not None:
            lengths = lengths.clamp_max(max_len)
        width = max(int(lengths.max()) if len(rows) else 0, 1)  # >= 1 column: empty rows stay well-formed
        pos = torch.arange(width)
        mask = pos < lengths.unsqueeze(1)  # [B, L]
        src = torch.where(mask, starts.unsqueeze(1) + pos, 0)
        out: dict[str, Tensor] = {}
        for k, t in self.fields.items():
            if t.shape[0] == 0:
                out[k] = torch.zeros((*mask.shape, *t.shape[1:]), dtype=t.dtype)
                continue
            g = t[src]
            m = mask.reshape(*mask.shape, *([1] * (t.dim() - 1)))
            out[k] = torch.where(m, g, torch.zeros((), dtype=t.dtype))
        out[self.mask_key] = mask
        if self.inner is not None:
            inner = self.inner._pad_rows(src.reshape(-1), mask.reshape(-1))
            out.update({k: v.reshape(*mask.shape, *v.shape[1:]) for k, v in inner.items()})
        return out


def _item_ids(starts: Tensor, lengths: Tensor) -> Tensor:
    """Concatenated ranges ``[starts[i], starts[i] + lengths[i])`` without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.long)
    row_start_in_out = torch.cumsum(lengths, 0) - lengths
    return torch.repeat_interleave(starts - row_start_in_out, lengths) + torch.arange(total)


def offsets_from_rows(row_of_item: np.ndarray, n_rows: int) -> np.ndarray:
    """Offsets ``[N + 1]`` from each item's row index (items already grouped by row, in order)."""
    counts = np.bincount(row_of_item, minlength=n_rows) if len(row_of_item) else np.zeros(n_rows, dtype=np.int64)
    out = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def item_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ranges ``[starts[i], starts[i] + lengths[i])`` (numpy; no Python loop)."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    before = np.cumsum(lengths) - lengths
    return np.repeat(starts - before, lengths) + np.arange(total, dtype=np.int64)


@dataclass
class RaggedWindows:
    """Rows that are windows into shared item arrays (possibly memory-mapped), padded per batch.

    Where :class:`Ragged` owns its items (rows back to back), here row ``i`` reads items
    ``starts[i] : starts[i] + lengths[i]`` of ``items``, which several rows may share (a subject's
    events seen at several prediction times) and which may live on disk (``np.load(mmap_mode="r")``):
    :meth:`take` subsets rows without touching items, and :meth:`pad` gathers only the batch's
    items, then maps them with ``transform`` (fitted state such as code ids and standardisation,
    applied per batch so one store serves every fold). Memory grows with rows and the batch, not
    with the items.

    Args:
        items: ``{name: [E]}`` numpy arrays, shared by all rows.
        starts, lengths: int64 ``[N]``; a row of length 0 has no items.
        transform: ``(items {name: [B, L]}, rows {name: [B, 1]}) -> {field: [B, L] numpy}`` (row values
            broadcast against the items); its output at padded slots is ignored (replaced by 0 / False).
        row_fields: ``{name: [N]}`` per-row values ``transform`` needs (e.g. each row's cutoff).
        names: the field names ``transform`` returns (for :meth:`keys`).

    Shapes:
        ``pad(idx)`` for ``B`` rows whose longest has ``L`` items (``L >= 1``): each field ``[B, L]``,
        ``mask_key: [B, L]`` bool, as :meth:`Ragged.pad`.
    """

    items: dict[str, np.ndarray]
    starts: np.ndarray
    row_lengths: np.ndarray
    transform: Any
    row_fields: dict[str, np.ndarray] = field(default_factory=dict)
    names: tuple[str, ...] = ()
    mask_key: str = "mask"
    inner: Any = None  # ``(items [B, L] index, mask [B, L]) -> {name: [B, L, L2, ...]}``: a second level (note terms)
    inner_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.starts = np.asarray(self.starts, dtype=np.int64)
        self.row_lengths = np.asarray(self.row_lengths, dtype=np.int64)
        if self.starts.shape != self.row_lengths.shape or self.starts.ndim != 1:
            raise ValueError(f"RaggedWindows: starts {self.starts.shape} and lengths {self.row_lengths.shape} must be "
                             "1-D of one length")
        for k, v in self.row_fields.items():
            if len(v) != len(self.starts):
                raise ValueError(f"RaggedWindows row field {k!r} has {len(v)} rows but there are {len(self.starts)}")

    def __len__(self) -> int:
        return int(len(self.starts))

    def keys(self) -> list[str]:
        return [*self.names, self.mask_key, *self.inner_names]

    @property
    def lengths(self) -> Tensor:
        """Items per row, ``[N]``."""
        return torch.from_numpy(self.row_lengths)

    @property
    def n_items(self) -> int:
        return int(self.row_lengths.sum())

    def take(self, idx: Tensor | np.ndarray) -> "RaggedWindows":
        """The rows ``idx`` (no item is copied)."""
        i = np.asarray(torch.as_tensor(idx, dtype=torch.long).numpy())
        return RaggedWindows(self.items, self.starts[i], self.row_lengths[i], self.transform,
                             {k: v[i] for k, v in self.row_fields.items()}, self.names, self.mask_key, self.inner,
                             self.inner_names)

    def pad(self, idx: Tensor | np.ndarray, max_len: int | None = None) -> dict[str, Tensor]:
        """Dense tensors for rows ``idx``, padded to the longest of them (see the class Shapes)."""
        i = np.asarray(torch.as_tensor(idx, dtype=torch.long).numpy())
        starts, lengths = self.starts[i], self.row_lengths[i]
        if max_len is not None:
            lengths = np.minimum(lengths, max_len)
        width = max(int(lengths.max()) if len(i) else 0, 1)
        mask = np.arange(width) < lengths[:, None]
        src = np.where(mask, starts[:, None] + np.arange(width), 0)
        n_items = min((len(a) for a in self.items.values()), default=0)
        if n_items == 0:  # no items at all: every row is padding
            raw = {k: np.zeros(mask.shape, dtype=a.dtype) for k, a in self.items.items()}
        else:
            raw = {k: np.asarray(a[src]) for k, a in self.items.items()}
        out_np = self.transform(raw, {k: v[i][:, None] for k, v in self.row_fields.items()})
        mask_t = torch.from_numpy(mask)
        out: dict[str, Tensor] = {}
        for k in self.names:
            t = torch.from_numpy(np.ascontiguousarray(out_np[k]))
            out[k] = torch.where(mask_t, t, torch.zeros((), dtype=t.dtype))
        out[self.mask_key] = mask_t
        if self.inner is not None:
            out.update(self.inner(src, mask))
        return out

    @property
    def fields(self) -> "Mapping[str, Tensor]":
        """Every row's items after ``transform``, back to back (as :attr:`Ragged.fields`), computed per key
        when asked: materialises ``n_items`` values (rows x their kept length), gathered ~4M at a time."""
        return _WindowFields(self)


class _WindowFields(Mapping):
    """:attr:`RaggedWindows.fields`: one key at a time, nothing kept."""

    def __init__(self, rw: RaggedWindows) -> None:
        self.rw = rw

    def __iter__(self) -> Iterator[str]:
        return iter(self.rw.names)

    def __len__(self) -> int:
        return len(self.rw.names)

    def __getitem__(self, key: str) -> Tensor:
        if key not in self.rw.names:
            raise KeyError(key)
        rw, parts = self.rw, []
        n, start = len(rw), 0
        while start < n:
            budget = np.cumsum(rw.row_lengths[start:])
            stop = min(n, start + max(1, int(np.searchsorted(budget, 1 << 22, side="right"))))
            rows = np.arange(start, stop)
            ids = item_ranges(rw.starts[rows], rw.row_lengths[rows])
            start = stop
            if not len(ids):
                continue
            owner = np.repeat(rows, rw.row_lengths[rows])
            got = rw.transform({k: np.asarray(a[ids])[None, :] for k, a in rw.items.items()},
                               {k: v[owner][None, :] for k, v in rw.row_fields.items()})
            parts.append(torch.from_numpy(np.ascontiguousarray(got[key][0])))
        return torch.cat(parts) if parts else torch.zeros(0)
