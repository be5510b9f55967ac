"""From a one-row-per-subject frame to tensors, and whole-batch loading.

Featurized once into in-memory tensors; a batch is one fancy-index per tensor (no
per-sample ``__getitem__`` + collate), which keeps data loading off the profile.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import polars as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from mmclin.batch import ModalityBatch
from mmclin.cohort import ModalitySpec, check_columns
from mmclin.encoders.base import Featurizer
from mmclin.registry import FEATURIZERS
from mmclin.training.distributed import current_rank_world, n_shard_batches, shard_batches
from mmclin.batch import Ragged, RaggedWindows

_RAGGED = (Ragged, RaggedWindows)  # padded per batch; RaggedWindows may read a memory-mapped event store


def fit_featurizers(frame: pl.DataFrame, specs: list[ModalitySpec]) -> dict[str, Featurizer]:
    """Fit one featurizer per modality on training rows only."""
    from mmclin.registry import load_builtin_components

    load_builtin_components()
    check_columns(frame, specs, "the training frame")
    out = {}
    for s in specs:
        if s.kind not in FEATURIZERS:
            raise ValueError(
                f"modality {s.name!r}: kind {s.kind!r} has no featurizer installed yet "
                f"(available: {FEATURIZERS.names()})"
            )
        out[s.name] = FEATURIZERS.get(s.kind)(s).fit(frame)
    return out


@dataclass
class TensorTable:
    """All rows of a frame as tensors: ``inputs[m][k]: [N, ...]``, ``present[m]: [N]``, ``target: [N, ...]``.

    A modality whose featurizer returns a :class:`~mmclin.batch.Ragged` (events,
    notes) is stored flat and padded per batch, to the longest row of that batch only.
    """

    inputs: dict[str, dict[str, Tensor] | Ragged | RaggedWindows]
    present: dict[str, Tensor]
    target: Tensor | None = None

    def __len__(self) -> int:
        return int(next(iter(self.present.values())).shape[0])

    def batch(self, idx: Tensor) -> ModalityBatch:
        return ModalityBatch(
            inputs={m: d.pad(idx) if isinstance(d, _RAGGED) else {k: t[idx] for k, t in d.items()}
                    for m, d in self.inputs.items()},
            present={m: p[idx] for m, p in self.present.items()},
            target=None if self.target is None else self.target[idx],
            index=idx,
        )

    def subset(self, idx: np.ndarray | Tensor) -> "TensorTable":
        idx = torch.as_tensor(idx, dtype=torch.long)
        inputs = {m: d.take(idx) if isinstance(d, _RAGGED) else {k: t[idx] for k, t in d.items()}
                  for m, d in self.inputs.items()}
        return TensorTable(inputs, {m: p[idx] for m, p in self.present.items()},
                           None if self.target is None else self.target[idx])


def featurize(frame: pl.DataFrame, featurizers: dict[str, Featurizer], target: Tensor | None = None,
              where: str = "the frame") -> TensorTable:
    check_columns(frame, [f.spec for f in featurizers.values()], where)
    inputs, present = {}, {}
    for name in sorted(featurizers):
        inputs[name], present[name] = featurizers[name].transform(frame)
    # a featurizer bug surfaces here, named, not mid-training (ragged rows are checked by their lengths)
    ModalityBatch({m: {"lengths": d.lengths} if isinstance(d, _RAGGED) else d for m, d in inputs.items()},
                  present, target).validate()
    return TensorTable(inputs, present, target)


class _BatchIndexDataset(Dataset):
    def __init__(self, table: TensorTable) -> None:
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, idx: Tensor) -> ModalityBatch:
        return self.table.batch(idx)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's shuffling: a function of (seed, epoch) only, so a run resumed from an
    epoch-end checkpoint shuffles exactly as the uninterrupted run did."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class IndexBatches(Sampler):
    """Yields index tensors of one batch each: a permutation per epoch seeded by (seed, epoch) when shuffling.

    Lightning calls :meth:`set_epoch` before each epoch; used on its own, each pass counts as the next epoch.

    With ``shard=True`` and an initialised process group of several ranks (Lightning DDP),
    each rank yields its own disjoint slice of every global step (see
    :mod:`mmclin.training.distributed`); alone it behaves exactly as without ``shard``.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False,
                 shard: bool = False) -> None:
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.shard, self.seed = shard, seed
        self.epoch: int | None = None  # set by Lightning; None: count passes
        self._passes = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self, epoch: int, world: int) -> Tensor:
        """The epoch's row order (identical on every rank); batches are its consecutive slices."""
        if self.shuffle:
            return torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch_seed(self.seed, epoch)))
        return torch.arange(self.n)

    def __iter__(self) -> Iterator[Tensor]:
        epoch = self._passes if self.epoch is None else self.epoch
        self._passes += 1
        rank, world = current_rank_world() if self.shard else (0, 1)
        order = self._order(epoch, world)
        if world > 1:  # every rank drew the same permutation: take this rank's slice of each step
            yield from shard_batches(order, self.batch_size, rank, world, self.drop_last)
            return
        for chunk in order.split(self.batch_size):
            if self.drop_last and len(chunk) < self.batch_size:
                break
            yield chunk

    def __len__(self) -> int:
        world = current_rank_world()[1] if self.shard else 1
        if world > 1:
            return n_shard_batches(self.n, self.batch_size, world, self.drop_last)
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)


