"""mmclin: multimodal clinical prediction.

Public API: the estimators, ``ModalitySpec``, cohorts and ``Experiment``. Heavy modules load lazily.
"""
from __future__ import annotations

from typing import Any

from mmclin import _compat

__version__ = "0.1.0"

_compat.install()  # 0.1 import paths (mmclin.tuning, mmclin.tracking, ...) keep working

_LAZY = {
    "MultimodalSurvivalModel": "mmclin.interfaces.estimators",
    "MultimodalClassifier": "mmclin.interfaces.estimators",
    "MultimodalRegressor": "mmclin.interfaces.estimators",
    "ModalitySpec": "mmclin.cohort",
    "Cohort": "mmclin.cohort",
    "Experiment": "mmclin.interfaces.experiment",
    "ExperimentConfig": "mmclin.config",
    "load_cohort": "mmclin.datasets",
    "list_cohorts": "mmclin.datasets",
    "make_synthetic_cohort": "mmclin.datasets",
    "FittedModel": "mmclin.training.core",
    "run_study": "mmclin.interfaces.studies",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmclin' has no attribute {name!r}")
