"""Optuna samplers and pruners built from ``tune.sampler`` / ``tune.pruner``."""
from __future__ import annotations

import warnings
from typing import Callable

import optuna

from mmclin.config import ComponentConfig, ConfigError


# --- samplers and pruners ----------------------------------------------------------------------
class PerTrialSeedSampler(optuna.samplers.BaseSampler):
    """Rebuilds the wrapped sampler for every trial with seed ``seed + trial.number``: a
    given history gives the same suggestions, and workers sharing one configured seed never
    draw the same random start points."""

    def __init__(self, factory: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._factory, self._seed = factory, seed
        self._inner = factory(seed)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._inner = self._factory(self._seed + trial.number)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def make_sampler(cfg: ComponentConfig, seed: int) -> optuna.samplers.BaseSampler:
    """``tpe`` (default; ``constant_liar`` on, for parallel workers), ``random``, ``gp``, ``qmc``."""
    samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
                "gp": optuna.samplers.GPSampler, "qmc": optuna.samplers.QMCSampler}
    if cfg.name not in samplers:
        raise ConfigError(f"tune.sampler.name: unknown sampler {cfg.name!r}; choose one of {sorted(samplers)}")
    options = dict(cfg.options)
    seed = int(options.pop("seed", seed))
    if cfg.name == "tpe":
        options.setdefault("constant_liar", True)
    cls = samplers[cfg.name]

    def factory(s: int) -> optuna.samplers.BaseSampler:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return cls(seed=s, **options)
        except TypeError as err:
            raise ConfigError(f"tune.sampler: bad options {sorted(options)} for {cfg.name!r}: {err}") from None

    if cfg.name == "qmc":  # its sequence index comes from the storage; one seed for the whole study
        return factory(seed)
    return PerTrialSeedSampler(factory, seed)


def make_pruner(cfg: ComponentConfig) -> tuple[optuna.pruners.BasePruner, int]:
    """``median`` (default), ``percentile`` or ``none``; ``n_warmup_epochs`` (mmclin's, default 5)
    keeps the first epochs of every fold from being reported, so noisy early epochs prune nothing."""
    options = dict(cfg.options)
    warmup = int(options.pop("n_warmup_epochs", 5))
    pruners = {"median": optuna.pruners.MedianPruner, "percentile": optuna.pruners.PercentilePruner,
               "none": optuna.pruners.NopPruner}
    if cfg.name not in pruners:
        raise ConfigError(f"tune.pruner.name: unknown pruner {cfg.name!r}; choose one of {sorted(pruners)}")
    try:
        return pruners[cfg.name](**options), warmup
    except TypeError as err:
        raise ConfigError(f"tune.pruner: bad options {sorted(options)} for {cfg.name!r}: {err}") from None
