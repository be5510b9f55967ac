"""Contrastive objectives across any number of modalities: Symile and pairwise CLIP.

Symile: Saporta et al., "Contrasting with Symile: Simple Model-Agnostic Representation
Learning for Unlimited Modalities" (NeurIPS 2024). The score of a tuple of modality
representations is their *multilinear inner product* ``MIP(r_1, ..., r_M) = sum_d prod_m
r_m[d]``, which can see dependence that only shows in all modalities together (e.g. the
third modality is the XOR of the other two); pairwise CLIP (InfoNCE on every pair,
Radford et al. 2021) sums dot products of pairs and cannot.

Missing modalities follow the paper: the representation of a modality is computed from
its data *and an availability indicator*, so an absent modality has its own learned
representation (``SymileModel.missing``) and the sample stays in the loss.
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NegativeSampling = Literal["n", "n_squared"]
NEGATIVE_SAMPLING: tuple[str, ...] = ("n", "n_squared")
OBJECTIVES: tuple[str, ...] = ("symile", "clip")


def _check_reps(reps: Sequence[Tensor], need: int = 2) -> None:
    if len(reps) < need:
        raise ValueError(f"a contrastive loss needs at least {need} modalities, got {len(reps)}")
    first = reps[0].shape
    for i, r in enumerate(reps):
        if r.dim() != 2 or r.shape != first:
            raise ValueError(f"representation {i} has shape {tuple(r.shape)} but representation 0 has {tuple(first)}; "
                             "expected all [N, d] with the same N and d")


def mip(*reps: Tensor) -> Tensor:
    """Multilinear inner product of row-aligned representations.

    ``MIP(r_1, ..., r_M)[i] = sum_d prod_m r_m[i, d]``; for two inputs the dot product.

    Shapes:
        each ``r_m``: ``[N, d]`` (or broadcastable) -> ``[N]``.

    >>> mip(torch.tensor([[1., 2.]]), torch.tensor([[3., 4.]]), torch.tensor([[1., -1.]]))
    tensor([-5.])
    """
    out = reps[0]
    for r in reps[1:]:
        out = out * r
    return out.sum(-1)


def symile_logits(anchor: Tensor, others: Sequence[Tensor], negative_sampling: NegativeSampling = "n",
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Logits of the anchor modality against candidate tuples of the other modalities.

    ``"n"`` (O(N) negatives per positive): candidate ``j`` is the product of the other
    modalities each shuffled independently, the positive tuple ``(others_m[i])_m`` placed
    at ``j = i``. ``"n_squared"`` (O(N^2)): candidate ``(j, k)`` is
    ``others_1[j] * prod_{m >= 2} others_m[k]``, all ``N^2`` of them (for three modalities,
    every pair ``(y_j, z_k)``); the positive is ``(i, i)``.

    With one other modality (M = 2) both are CLIP's candidate set: the other modality's samples.

    Shapes:
        anchor, others[m]: ``[N, d]`` -> logits ``[N, N]`` or ``[N, N^2]`` (``[N, N]`` for M = 2), labels ``[N]`` long.
    """
    n = anchor.shape[0]
    arange = torch.arange(n, device=anchor.device)
    if negative_sampling not in NEGATIVE_SAMPLING:
        raise ValueError(f"negative_sampling must be one of {NEGATIVE_SAMPLING}, got {negative_sampling!r}")
    if len(others) == 1:
        # two modalities: the candidates are the other modality's N samples, each once (CLIP's InfoNCE). Shuffling
        # would put the positive among the negatives again (the loss could not go below ln 2), and "n_squared"
        # would repeat every candidate N times (floor ln N)
        return anchor @ others[0].T, arange
    if negative_sampling == "n":
        shuffled = torch.ones_like(anchor)
        for r in others:
            perm = torch.randperm(n, generator=generator).to(anchor.device)
            shuffled = shuffled * r[perm]
        logits = anchor @ shuffled.T
        positive = mip(anchor, *others)
        logits = torch.where(torch.eye(n, dtype=torch.bool, device=anchor.device), positive.unsqueeze(1), logits)
        return logits, arange
    if negative_sampling == "n_squared":
        rest = torch.ones_like(anchor)
        for r in others[1:]:
            rest = rest * r
        pairs = (others[0].unsqueeze(1) * rest.unsqueeze(0)).reshape(n * n, -1)  # [(j, k), d]
        return anchor @ pairs.T, arange * n + arange
    raise ValueError(f"negative_sampling must be one of {NEGATIVE_SAMPLING}, got {negative_sampling!r}")


