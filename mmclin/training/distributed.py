"""Ranks under Lightning's DDP, and how the training batches are sharded across them.

mmclin's training loader yields whole batches (index tensors) from its own sampler
(:class:`mmclin.training.data.IndexBatches`). Lightning's automatic distributed sampler
would wrap that sampler in a ``DistributedSamplerWrapper`` and hand each rank every
``world``-th *batch*, padded by repeating batches: with fewer batches than ranks (e.g. one
whole-cohort Cox batch) every rank trains on the same rows. The core therefore switches
Lightning's replacement off (``use_distributed_sampler=False``) and the sampler shards
itself with :func:`shard_batches`: every rank draws the same permutation each epoch (same
seed, same number of draws), global step ``s`` takes rows ``order[s*B*W : (s+1)*B*W]`` and
rank ``r`` the ``r``-th slice of ``B`` of them. So ranks see disjoint rows, epochs are
reshuffled, every rank runs the same number of steps (no DDP hang), and for losses that are
means over rows the averaged DDP gradient equals a single process's gradient at batch size
``B*W``. A Cox partial likelihood is not such a mean: under DDP its risk sets are per rank.
"""
from __future__ import annotations

import os
from typing import Iterator

import torch
from torch import Tensor


def env_global_rank() -> int:
    """This process's global rank as the launcher tells it (torchrun ``RANK``, SLURM
    ``SLURM_PROCID``, Lightning's own launcher ``NODE_RANK``/``LOCAL_RANK``); 0 when not
    launched for DDP. Known before any process group exists, so the CLI can keep side
    effects (MLflow runs, model files, printing) on rank 0."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    node, local = os.environ.get("NODE_RANK", "0"), os.environ.get("LOCAL_RANK", "0")
    if node.isdigit() and local.isdigit() and (int(node) or int(local)):
        return int(node) * 1_000 + int(local)  # only zero / non-zero matters here
    return 0


def env_world_size() -> int:
    """World size set by torchrun or Lightning's launcher (``WORLD_SIZE``); 1 otherwise. SLURM's
    task count is not used: ``srun -n 4 mmclin tune ...`` starts four independent study workers."""
    value = os.environ.get("WORLD_SIZE", "")
    return int(value) if value.isdigit() else 1


def current_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard_batches(order: Tensor, batch_size: int, rank: int, world: int, drop_last: bool = False) -> Iterator[Tensor]:
    """This rank's batches from one epoch's permutation ``order`` (identical on every rank).

    Full global steps give each rank ``batch_size`` rows; a final partial step of ``m`` rows
    is split evenly when every rank gets at least 2 rows (``m >= 2 * world``) and
    ``drop_last`` is False, otherwise dropped (a 1-row batch has no Cox risk set), so all
    ranks run the same number of steps.

    Shapes:
        order: ``[N]`` long -> batches ``[<= batch_size]`` long, disjoint across ranks.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world} processes")
    step = batch_size * world
    n_full = len(order) // step
    for s in range(n_full):
        yield order[s * step + rank * batch_size: s * step + (rank + 1) * batch_size]
    rest = order[n_full * step:]
    if len(rest) and not drop_last and len(rest) >= 2 * world:
        yield torch.tensor_split(rest, world)[rank]


def n_shard_batches(n: int, batch_size: int, world: int, drop_last: bool = False) -> int:
    """Number of batches :func:`shard_batches` yields per rank for ``n`` rows."""
    step = batch_size * world
    rest = n % step
    return n // step + int(bool(rest) and not drop_last and rest >= 2 * world)
