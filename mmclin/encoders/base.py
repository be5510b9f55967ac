"""Contracts for modality encoders and the featurizers that feed them.

A *featurizer* turns a modality's frame columns into tensors (fitted on training rows
only, state saved as JSON); an *encoder* turns those tensors into tokens.
"""
from __future__ import annotations

from typing import Any, ClassVar

import polars as pl
import torch
from torch import Tensor, nn

from mmclin.batch import ModalityTokens
from mmclin.cohort import ModalitySpec


class Featurizer:
    """Frame columns of one modality -> ``(inputs: dict[str, Tensor], present: BoolTensor[N])``."""

    kind: ClassVar[str] = ""

    def __init__(self, spec: ModalitySpec) -> None:
        self.spec = spec

    def fit(self, frame: pl.DataFrame) -> "Featurizer":
        raise NotImplementedError

    def transform(self, frame: pl.DataFrame) -> tuple[dict[str, Tensor], Tensor]:
        """``(inputs, present)``; variable-length modalities (events, notes) may return a
        :class:`~mmclin.training.ragged.Ragged` as ``inputs``: it is padded per batch."""
        raise NotImplementedError

    def encoder_kwargs(self) -> dict[str, Any]:
        """Constructor arguments the encoder needs that come from the data (widths, categories)."""
        raise NotImplementedError

    def feature_names(self) -> dict[str, list[str]]:
        """Names along the feature axis of each input tensor (for explanations)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> "Featurizer":
        raise NotImplementedError

    def present_rows(self, frame: pl.DataFrame) -> Tensor:
        """A modality is absent for a row when all of its columns are null (NaN counts as null)."""
        schema = frame.schema

        def observed(c: str) -> pl.Expr:
            expr = pl.col(c).is_not_null()
            return expr & pl.col(c).is_not_nan() if schema[c].is_float() else expr

        any_value = pl.any_horizontal([observed(c) for c in self.spec.columns])
        return torch.from_numpy(frame.select(any_value.alias("p"))["p"].to_numpy().copy())

    def check_present_in_training(self, frame: pl.DataFrame, present: Tensor) -> None:
        if frame.height and not bool(present.any()):
            raise ValueError(
                f"modality {self.spec.name!r}: all of its columns {self.spec.columns[:5]}"
                f"{'...' if len(self.spec.columns) > 5 else ''} are null in every training row; "
                "a modality needs data in training (drop it from 'modalities' or fix the join)"
            )


class ModalityEncoder(nn.Module):
    """``forward(inputs) -> ModalityTokens(tokens [B, T, D], mask [B, T])``.

    Subclasses set ``kind`` and ``output_dim`` (= D), and provide ``example()`` (a small
    instance) and ``example_input(batch_size)`` for the shared conformance checks.
    """

    kind: ClassVar[str] = ""
    output_dim: int

    def forward(self, inputs: dict[str, Tensor]) -> ModalityTokens:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def example(cls) -> "ModalityEncoder":
        raise NotImplementedError

    def example_input(self, batch_size: int, seed: int = 0) -> dict[str, Tensor]:
        raise NotImplementedError
