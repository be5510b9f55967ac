"""Modality dropout: drop whole modalities per sample during training."""
from __future__ import annotations

import torch
from torch import Tensor


def modality_dropout(present: dict[str, Tensor], p: float, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Set ``present[m][i]`` to False with probability ``p`` for each sample and modality,
    never dropping all of a sample's present modalities (one of them, chosen at random, is kept).

    Shapes:
        present[m]: ``[B]`` bool -> same.

    >>> pres = {"a": torch.tensor([True, True]), "b": torch.tensor([True, False])}
    >>> out = modality_dropout(pres, 0.99)
    >>> bool((out["a"] | out["b"]).all())
    True
    """
    if p <= 0 or not present:
        return present
    names = sorted(present)
    mask = torch.stack([present[m] for m in names], 1)  # [B, M]
    device = mask.device
    drop = torch.rand(mask.shape, generator=generator, device="cpu").to(device) < p
    kept = mask & ~drop
    emptied = mask.any(1) & ~kept.any(1)
    if emptied.any():
        # keep one random present modality for samples that would lose all of them
        scores = torch.rand(mask.shape, generator=generator, device="cpu").to(device).masked_fill(~mask, -1.0)
        rescue = torch.zeros_like(mask).scatter_(1, scores.argmax(1, keepdim=True), True)
        kept = kept | (rescue & emptied.unsqueeze(1))
    return {m: kept[:, j] for j, m in enumerate(names)}