def symile_loss(reps: Sequence[Tensor], logit_scale: Tensor | float = 1.0, negative_sampling: NegativeSampling = "n",
                generator: torch.Generator | None = None) -> Tensor:
    """Symile: mean over anchor modalities of the cross-entropy of the positive tuple's MIP
    among candidate tuples (``symile_logits``), scaled by ``logit_scale``.

    Shapes:
        reps[m]: ``[N, d]`` for ``M >= 2`` modalities (``M = 2`` is CLIP) -> scalar.
    """
    _check_reps(reps)
    losses = []
    for a in range(len(reps)):
        others = [r for j, r in enumerate(reps) if j != a]
        logits, labels = symile_logits(reps[a], others, negative_sampling, generator)
        losses.append(F.cross_entropy(logit_scale * logits, labels))
    return torch.stack(losses).mean()


def clip_loss(reps: Sequence[Tensor], logit_scale: Tensor | float = 1.0) -> Tensor:
    """Pairwise CLIP: symmetric InfoNCE on every pair of modalities, averaged over pairs.

    Shapes:
        reps[m]: ``[N, d]`` -> scalar.
    """
    _check_reps(reps)
    labels = torch.arange(reps[0].shape[0], device=reps[0].device)
    losses = []
    for a in range(len(reps)):
        for b in range(a + 1, len(reps)):
            logits = logit_scale * reps[a] @ reps[b].T
            losses.append((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)
    return torch.stack(losses).mean()


def contrastive_loss(objective: str, reps: Sequence[Tensor], logit_scale: Tensor | float = 1.0,
                     negative_sampling: NegativeSampling = "n", generator: torch.Generator | None = None) -> Tensor:
    if objective == "symile":
        return symile_loss(reps, logit_scale, negative_sampling, generator)
    if objective == "clip":
        return clip_loss(reps, logit_scale)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def retrieval_scores(queries: Sequence[Tensor], candidates: Tensor, objective: str = "symile") -> Tensor:
    """Zero-shot scores of candidate representations of the missing modality.

    Symile: ``MIP(q_1[i], ..., q_K[i], c_j)``; CLIP: ``sum_k q_k[i] . c_j`` (the pairwise
    similarities it was trained on).

    Shapes:
        queries[k]: ``[N, d]``; candidates: ``[C, d]`` -> scores ``[N, C]``.
    """
    if objective == "symile":
        prod = queries[0]
        for q in queries[1:]:
            prod = prod * q
        return prod @ candidates.T
    if objective == "clip":
        return sum(q @ candidates.T for q in queries)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def retrieval_metrics(scores: Tensor, target: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Accuracy (= recall@1) and recall@k (``recall_at_k``) of the true candidate, and its mean reciprocal rank.

    Ties count against the true candidate (its rank is 1 + the number of candidates scored
    at least as high), so constant scores give chance, not perfect, results.

    Shapes:
        scores: ``[N, C]``; target: ``[N]`` long, index of the true candidate -> dict of floats.
    """
    if scores.dim() != 2 or target.shape != scores.shape[:1]:
        raise ValueError(f"scores must be [N, C] and target [N]; got {tuple(scores.shape)} and {tuple(target.shape)}")
    true = scores.gather(1, target.view(-1, 1))
    others = torch.ones_like(scores, dtype=torch.bool).scatter_(1, target.view(-1, 1), False)
    rank = 1 + ((scores >= true) & others).sum(1)
    out = {"accuracy": float((rank == 1).float().mean())}
    for k in ks:
        out[f"recall_at_{k}"] = float((rank <= k).float().mean())  # MLflow metric names allow no "@"
    out["mrr"] = float((1.0 / rank.float()).mean())
    return out


class ContrastiveProjector(nn.Module):
    """Maps each modality's pooled tokens to a shared, L2-normalised space; an absent
    modality gets its learned ``missing`` representation (the availability indicator).

    Args:
        input_dims: ``{modality: D_m}``. dim: shared representation width (32).
        logit_scale_init: initial ``exp(s)`` of the learned temperature (10).

    Shapes:
        pooled[m]: ``[B, D_m]``; present[m]: ``[B]`` -> reps[m]: ``[B, dim]``.
    """

    def __init__(self, input_dims: dict[str, int], dim: int = 32, logit_scale_init: float = 10.0) -> None:
        super().__init__()
        self.modalities = sorted(input_dims)
        self.dim = dim
        self.project = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, dim)) for m, d in sorted(input_dims.items())})
        self.missing = nn.ParameterDict({m: nn.Parameter(torch.randn(dim) * 0.1) for m in self.modalities})
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale_init)))

    @property
    def logit_scale(self) -> Tensor:
        return self.log_logit_scale.clamp(max=math.log(1000.0)).exp()

    def forward(self, pooled: dict[str, Tensor], present: dict[str, Tensor]) -> dict[str, Tensor]:
        reps = {}
        for m in self.modalities:
            z = F.normalize(self.project[m](pooled[m]), dim=-1)
            miss = F.normalize(self.missing[m], dim=-1).to(z.dtype).expand_as(z)
            reps[m] = torch.where(present[m].unsqueeze(-1), z, miss)
        return reps

