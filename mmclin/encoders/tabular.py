"""Tabular encoder: one token per feature (FT-Transformer style), learned missing values.

Gorishniy et al., "Revisiting Deep Learning Models for Tabular Data" (NeurIPS 2021).
Numeric feature j becomes ``x_j * w_j + b_j``; a missing value becomes a learned token
``m_j`` (never a made-up number); a categorical value indexes a per-column embedding.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn

from mmclin.batch import ModalityTokens
from mmclin.encoders.base import Featurizer, ModalityEncoder, standardisation, standardise
from mmclin.registry import ENCODERS, FEATURIZERS

# categorical codes: 0 = missing, 1 = a category not seen in training, 2.. = training categories
MISSING_CODE, UNSEEN_CODE, FIRST_CODE = 0, 1, 2


def is_numeric(dtype: pl.DataType) -> bool:
    return dtype.is_numeric() or dtype == pl.Boolean


def numeric_matrix(frame: pl.DataFrame, columns: list[str], modality: str) -> tuple[np.ndarray, np.ndarray]:
    """Columns as float64 ``[N, F]`` and a missing mask; raise naming column and row for inf."""
    if not columns:
        return np.zeros((frame.height, 0)), np.zeros((frame.height, 0), dtype=bool)
    values = frame.select([pl.col(c).cast(pl.Float64) for c in columns]).to_numpy().astype(np.float64, copy=False)
    values = np.array(values, dtype=np.float64)
    missing = np.isnan(values)
    bad = np.argwhere(np.isinf(values))
    if len(bad):
        r, c = bad[0]
        raise ValueError(f"modality {modality!r}, column {columns[c]!r}, row {r}: value {values[r, c]} is not finite")
    return values, missing


class TabularFeaturizer(Featurizer):
    kind = "tabular"

    def fit(self, frame: pl.DataFrame) -> "TabularFeaturizer":
        spec = self.spec
        declared = set(spec.categorical or [])
        unknown = declared - set(spec.columns)
        if unknown:
            raise ValueError(f"modality {spec.name!r}: categorical columns {sorted(unknown)} are not among its columns")
        schema = frame.schema  # once: polars builds the whole schema on every access
        for c in spec.columns:
            dtype = schema[c]
            if not (is_numeric(dtype) or dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum)):
                raise ValueError(
                    f"modality {spec.name!r}, column {c!r}: tabular columns must be numeric, boolean or "
                    f"categorical (string), got {dtype}; convert it first (e.g. a date to days since a reference)"
                )
        self.categorical = [c for c in spec.columns if c in declared or not is_numeric(schema[c])]
        self.numeric = [c for c in spec.columns if c not in self.categorical]
        present = self.present_rows(frame)
        self.check_present_in_training(frame, present)
        values, missing = numeric_matrix(frame, self.numeric, spec.name)
        for j, c in enumerate(self.numeric):
            if missing[:, j].all():
                raise ValueError(f"modality {spec.name!r}, column {c!r}: no values in the training rows")
        self.mean, self.std = standardisation(spec.name, self.numeric, np.where(missing, np.nan, values))
        self.categories = {
            c: sorted(str(v) for v in frame[c].drop_nulls().unique().to_list()) for c in self.categorical
        }
        for c, cats in self.categories.items():
            if not cats:
                raise ValueError(f"modality {spec.name!r}, column {c!r}: no values in the training rows")
        return self

    def transform(self, frame: pl.DataFrame) -> tuple[dict[str, Tensor], Tensor]:
        schema = frame.schema  # once: polars builds the whole schema on every access
        for c in self.numeric:
            if not is_numeric(schema[c]) and schema[c] != pl.Null:
                col = frame[c]
                text = col.is_not_null() & col.cast(pl.Float64, strict=False).is_null() if col.dtype == pl.String else None
                row = int(text.arg_max()) if text is not None and text.any() else None
                where = f" (row {row} holds {col[row]!r})" if row is not None else ""
                raise ValueError(f"modality {self.spec.name!r}, column {c!r}: expected a numeric column as in training, "
                                 f"got {schema[c]}{where}")
        values, missing = numeric_matrix(frame, self.numeric, self.spec.name)
        # missing cells are 0 and masked: the encoder uses its learned missing token there
        values = standardise(self.spec.name, self.numeric, values, missing, self.mean, self.std)
        codes = np.zeros((frame.height, len(self.categorical)), dtype=np.int64)
        for j, c in enumerate(self.categorical):
            lookup = {v: i + FIRST_CODE for i, v in enumerate(self.categories[c])}
            col = frame[c].cast(pl.String)
            observed = col.is_not_null().to_numpy()
            mapped = col.replace_strict(lookup, default=UNSEEN_CODE, return_dtype=pl.Int64).to_numpy()
            mapped = np.where(observed, mapped, MISSING_CODE)
            n_unseen = int(((mapped == UNSEEN_CODE) & observed).sum())
            if n_unseen:
                warnings.warn(
                    f"modality {self.spec.name!r}, column {c!r}: {n_unseen} row(s) have categories not seen in "
                    "training; they use the 'unseen category' embedding",
                    stacklevel=2,
                )
            codes[:, j] = mapped
        inputs = {
            "numeric": torch.from_numpy(values.astype(np.float32)),
            "numeric_missing": torch.from_numpy(missing),
            "categorical": torch.from_numpy(codes),
        }
        return inputs, self.present_rows(frame)

    def encoder_kwargs(self) -> dict[str, Any]:
        return {
            "n_numeric": len(self.numeric),
            "cardinalities": [len(self.categories[c]) + FIRST_CODE for c in self.categorical],
        }

    def feature_names(self) -> dict[str, list[str]]:
        return {"numeric": list(self.numeric), "categorical": list(self.categorical)}

    def state_dict(self) -> dict[str, Any]:
        return {"numeric": self.numeric, "categorical": self.categorical, "mean": self.mean,
                "std": self.std, "categories": self.categories}

    def load_state_dict(self, state: dict[str, Any]) -> "TabularFeaturizer":
        for k in ("numeric", "categorical", "mean", "std", "categories"):
            setattr(self, k, state[k])
        return self


FEATURIZERS.register("tabular")(TabularFeaturizer)


@ENCODERS.register("tabular")
class TabularEncoder(ModalityEncoder):
    """Per-feature tokens, optionally mixed by transformer layers.

    Args:
        n_numeric: number of numeric columns (from the data).
        cardinalities: embedding rows per categorical column, codes included (from the data).
        d_model: token width D. n_layers: transformer layers over the tokens (0 = none).

    Shapes:
        inputs["numeric"]: ``[B, Fn]`` float; inputs["numeric_missing"]: ``[B, Fn]`` bool;
        inputs["categorical"]: ``[B, Fc]`` long.
        output: tokens ``[B, Fn + Fc, D]``, mask all True (a missing value is a learned token).
    """

    kind = "tabular"

    def __init__(self, n_numeric: int, cardinalities: list[int], d_model: int = 32, n_layers: int = 1,
                 n_heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        if n_numeric + len(cardinalities) == 0:
            raise ValueError("tabular encoder needs at least one numeric or categorical column")
        if n_layers > 0 and d_model % n_heads:
            raise ValueError(f"tabular encoder: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.output_dim = d_model
        self.n_numeric = n_numeric
        self.weight = nn.Parameter(torch.randn(n_numeric, d_model) * d_model**-0.5)
        # A non-zero bias, as FT-Transformer initialises it: with a zero bias a value at its column's
        # mean (0 standardised) gives a zero token, where a later LayerNorm is near-singular and
        # gradients (Integrated Gradients starts at that mean) explode.
        self.bias = nn.Parameter(torch.randn(n_numeric, d_model) * d_model**-0.5)
        self.missing_token = nn.Parameter(torch.randn(n_numeric, d_model) * 0.02)
        offsets = torch.tensor([0, *np.cumsum(cardinalities)[:-1].tolist()], dtype=torch.long)
        self.register_buffer("offsets", offsets[: len(cardinalities)], persistent=False)
        self.embedding = nn.Embedding(int(sum(cardinalities)), d_model) if cardinalities else None
        self.mixer = (
            nn.TransformerEncoder(
                nn.TransformerEncoderLayer(d_model, n_heads, 2 * d_model, dropout, batch_first=True, norm_first=True),
                n_layers, enable_nested_tensor=False,
            )
            if n_layers > 0 else None
        )

    def forward(self, inputs: dict[str, Tensor]) -> ModalityTokens:
        num, miss = inputs["numeric"], inputs["numeric_missing"]
        parts = []
        if self.n_numeric:
            tok = num.unsqueeze(-1) * self.weight + self.bias
            parts.append(torch.where(miss.unsqueeze(-1), self.missing_token.expand_as(tok), tok))
        if self.embedding is not None:
            parts.append(self.embedding(inputs["categorical"] + self.offsets))
        tokens = torch.cat(parts, dim=1)
        if self.mixer is not None:
            tokens = self.mixer(tokens)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return ModalityTokens(tokens, mask)

    @classmethod
    def example(cls) -> "TabularEncoder":
        return cls(n_numeric=3, cardinalities=[4, 3], d_model=8, n_layers=1, n_heads=2)

    def example_input(self, batch_size: int, seed: int = 0) -> dict[str, Tensor]:
        n_codes = 0 if self.embedding is None else self.embedding.num_embeddings
        # the first value missing, so the missing token is exercised in every example
        return example_tabular_input(batch_size, self.n_numeric, self.offsets, n_codes, seed, first_missing=True)


def example_tabular_input(batch_size: int, n_numeric: int, offsets: Tensor, n_codes: int, seed: int = 0,
                          first_missing: bool = False) -> dict[str, Tensor]:
    """A tabular featurizer's output for the conformance checks: standard-normal values, 30 % missing, every
    category code of each column (``offsets`` into ``n_codes`` codes in all) cycled through the batch."""
    g = torch.Generator().manual_seed(seed)
    num = torch.randn(batch_size, n_numeric, generator=g)
    miss = torch.rand(batch_size, n_numeric, generator=g) < 0.3
    if first_missing:
        miss[0, 0] = True
    num = num.masked_fill(miss, 0.0)
    n_cat = offsets.numel() if n_codes else 0
    cards = torch.diff(torch.cat([offsets, torch.tensor([n_codes])])) if n_cat else None
    cat = torch.zeros(batch_size, n_cat, dtype=torch.long)
    for j in range(n_cat):
        cat[:, j] = torch.arange(batch_size) % int(cards[j])
    return {"numeric": num, "numeric_missing": miss, "categorical": cat}
