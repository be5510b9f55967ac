"""Optuna studies over config keys, tracked in MLflow (``mmclin tune``, ``mmclin studies``)."""
from mmclin.interfaces.studies.runner import *  # noqa: F401,F403  (split into small modules below)
from mmclin.interfaces.studies.runner import StudyResult, StudyRunner, list_studies, run_study  # noqa: F401
