"""Sanity checks for explanations: does the explanation depend on what the model learned?

Adebayo et al., "Sanity Checks for Saliency Maps" (NeurIPS 2018): an explanation that barely
changes when the model's weights are randomised explains the inputs, not the model.
:func:`shuffled_weights` randomises a fitted model by permuting the entries of every
parameter tensor (scales are kept, learned structure is destroyed); :func:`randomisation_check`
compares the explanations of the model and of its shuffled copy.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import polars as pl
import torch


def shuffled_weights(fitted: Any, seed: int = 0) -> Any:
    """A copy of ``fitted`` whose every parameter tensor, the frozen linear path's weights included, has its
    entries randomly permuted."""
    from mmclin.training.linear_path import LinearPath

    out = copy.copy(fitted)
    out.net = copy.deepcopy(fitted.net)
    g = torch.Generator().manual_seed(seed)
    fitted_linear = [t for mod in out.net.modules() if isinstance(mod, LinearPath) for t in (mod.weight, mod.bias)]
    with torch.no_grad():
        for p in [*out.net.parameters(), *fitted_linear]:
            flat = p.detach().reshape(-1)
            p.copy_(flat[torch.randperm(flat.numel(), generator=g)].reshape(p.shape))
    out.net.eval()
    return out


def randomisation_check(fitted: Any, X: Any, seed: int = 0, **options: Any) -> dict[str, float]:
    """Spearman rank correlations between the explanations of ``fitted`` and of its shuffled copy.

    ``feature_global``: of the per-feature mean |attribution|; ``feature_per_subject``: of the
    signed per-subject feature attributions; ``modality_per_subject``: of the per-subject modality
    Shapley values. Values near 0 mean the explanation depends on the learned weights.
    ``options`` go to :func:`mmclin.explain.explain`.
    """
    from scipy.stats import spearmanr

    from mmclin.explain.api import explain

    a = explain(fitted, X, **options)
    b = explain(shuffled_weights(fitted, seed), X, **options)
    out: dict[str, float] = {}
    if a.feature is not None:
        keys = ["modality", "input", "feature"]
        ga = a.summary("feature").join(b.summary("feature"), on=keys, suffix="_shuffled")
        out["feature_global"] = float(spearmanr(ga["mean_abs"], ga["mean_abs_shuffled"])[0])
        pa = a.feature.join(b.feature, on=["row", *keys], suffix="_shuffled")
        out["feature_per_subject"] = float(spearmanr(pa["attribution"], pa["attribution_shuffled"])[0])
    if a.modality is not None:
        ma = a.modality.join(b.modality, on=["row", "modality"], suffix="_shuffled").filter(pl.col("present"))
        out["modality_per_subject"] = float(spearmanr(ma["attribution"], ma["attribution_shuffled"])[0])
    return {k: (v if np.isfinite(v) else 0.0) for k, v in out.items()}
