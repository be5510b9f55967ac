"""Symile as an auxiliary objective next to a supervised task.

Saporta et al., "Contrasting with Symile: Simple Model-Agnostic Representation Learning for
Unlimited Modalities" (NeurIPS 2024); the loss lives in ``mmclin.fusion.contrastive``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mmclin.batch import FusionOutput, ModalityTokens
from mmclin.fusion.contrastive import NEGATIVE_SAMPLING, OBJECTIVES, ContrastiveProjector, contrastive_loss
from mmclin.fusion.base import FusionHead, mlp
from mmclin.registry import FUSIONS


@FUSIONS.register("symile")
class SymileFusion(FusionHead):
    """Each modality's pooled tokens are projected into a shared, L2-normalised space (an
    absent modality gets its learned *missing* representation, Symile's availability
    indicator); the task sees an MLP of the concatenated representations and presence flags,
    and in training the batch's Symile loss over all modalities (pairwise CLIP with
    ``objective="clip"``) is returned as ``aux_loss`` with weight ``aux_weight``.

    ``pooled = MLP([r_1, ..., r_M, p_1, ..., p_M])``; ``aux = w * Symile(r_1, ..., r_M)``.

    Args:
        input_dims: ``{modality: D_m}``. d_model: output width (64). dim: shared space (32).
        n_layers, dropout: the MLP (1, 0.1). aux_weight: weight of the contrastive term (0.1).
        objective: ``"symile"`` or ``"clip"``. negative_sampling: ``"n"`` or ``"n_squared"``.

    Shapes:
        tokens[m].tokens: ``[B, T_m, D_m]``; present[m]: ``[B]`` -> pooled ``[B, d_model]``;
        per_step[m]: ``[B, dim]`` the shared-space representations.
    """

    def __init__(self, input_dims: dict[str, int], d_model: int = 64, dim: int = 32, n_layers: int = 1,
                 dropout: float = 0.1, aux_weight: float = 0.1, objective: str = "symile",
                 negative_sampling: str = "n") -> None:
        super().__init__(input_dims)
        if objective not in OBJECTIVES:
            raise ValueError(f"The 'objective' parameter of the symile fusion head must be one of {OBJECTIVES}. Got {objective!r} instead.")
        if negative_sampling not in NEGATIVE_SAMPLING:
            raise ValueError(f"The 'negative_sampling' parameter of the symile fusion head must be one of {NEGATIVE_SAMPLING}. "
                             f"Got {negative_sampling!r} instead.")
        self.output_dim = d_model
        self.aux_weight, self.objective, self.negative_sampling = aux_weight, objective, negative_sampling
        self.projector = ContrastiveProjector(self.input_dims, dim)
        n = len(self.modalities)
        self.mlp = mlp(n * dim + n, d_model, d_model, n_layers, dropout)
        self.negatives = torch.Generator().manual_seed(0)

    def forward(self, tokens: dict[str, ModalityTokens], present: dict[str, Tensor]) -> FusionOutput:
        reps = self.projector({m: tokens[m].pooled() for m in self.modalities}, present)
        flags = [present[m].unsqueeze(-1).to(reps[self.modalities[0]].dtype) for m in self.modalities]
        pooled = self.mlp(torch.cat([reps[m] for m in self.modalities] + flags, -1))
        aux = None
        batch = pooled.shape[0]
        if self.training and self.aux_weight > 0 and batch >= 2 and len(self.modalities) >= 2:
            aux = self.aux_weight * contrastive_loss(self.objective, [reps[m] for m in self.modalities],
                                                     self.projector.logit_scale, self.negative_sampling, self.negatives)
        return FusionOutput(pooled=pooled, aux_loss=aux, per_step=reps)

    @classmethod
    def example_options(cls) -> dict:
        return {"d_model": 8, "dim": 4}
