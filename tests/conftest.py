"""Shared small fixtures: a 'boring' synthetic cohort and fast trainer settings."""
from __future__ import annotations

import logging
import warnings

import pytest

FAST = dict(max_epochs=3, batch_size=32, num_threads=1, random_state=0)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning")


@pytest.fixture(scope="session")
def boring_binary():
    from mmclin.datasets import make_synthetic_cohort

    return make_synthetic_cohort(n_subjects=160, task="binary", missing={"genes": 0.3}, seed=1)


@pytest.fixture(scope="session")
def boring_survival():
    from mmclin.datasets import make_synthetic_cohort

    return make_synthetic_cohort(n_subjects=160, task="survival", missing={"genes": 0.3}, seed=2)
