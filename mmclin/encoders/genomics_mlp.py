"""Genomics MLP tower: all expression values through a ReLU MLP into one token (the plain omics model)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from mmclin.batch import ModalityTokens
from mmclin.encoders.base import ModalityEncoder, fill_missing
from mmclin.encoders.tabular_mlp import check_tower, mlp_tower
from mmclin.registry import ENCODERS


@ENCODERS.register("genomics_mlp")
class GenomicsMLPEncoder(ModalityEncoder):
    """One token from a ReLU MLP over the standardised expression values (missing genes: learned fills).

    ``h = MLP(x)``, ``x_g`` the value of gene ``g`` or, where it is missing, a learned ``f_g``. Unlike the
    ``genomics`` SNN it has plain ReLU layers and dropout, and it ignores gene groups (one token).

    Args:
        n_genes: from the genomics featurizer. groups: accepted from the featurizer, not used.
        hidden: widths before the output (``[128]``). d_model: output width (64). dropout: (0.1).

    Shapes:
        inputs["values"], inputs["missing"]: ``[B, G]`` -> tokens ``[B, 1, d_model]``, mask all True.
    """

    kind = "genomics"

    def __init__(self, n_genes: int, groups: dict | None = None, hidden: Sequence[int] = (128,), d_model: int = 64,
                 dropout: float = 0.1) -> None:
        super().__init__()
        hidden = check_tower("genomics_mlp", hidden, d_model, dropout)
        self.output_dim, self.n_genes = d_model, n_genes
        self.fill = nn.Parameter(torch.zeros(n_genes))
        widths = [*hidden, d_model]
        self.first = nn.Linear(n_genes, widths[0])
        self.tower = mlp_tower(widths, dropout)

    def forward(self, inputs: dict[str, Tensor]) -> ModalityTokens:
        x = fill_missing(inputs["values"], inputs["missing"], self.fill)
        token = self.tower(self.first(x)).unsqueeze(1)
        return ModalityTokens(token, torch.ones(token.shape[:2], dtype=torch.bool, device=token.device))

    @classmethod
    def example(cls) -> "GenomicsMLPEncoder":
        return cls(n_genes=6, hidden=(8,), d_model=8)

    def example_input(self, batch_size: int, seed: int = 0) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(seed)
        missing = torch.rand(batch_size, self.n_genes, generator=g) < 0.2
        missing[:, 0] = True  # every learned fill value gets a gradient in the checks
        return {"values": torch.randn(batch_size, self.n_genes, generator=g).masked_fill(missing, 0.0), "missing": missing}
