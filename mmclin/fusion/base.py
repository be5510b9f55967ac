"""The FusionHead contract."""
from __future__ import annotations

from torch import Tensor, nn

from mmclin.batch import FusionOutput, ModalityTokens


class FusionHead(nn.Module):
    """``forward(tokens: {modality: ModalityTokens}, present: {modality: BoolTensor[B]}) -> FusionOutput``.

    Built from ``input_dims = {modality: D_m}`` and its own options. Heads iterate over
    ``self.modalities`` (sorted names), never dict order, and honour ``present`` per sample:
    a sample's output must not depend on an absent modality's tokens.
    """

    output_dim: int

    def __init__(self, input_dims: dict[str, int]) -> None:
        super().__init__()
        if not input_dims:
            raise ValueError("a fusion head needs at least one modality")
        self.input_dims = dict(sorted(input_dims.items()))
        self.modalities = list(self.input_dims)

    def forward(self, tokens: dict[str, ModalityTokens], present: dict[str, Tensor]) -> FusionOutput:
        raise NotImplementedError

    @classmethod
    def example_options(cls) -> dict:
        """Small options for the conformance checks."""
        return {"d_model": 8}


def mlp(in_dim: int, hidden: int, out_dim: int, n_layers: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(n_layers):
        layers += [nn.Linear(d, hidden), nn.GELU(), nn.Dropout(dropout)]
        d = hidden
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)
