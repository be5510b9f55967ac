"""Late fusion: one head per modality, combined over the modalities each sample has."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mmclin.batch import FusionOutput, ModalityTokens
from mmclin.fusion.base import FusionHead, mlp
from mmclin.registry import FUSIONS


@FUSIONS.register("late")
class LateFusion(FusionHead):
    """Each modality gets its own MLP; outputs are averaged over the present modalities with
    learned modality weights (softmax over the present ones). The task's (linear) head on
    the average equals the weighted average of per-modality predictions.

    ``pooled = sum_m w_m p_m h_m(mean(t_m)) / sum_m w_m p_m``, ``w = softmax(a)``; zeros when none present.

    Shapes:
        tokens[m].tokens: ``[B, T_m, D_m]``; present[m]: ``[B]`` -> pooled ``[B, d_model]``;
        per_step[m]: ``[B, d_model]`` each modality's own representation.
    """

    def __init__(self, input_dims: dict[str, int], d_model: int = 64, n_layers: int = 1, dropout: float = 0.1) -> None:
        super().__init__(input_dims)
        self.output_dim = d_model
        self.heads = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(d), mlp(d, d_model, d_model, n_layers, dropout))
                                    for m, d in self.input_dims.items()})
        self.logit_weights = nn.Parameter(torch.zeros(len(self.modalities)))

    def forward(self, tokens: dict[str, ModalityTokens], present: dict[str, Tensor]) -> FusionOutput:
        per_modality = {m: self.heads[m](tokens[m].pooled()) for m in self.modalities}
        stacked = torch.stack([per_modality[m] for m in self.modalities], 1)  # [B, M, D]
        mask = torch.stack([present[m] for m in self.modalities], 1)  # [B, M]
        # softmax restricted to the present modalities; all-absent rows get zero weights (no NaN)
        weights = torch.softmax(self.logit_weights, 0).to(stacked.dtype) * mask
        weights = weights / weights.sum(1, keepdim=True).clamp_min(1e-12)
        stacked = torch.where(mask.unsqueeze(-1), stacked, 0.0)
        pooled = (weights.unsqueeze(-1) * stacked).sum(1)
        return FusionOutput(pooled=pooled, per_step=per_modality)
