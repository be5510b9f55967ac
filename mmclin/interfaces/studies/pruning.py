"""Per-epoch pruning: each epoch's held-out metric reported to the study's pruner from inside training."""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import optuna
import polars as pl


# --- per-epoch pruning ----------------------------------------------------------------------------
@dataclass
class _Timer:
    """Seconds spent per part of one trial; ``overhead = total - model - pruning_eval``."""

    model: float = 0.0
    pruning_eval: float = 0.0
    machinery_inside: float = 0.0  # storage/MLflow calls made from inside training callbacks


def score_computes_metric(task: Any, metric: str, y: Any) -> bool:
    """Does ``task.score`` give ``task.metrics()[metric]`` (Harrell's C, R^2, accuracy)? Checked on
    random outputs; per-epoch pruning then skips the other metrics (the IPCW ones are slow)."""
    outputs = np.random.default_rng(0).normal(size=(task.n_rows(y), task.output_dim))
    try:
        full, fast = task.metrics(y, outputs, y_train=y).get(metric), task.score(y, outputs)
    except (NotImplementedError, ValueError, TypeError):
        return False
    return full is not None and fast is not None and math.isfinite(full) and math.isclose(full, fast, rel_tol=1e-9)


def epoch_metric_pruning(**kwargs: Any) -> Any:
    """An :class:`EpochMetricPruning` Lightning callback (Lightning is imported only here)."""
    return _pruning_class()(**kwargs)


@functools.cache
def _pruning_class() -> type:
    import lightning.pytorch as L

    return type("EpochMetricPruning", (EpochMetricPruning, L.Callback), {})


class EpochMetricPruning:
    """After every training epoch of the *first* network a ``fit_model`` call trains (the
    first ensemble member), the fold's held-out metric of the current weights is logged and
    reported to Optuna at step ``step_offset + epoch``; a trial the pruner rejects stops
    with ``optuna.TrialPruned``. Epochs before ``warmup`` are logged but not reported.

    The held-out rows are featurized with featurizers fitted on the fold's training rows,
    as ``fit_model`` fits its own (deterministically, so they are the same).

    Shapes:
        held-out outputs of the current weights ``[N_eval, task.output_dim]`` -> one float per epoch.
    """

    def __init__(self, trial: optuna.Trial | None, frame_train: pl.DataFrame, y_train: Any, frame_eval: pl.DataFrame,
                 y_eval: Any, specs: list, metric: str, step_offset: int, warmup: int,
                 sink: Callable[[dict[str, float], int], None] | None, timer: _Timer, use_score: bool = False) -> None:
        self.trial, self.metric, self.step_offset, self.warmup = trial, metric, step_offset, warmup
        self.use_score = use_score  # task.score computes exactly this metric, without the others
        self.frame_train, self.y_train, self.frame_eval, self.y_eval, self.specs = frame_train, y_train, frame_eval, y_eval, specs
        self.sink, self.timer = sink, timer
        self.fits = 0
        self.table = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.fits += 1
        if self.fits == 1 and self.table is None:
            from mmclin.training.data import featurize, fit_featurizers

            t0 = time.perf_counter()
            self.table = featurize(self.frame_eval, fit_featurizers(self.frame_train, self.specs))
            self.timer.pruning_eval += time.perf_counter() - t0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.fits != 1 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        import torch

        t0 = time.perf_counter()
        net = pl_module.net
        was_training = net.training
        net.eval()
        with torch.no_grad():
            outs = []
            for start in range(0, len(self.table), 4096):
                b = self.table.batch(torch.arange(start, min(start + 4096, len(self.table)))).to(pl_module.device)
                outs.append(net(b.inputs, b.present)[0].float().cpu())
        net.train(was_training)
        outputs = torch.cat(outs).numpy().astype(np.float64)
        task = pl_module.task
        if self.use_score:
            value = task.score(self.y_eval, outputs)
        else:
            value = task.metrics(self.y_eval, outputs, y_train=self.y_train).get(self.metric, math.nan)
        t1 = time.perf_counter()
        self.timer.pruning_eval += t1 - t0
        epoch = trainer.current_epoch
        try:
            if self.sink is not None and value is not None and math.isfinite(value):
                self.sink({f"val_{self.metric}": float(value)}, epoch)
            if self.trial is None or value is None or not math.isfinite(value) or epoch < self.warmup:
                return
            self.trial.report(float(value), self.step_offset + epoch)
            prune = self.trial.should_prune()
        finally:
            self.timer.machinery_inside += time.perf_counter() - t1
        if prune:
            raise optuna.TrialPruned(f"pruned at step {self.step_offset + epoch} (epoch {epoch}): {self.metric}={value:.4f}")
