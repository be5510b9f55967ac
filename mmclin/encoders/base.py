"""Contracts for modality encoders and the featurizers that feed them.

A *featurizer* turns a modality's frame columns into tensors (fitted on training rows
only, state saved as JSON); an *encoder* turns those tensors into tokens.
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn

from mmclin.batch import ModalityTokens
from mmclin.cohort import ModalitySpec


# standardised values are float32 in the network: beyond this |z| a value is refused, not silently made inf
MAX_ABS_STANDARDISED = 1e6


def standardisation(modality: str, columns: list[str], observed: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-column mean and sd of the training values (``observed``: ``[N, F]``, NaN where missing).

    A column whose sd is 0 keeps sd 1 (it carries no information either way); a column whose mean or sd
    overflows (values near 1e300) is refused, naming it and its largest value's row, instead of being
    silently ignored (an inf sd turns every value into 0).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        mean = np.nanmean(observed, axis=0) if observed.shape[1] else np.zeros(0)
        std = np.nanstd(observed, axis=0) if observed.shape[1] else np.zeros(0)
    bad = np.flatnonzero(~(np.isfinite(mean) & np.isfinite(std)))
    if len(bad):
        j = int(bad[0])
        row = int(np.nanargmax(np.abs(observed[:, j])))
        raise ValueError(f"modality {modality!r}, column {columns[j]!r}: values too large to standardise (row {row} "
                         f"has {observed[row, j]:.3g}); expected values whose squares are finite (|value| < 1e150), "
                         "e.g. check the column's units")
    return mean.tolist(), np.where(std > 0, std, 1.0).tolist()


def standardise(modality: str, columns: list[str], values: np.ndarray, missing: np.ndarray, mean: list[float],
                std: list[float]) -> np.ndarray:
    """``(values - mean) / std`` with missing cells 0; a value this far from the training range is refused
    (naming modality, column and row): the network could only return non-finite or meaningless outputs."""
    with np.errstate(over="ignore", invalid="ignore"):
        z = values - np.asarray(mean)  # in place from here: a wide omics matrix is copied once, not four times
        z *= 1.0 / np.asarray(std)
    z[missing] = 0.0
    if z.size and not np.abs(z).max() <= MAX_ABS_STANDARDISED:  # NaN compares False: caught too
        row, j = (int(v) for v in np.argwhere(~(np.abs(z) <= MAX_ABS_STANDARDISED))[0])
        raise ValueError(f"modality {modality!r}, column {columns[j]!r}, row {row}: value {values[row, j]:.3g} is "
                         f"{abs(z[row, j]):.3g} training standard deviations from the training mean (more than "
                         f"{MAX_ABS_STANDARDISED:g}); expected values on the training scale (check units or a data error)")
    return z


def fill_missing(values: Tensor, missing: Tensor, fill: Tensor) -> Tensor:
    """``values`` with each missing cell replaced by its column's learned ``fill``. A batch without a missing
    cell (most omics batches) skips the select and its backward: a quarter of an MLP tower's step over 500
    genes; the result and the gradients are the same either way.

    Shapes: values, missing ``[B, G]``; fill ``[G]`` -> ``[B, G]``."""
    # under DDP every parameter must take part in each step's graph (its gradient reduction waits for all of them)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed and not bool(missing.any()):
        return values
    return torch.where(missing, fill.expand_as(values), values)


class Featurizer:
    """Frame columns of one modality -> ``(inputs: dict[str, Tensor], present: BoolTensor[N])``."""

    kind: ClassVar[str] = ""

    def __init__(self, spec: ModalitySpec) -> None:
        self.spec = spec

    def fit(self, frame: pl.DataFrame) -> "Featurizer":
        raise NotImplementedError

    def transform(self, frame: pl.DataFrame) -> tuple[dict[str, Tensor], Tensor]:
        """``(inputs, present)``; variable-length modalities (events, notes) may return a
        :class:`~mmclin.batch.Ragged` as ``inputs``: it is padded per batch."""
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