class LengthGroupedBatches(IndexBatches):
    """:class:`IndexBatches` whose batches hold rows of similar length (events, notes), so a heavy-tailed
    cohort does not pad most batches to a few very long rows.

    Each epoch (seeded by ``(seed, epoch)`` only, so a resumed run draws the same batches): a random
    permutation is cut into groups of ``group_factor`` global steps (``batch_size x world`` rows each, as
    HF Transformers' ``group_by_length`` does per device), each group is sorted by length (ties in random
    order) and cut into steps, and the steps are shuffled; the ``n mod (batch_size x world)`` rows left
    over form the last step, as without grouping. Every row is yielded exactly once per epoch, and DDP
    ranks take their slices of each step as :func:`~mmclin.training.distributed.shard_batches` deals them.

    Args:
        lengths: ``[N]`` items per row (summed over the variable-length modalities).
    """

    def __init__(self, lengths: np.ndarray | Tensor, batch_size: int, seed: int = 0, drop_last: bool = False,
                 shard: bool = False, group_factor: int = 50) -> None:
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        super().__init__(len(lengths), batch_size, True, seed, drop_last, shard)
        self.lengths, self.group_factor = lengths, group_factor

    def _order(self, epoch: int, world: int) -> Tensor:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        perm = torch.randperm(self.n, generator=g)
        step = self.batch_size * world
        n_full = self.n // step * step
        head, rest = perm[:n_full], perm[n_full:]
        steps = []
        for group in head.split(step * self.group_factor):
            ranked = group[torch.argsort(self.lengths[group], stable=True)]
            steps += list(ranked.split(step))
        shuffled = [steps[i] for i in torch.randperm(len(steps), generator=g).tolist()]
        return torch.cat([*shuffled, rest]) if shuffled or len(rest) else perm


def row_lengths(table: TensorTable) -> np.ndarray | None:
    """Items per row summed over the variable-length modalities (0 where absent); None when there are none."""
    parts = [d.lengths.numpy() * table.present[m].numpy() for m, d in table.inputs.items() if isinstance(d, _RAGGED)]
    return np.sum(parts, axis=0) if parts else None


def _identity(batch: ModalityBatch) -> ModalityBatch:
    return batch


def batch_loader(table: TensorTable, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False,
                 shard: bool = False, group_by_length: bool = False) -> DataLoader:
    """A DataLoader whose items are whole ``ModalityBatch``es (one index per tensor per batch);
    ``shard``: split the rows across DDP ranks (training loader; see ``IndexBatches``);
    ``group_by_length``: batches of rows of similar length (``LengthGroupedBatches``; when shuffling and
    the table has variable-length modalities)."""
    ds = _BatchIndexDataset(table)
    lengths = row_lengths(table) if group_by_length and shuffle else None
    if lengths is not None:
        sampler: IndexBatches = LengthGroupedBatches(lengths, batch_size, seed, drop_last, shard)
    else:
        sampler = IndexBatches(len(ds), batch_size, shuffle, seed, drop_last, shard)
    return DataLoader(ds, sampler=sampler, batch_size=None, collate_fn=_identity)
