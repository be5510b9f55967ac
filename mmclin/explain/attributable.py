"""Which encoder inputs gradient attributions are taken on, and how they are summed up.

An encoder says what can be attributed by a list of :class:`AttributableInput`: either as a
method ``attributable_inputs(self)`` on the encoder class, or through an adapter registered
here (``ATTRIBUTION_ADAPTERS.register("<encoder name>")``) for encoders that do not carry one.
The built-in encoders use adapters (below):

| level | encoders | attributed input | one row per |
|---|---|---|---|
| ``feature`` | ``tabular``, ``tabular_mlp`` | numeric values; category embeddings (layer) | subject x column |
| ``feature`` | ``genomics``, ``genomics_mlp`` | expression values (+ gene-set sums) | subject x gene |
| ``time`` | ``irregular_series``, ``mtand``, ``utde`` | observed values (+ per-variable sums) | subject x observation |
| ``note`` | ``notes`` | term weights, summed per note | subject x note |
| ``patch`` | ``slide``, ``abmil``, ``transmil`` | patch features, summed per patch (+ attention) | subject x patch |

``notes_hf`` and ``image`` declare nothing yet (their modality still gets Shapley values).

An input is attributed either directly (a float input tensor) or at the output of one of
the encoder's submodules (``layer``; e.g. the category embedding, since category codes have
no gradient). The explained tensor has shape ``[B, *axes, *summed]``: ``axes`` are kept and
become rows of the tidy frame, the trailing dims are summed (embedding width, patch feature
width, a note's terms). ``columns`` add per-position facts (time, variable, patch x/y,
attention); ``aggregate_by`` adds a frame of per-subject sums by one of them (per variable).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from mmclin.registry import Registry

LEVELS = ("feature", "time", "note", "patch")


@dataclass(frozen=True)
class AttributableInput:
    """One attributable input of an encoder.

    Args:
        key: the input tensor, ``inputs[modality][key]``: attributed itself, or fed to ``layer``.
        baseline: ``(encoder, x, inputs) -> reference`` with the shape of ``x`` (the raw input, or
            the layer's output); the explanation's starting point.
        baseline_text: the baseline in words, shown in reports.
        level: ``feature`` | ``time`` | ``note`` | ``patch``: which frame the rows go to.
        axes: names of the kept non-batch axes, e.g. ``("feature",)``, ``("step",)``.
        names: ``featurizer.feature_names()`` entry naming the first axis (None: integer positions).
        layer: attribute at this submodule's output (dotted path inside the encoder) instead of
            at the raw input; its output has shape ``[B, *axes, *summed]``.
        missing_key: a bool input, True where a value is missing (flagged in the frame).
        valid_key: a bool input, True where a position is real (padded steps / patches are dropped).
        display: ``(featurizer, inputs) -> array [B, *axes]``: each value as a user knows it: floats in
            the column's units (NaN = missing) go to the frame's ``value`` column, strings (None =
            missing) to its ``category`` column.
        columns: ``{name: (featurizer, encoders, inputs) -> array [B, *axes]}``: more per-position
            columns (``encoders``: this modality's encoder in every ensemble member).
        groups: ``featurizer -> {group: [index along the first axis]}`` for group sums (gene sets).
        aggregate_by: a ``columns`` name: also sum each subject's attributions per value of it.

    Shapes:
        attributed tensor: ``[B, *axes, *summed]`` -> attributions ``[B, *axes]``.
    """

    key: str
    baseline: Callable[[nn.Module, Tensor, dict[str, Tensor]], Tensor]
    baseline_text: str
    level: str = "feature"
    axes: tuple[str, ...] = ("feature",)
    names: str | None = None
    layer: str | None = None
    missing_key: str | None = None
    valid_key: str | None = None
    display: Callable[[Any, dict[str, Tensor]], np.ndarray] | None = None
    columns: dict[str, Callable[[Any, list[nn.Module], dict[str, Tensor]], np.ndarray]] = field(default_factory=dict)
    groups: Callable[[Any], dict[str, list[int]] | None] | None = None
    aggregate_by: str | None = None

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"AttributableInput {self.key!r}: level must be one of {LEVELS}, got {self.level!r}")
        if self.aggregate_by is not None and self.aggregate_by not in self.columns:
            raise ValueError(f"AttributableInput {self.key!r}: aggregate_by={self.aggregate_by!r} is not one of its "
                             f"columns {sorted(self.columns)}")


ATTRIBUTION_ADAPTERS: Registry = Registry("attribution adapter")  # encoder name -> (encoder) -> list[AttributableInput]


def attributable_inputs(encoder: nn.Module) -> list[AttributableInput]:
    """The encoder's own declaration, else its registered adapter's, else none."""
    own = getattr(encoder, "attributable_inputs", None)
    if callable(own):
        return list(own())
    name = getattr(type(encoder), "registry_name", None)
    if name is not None and name in ATTRIBUTION_ADAPTERS:
        return list(ATTRIBUTION_ADAPTERS.get(name)(encoder))
    return []


# --- baselines ----------------------------------------------------------------------------
def _zeros(encoder: nn.Module, x: Tensor, inputs: dict[str, Tensor]) -> Tensor:
    return torch.zeros_like(x)


def _mean_category_embedding(layer: str) -> Callable[[nn.Module, Tensor, dict[str, Tensor]], Tensor]:
    """Per column, the mean row of its training categories (codes >= FIRST_CODE) in the encoder's
    embedding ``layer`` (indexed by code + the column's offset).

    Shapes:
        emb ``[B, Fc, D]`` -> ``[B, Fc, D]`` (the same reference row for every subject).
    """
    from mmclin.encoders.tabular import FIRST_CODE

    def baseline(encoder: nn.Module, emb: Tensor, inputs: dict[str, Tensor]) -> Tensor:
        weight = encoder.get_submodule(layer).weight.detach()
        ends = torch.cat([encoder.offsets[1:], torch.tensor([weight.shape[0]], device=weight.device)])
        ref = torch.stack([weight[int(s) + FIRST_CODE:int(e)].mean(0) for s, e in zip(encoder.offsets, ends)])
        return ref.to(emb).unsqueeze(0).expand_as(emb)
    return baseline


def _mean_patch(encoder: nn.Module, x: Tensor, inputs: dict[str, Tensor]) -> Tensor:
    """Each slide's mean patch feature over its real patches, at every patch.

    Shapes:
        x ``[B, L, D]``, inputs["mask"] ``[B, L]`` -> ``[B, L, D]``.
    """
    m = inputs["mask"].unsqueeze(-1).to(x.dtype)
    mean = (x * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1.0)
    return mean.expand_as(x)


# --- tabular and genomics -----------------------------------------------------------------
def _unstandardise(featurizer: Any, x: Tensor, missing: Tensor) -> np.ndarray:
    """Values in the column's own units, NaN where missing. Shapes: ``[B, F]`` -> ``[B, F]``."""
    out = x.detach().cpu().double().numpy() * np.asarray(featurizer.std) + np.asarray(featurizer.mean)
    out[missing.cpu().numpy()] = np.nan
    return out


def _tabular_categorical_display(featurizer: Any, inputs: dict[str, Tensor]) -> np.ndarray:
    from mmclin.encoders.tabular import FIRST_CODE, MISSING_CODE, UNSEEN_CODE

    codes = inputs["categorical"].cpu().numpy()
    out = np.empty(codes.shape, dtype=object)
    for j, col in enumerate(featurizer.categorical):
        cats = featurizer.categories[col]
        out[:, j] = [None if c == MISSING_CODE else "(unseen)" if c == UNSEEN_CODE else cats[c - FIRST_CODE] for c in codes[:, j]]
    return out


def _tabular_inputs(encoder: nn.Module, layer: str) -> list[AttributableInput]:
    """Numeric values at the raw input; categories at the output of the embedding ``layer``, which
    must give one row per column (``[B, Fc, D]``)."""
    out = []
    if encoder.n_numeric:
        out.append(AttributableInput(
            key="numeric", names="numeric", missing_key="numeric_missing", baseline=_zeros,
            baseline_text="training mean of each numeric column (0 in standardised units); a missing value keeps "
                          "its learned missing token on the whole path, so it gets 0",
            display=lambda f, x: _unstandardise(f, x["numeric"], x["numeric_missing"])))
    if getattr(encoder, layer) is not None:
        out.append(AttributableInput(
            key="categorical", names="categorical", layer=layer, baseline=_mean_category_embedding(layer),
            baseline_text="per categorical column, the mean embedding of its training categories (integrated "
                          "gradients on the embedding layer's output); a missing category is a category of its own",
            display=_tabular_categorical_display))
    return out


ATTRIBUTION_ADAPTERS.register("tabular")(lambda encoder: _tabular_inputs(encoder, "embedding"))
# the MLP tower's first layer over the one-hot categories is an embedding summed over columns
ATTRIBUTION_ADAPTERS.register("tabular_mlp")(lambda encoder: _tabular_inputs(encoder, "categorical_in"))


def _genomics(encoder: nn.Module) -> list[AttributableInput]:
    return [AttributableInput(
        key="values", names="values", missing_key="missing", baseline=_zeros,
        baseline_text="training mean expression of each gene (0 in standardised units); a missing value keeps "
                      "its learned fill value on the whole path, so it gets 0",
        display=lambda f, x: _unstandardise(f, x["values"], x["missing"]), groups=lambda f: getattr(f, "groups", None))]


for _name in ("genomics", "genomics_mlp"):
    ATTRIBUTION_ADAPTERS.register(_name)(_genomics)


# --- irregular time series: one row per observation -----------------------------------------
def _event_value(featurizer: Any, inputs: dict[str, Tensor]) -> np.ndarray:
    code = inputs["code"].cpu().numpy()
    z = inputs["value"].detach().cpu().double().numpy()
    out = z * np.asarray(featurizer.std)[code] + np.asarray(featurizer.mean)[code]
    out[inputs["value_missing"].cpu().numpy() | ~inputs["mask"].cpu().numpy()] = np.nan
    return out


def _event_variable(featurizer: Any, encoders: list[nn.Module], inputs: dict[str, Tensor]) -> np.ndarray:
    names = np.asarray(featurizer.feature_names()["code"], dtype=object)
    return names[inputs["code"].cpu().numpy()]


def _event_time(featurizer: Any, encoders: list[nn.Module], inputs: dict[str, Tensor]) -> np.ndarray:
    return inputs["time"].detach().cpu().double().numpy() * featurizer.time_scale + featurizer.time_shift


def _irregular_series(encoder: nn.Module) -> list[AttributableInput]:
    return [AttributableInput(
        key="value", level="time", axes=("step",), missing_key="value_missing", valid_key="mask", baseline=_zeros,
        baseline_text="each observation's value at its variable's training mean (0 after per-variable "
                      "standardisation); which variables were measured, and when, is kept (not attributed); "
                      "an observation without a value gets 0",
        display=_event_value, columns={"variable": _event_variable, "time": _event_time}, aggregate_by="variable")]


for _name in ("irregular_series", "mtand", "utde"):
    ATTRIBUTION_ADAPTERS.register(_name)(_irregular_series)


# --- notes: one row per note ----------------------------------------------------------------
def _note_time(featurizer: Any, encoders: list[nn.Module], inputs: dict[str, Tensor]) -> np.ndarray:
    return inputs["note_time"].detach().cpu().double().numpy() * featurizer.time_scale + featurizer.time_shift


@ATTRIBUTION_ADAPTERS.register("notes")
def _notes(encoder: nn.Module) -> list[AttributableInput]:
    return [AttributableInput(
        key="weight", level="note", axes=("note",), valid_key="note_mask", baseline=_zeros,
        baseline_text="every note's term weights at 0 (the notes stay, empty of terms); a note's attribution is "
                      "the sum over its terms",
        columns={"time": _note_time})]


# --- slides: one row per patch --------------------------------------------------------------
def _patch_xy(axis: int) -> Callable[[Any, list[nn.Module], dict[str, Tensor]], np.ndarray]:
    def column(featurizer: Any, encoders: list[nn.Module], inputs: dict[str, Tensor]) -> np.ndarray:
        coords = inputs.get("coords")
        if coords is None:
            return np.full(inputs["mask"].shape, -1, dtype=np.int64)
        return coords[..., axis].cpu().numpy()
    return column


def _patch_attention(featurizer: Any, encoders: list[nn.Module], inputs: dict[str, Tensor]) -> np.ndarray:
    """The MIL attention weights (mean over ensemble members); rows sum to 1 over real patches."""
    att = [enc.attention(inputs) for enc in encoders if hasattr(enc, "attention")]
    return torch.stack(att).mean(0).cpu().double().numpy() if att else np.full(inputs["mask"].shape, np.nan)


def _slide(encoder: nn.Module) -> list[AttributableInput]:
    return [AttributableInput(
        key="features", level="patch", axes=("patch",), valid_key="mask", baseline=_mean_patch,
        baseline_text="every patch's features at the slide's mean patch feature; a patch's attribution is the "
                      "sum over its feature dimensions",
        columns={"x": _patch_xy(0), "y": _patch_xy(1), "attention": _patch_attention})]


for _name in ("slide", "abmil", "transmil"):
    ATTRIBUTION_ADAPTERS.register(_name)(_slide)
