"""Optuna studies over config keys, tracked in MLflow (``mmclin tune``, ``mmclin studies``).

One small module per concern: ``storage`` (URLs, opening, the study lock), ``space`` (the search
space over config keys), ``samplers`` (samplers and pruners), ``workers`` (who runs a trial and
whether it is alive), ``pruning`` (per-epoch reports to the pruner), ``trial_runs`` (a trial as a
nested MLflow run), ``runner`` (the worker loop and the refit) and ``results`` (what comes back).
"""
from mmclin.interfaces.studies.pruning import EpochMetricPruning, epoch_metric_pruning, score_computes_metric
from mmclin.interfaces.studies.results import StudyResult, list_studies, retry_of, save_study_plots, state_name, trials_frame
from mmclin.interfaces.studies.runner import StudyError, StudyRunner, run_study
from mmclin.interfaces.studies.samplers import PerTrialSeedSampler, make_pruner, make_sampler
from mmclin.interfaces.studies.space import SearchSpace, get_key
from mmclin.interfaces.studies.storage import StudyLock, default_storage, open_storage, redact
from mmclin.interfaces.studies.workers import lease_alive, worker_lease

__all__ = ["EpochMetricPruning", "PerTrialSeedSampler", "SearchSpace", "StudyError", "StudyLock", "StudyResult",
           "StudyRunner", "default_storage", "epoch_metric_pruning", "get_key", "lease_alive", "list_studies",
           "make_pruner", "make_sampler", "open_storage", "redact", "retry_of", "run_study", "save_study_plots",
           "score_computes_metric", "state_name", "trials_frame", "worker_lease"]
