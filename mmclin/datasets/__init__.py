"""Cohorts: built-in real ones (scikit-survival bundled data) and synthetic ones with planted signal."""
from mmclin.cohort import Cohort
from mmclin.datasets.builtin import COHORTS, list_cohorts, load_cohort
from mmclin.datasets.synthetic import make_synthetic_cohort

__all__ = ["COHORTS", "Cohort", "list_cohorts", "load_cohort", "make_synthetic_cohort"]
