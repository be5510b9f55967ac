"""Explanations with Captum: modality Shapley values, feature attributions, plots and reports.

    >>> expl = model.explain(frame)                    # doctest: +SKIP
    >>> expl.summary("modality"), expl.summary("feature")  # doctest: +SKIP
    >>> expl.save("explanations/")                     # doctest: +SKIP

Names load lazily, so that importing the package (as the CLI's ``mmclin explain`` does) costs no torch.
"""
from __future__ import annotations

from typing import Any

_LAZY = {
    "explain": "mmclin.explain.api",
    "Explanation": "mmclin.explain.explanation",
    "AttributableInput": "mmclin.explain.attributable",
    "ATTRIBUTION_ADAPTERS": "mmclin.explain.attributable",
    "attributable_inputs": "mmclin.explain.attributable",
    "ExplainTarget": "mmclin.explain.targets",
    "resolve_target": "mmclin.explain.targets",
    "slide_attention": "mmclin.explain.attention",
    "export_heatmaps": "mmclin.explain.attention",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmclin.explain' has no attribute {name!r}")
