"""One worker of a study (``StudyRunner``): ask under the lock, cross-validate, tell, refit the best at the end.

A study searches the ``tune.space`` of an experiment config. Every trial builds a config
from the base config plus its sampled values, trains it on subject-level CV folds of the
*training* subjects (the test split of ``data.test_size`` / ``data.split_seed`` is never
seen), reports the fold's held-out metric per epoch to the pruner, and is one nested MLflow
run under the study's parent run. When the study holds ``n_trials`` trials, the best
values are refit on all training subjects and evaluated once on the test subjects; model,
plots and best parameters go to the parent run.

Storage and workers: the study lives in an Optuna storage (SQLite file beside the MLflow
store by default, an Optuna journal file, or PostgreSQL). Workers that share a storage and a
study name run one study; counting, asking and reaping dead workers' trials happen under a
study lock (a POSIX file lock for SQLite / journal files, a PostgreSQL advisory lock), so
the study ends with exactly ``n_trials`` complete + pruned trials. A trial whose worker died
(same host: its process is gone; other hosts: no heartbeat for ``stale_after`` seconds) is
failed and its parameters are enqueued again, so a killed study resumes with the same
command.

    >>> from mmclin.config import load_config  # doctest: +SKIP
    >>> res = run_study(load_config("experiments/gse7390_tune.yaml"), n_trials=20)  # doctest: +SKIP
    >>> res.best_value, res.test_metrics["c_index"]  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import optuna
from optuna.trial import TrialState

from mmclin.config import ConfigError, ExperimentConfig, config_to_yaml, validate_config
from mmclin.interfaces.studies.pruning import _Timer, epoch_metric_pruning, score_computes_metric
from mmclin.interfaces.studies.results import (
    COUNTED, StudyResult, _baseline_value, retry_of, save_study_plots, state_name, trials_frame,
)
from mmclin.interfaces.studies.samplers import make_pruner, make_sampler
from mmclin.interfaces.studies.space import SearchSpace, _del_key
from mmclin.interfaces.studies.storage import StudyLock, default_storage, open_storage, redact
from mmclin.interfaces.studies.trial_runs import _TrialRun
from mmclin.interfaces.studies.workers import HOST, _Heartbeat, lease_alive, worker_lease


class StudyError(RuntimeError):
    """The study cannot go on (e.g. every recent trial failed); the message says why."""


# keys that may differ when a study is resumed or joined by another worker
_VOLATILE = ("name", "output_dir", "tracking", "tune.n_trials", "tune.timeout", "tune.storage", "tune.study",
             "tune.heartbeat_interval", "tune.stale_after", "tune.max_consecutive_failures", "tune.enqueue_config",
             "trainer.progress_bar", "trainer.num_threads", "trainer.device", "trainer.devices", "trainer.strategy",
             "trainer.num_nodes", "trainer.precision")


# --- the study runner ---------------------------------------------------------------------------------
class StudyRunner:
    """One worker of a study. ``run()`` asks trials until the study holds ``n_trials``
    (complete + pruned + running + waiting), then refits when it is the last worker.

    Args:
        config: an ``ExperimentConfig`` with a ``tune`` section.
        n_trials, storage, study_name, timeout: override ``tune.*``.
        refit: refit the best values and score the test subjects (by the worker that
            finishes the study).
        output_dir: where the refit model, predictions and study plots go
            (default ``config.output_dir``; ``<output_dir>/<name>/``).
        echo: print one line per trial.
    """

    def __init__(self, config: ExperimentConfig, n_trials: int | None = None, storage: str | None = None,
                 study_name: str | None = None, timeout: float | None = None, refit: bool = True,
                 output_dir: str | Path | None = None, echo: Callable[[str], None] | None = print) -> None:
        if config.tune is None:
            raise ConfigError("this config has no 'tune' section; add tune.space (see docs/studies.md)")
        from mmclin.training.distributed import env_world_size

        if env_world_size() > 1:
            raise ConfigError("mmclin tune runs each trial in one process; scale studies out with several "
                              "workers (--storage/--study), not as ranks of torchrun")
        self.config = config
        self.tune = config.tune
        self.n_trials = n_trials or self.tune.n_trials
        self.storage_url = storage or self.tune.storage or default_storage(config)
        self.study_name = study_name or self.tune.study or config.name
        self.timeout = timeout or self.tune.timeout
        self.refit = refit
        self.output_dir = Path(output_dir or config.output_dir)
        self.echo = echo or (lambda msg: None)
        self.space = SearchSpace(self.tune.space)
        self.timings: list[dict[str, Any]] = []
        self._client = None
        self._experiment_id: str | None = None
        self._parent_id: str | None = None

    # --- setup ------------------------------------------------------------------------------
    def _prepare_data(self) -> None:
        from mmclin.interfaces.experiment import Experiment, _take
        from mmclin.training.core import build_task
        from mmclin.training.splits import cv_splits, holdout_split

        self.experiment = Experiment(self.config)
        c = self.cohort = self.experiment.cohort
        self.task_config = self.experiment.task_config()
        task = build_task(self.task_config)
        problem = task.problem
        groups = self.experiment._groups()
        d = self.config.data
        self.train_idx, self.test_idx = holdout_split(c.y, problem, d.test_size, d.split_seed, groups)
        y_tr = _take(c.y, self.train_idx)
        g_tr = None if groups is None else groups[self.train_idx]
        if self.tune.cv:
            local = list(cv_splits(y_tr, problem, self.tune.cv, d.split_seed, g_tr))
        else:
            local = [holdout_split(y_tr, problem, self.tune.holdout, d.split_seed, g_tr)]
        # fold indices point into the cohort, and only ever at training subjects
        self.folds = [(self.train_idx[a], self.train_idx[b]) for a, b in local]
        task.fit_targets(task.check_targets(y_tr))
        probe = task.metrics(y_tr, np.zeros((len(self.train_idx), task.output_dim)), y_train=y_tr)
        self.metric = self.tune.metric or task.primary_metric
        if self.metric not in probe:
            raise ConfigError(f"tune.metric: {self.metric!r} is not a metric of task {self.task_config.name!r}; "
                              f"choose one of {sorted(probe)}")
        if self.tune.direction is not None:
            self.direction = self.tune.direction
        elif self.metric == task.primary_metric:
            self.direction = "maximize" if task.greater_is_better else "minimize"
        else:
            raise ConfigError(f"tune.direction is needed for metric {self.metric!r} (the task states a direction "
                              f"only for its primary metric {task.primary_metric!r})")
        self.base_dump = self.config.model_dump(mode="json")
        self.score_is_metric = score_computes_metric(task, self.metric, y_tr)

    def _preflight(self) -> None:
        """Every key at every choice / bound builds a config and a network: a typo or an option
        a head does not take fails here, named, not as twenty failed trials."""
        from mmclin.training.core import build_net, build_task
        from mmclin.training.data import fit_featurizers

        frame = self.cohort.frame[self.train_idx]
        featurizers = fit_featurizers(frame, self.cohort.modalities)
        kwargs = {m: f.encoder_kwargs() for m, f in featurizers.items()}
        for key, value, cfg in self._representatives():
            try:
                build_net(self.cohort.modalities, kwargs, cfg.model, build_task(cfg.model.task or self.task_config))
            except (ValueError, TypeError, KeyError) as err:
                msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
                raise ConfigError(f"tune.space[{key!r}] = {value!r}: {msg}") from None

    def _representatives(self) -> Iterator[tuple[str, Any, ExperimentConfig]]:
        try:
            yield from self.space.representative_configs(self.config)
        except ConfigError as err:
            raise ConfigError(f"tune.space: {err}") from None

    def _fingerprint(self) -> dict[str, Any]:
        dump = copy.deepcopy(self.base_dump)
        for key in _VOLATILE:
            _del_key(dump, key)
        return dump

    def _open_study(self) -> None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = make_sampler(self.tune.sampler, self.config.trainer.seed)
        self.pruner, self.warmup = make_pruner(self.tune.pruner)
        self.lock = StudyLock(self.storage_url, self.study_name)
        with self.lock.hold():
            self.storage = open_storage(self.storage_url)
            self.study = optuna.create_study(storage=self.storage, study_name=self.study_name, sampler=sampler,
                                             pruner=self.pruner, direction=self.direction, load_if_exists=True)
            attrs = self.study.user_attrs
            if "mmclin.config" not in attrs:
                self.study.set_user_attr("mmclin.config", self._fingerprint())
                self.study.set_user_attr("mmclin.metric", self.metric)
                if self.tune.enqueue_config and not self.study.get_trials(deepcopy=False):
                    params, misfits = self.space.base_params(self.base_dump)
                    if params is None:
                        self.echo(f"no baseline trial: the config's values of {misfits} are not in the search space")
                    else:
                        self.study.enqueue_trial(params, user_attrs={"mmclin.baseline": True})
            else:
                self._check_same_study(attrs)
            if self.config.tracking.enabled:
                self._parent_run()

    def _check_same_study(self, attrs: dict[str, Any]) -> None:
        if self.study.direction.name.lower() != self.direction:
            raise ConfigError(f"study {self.study_name!r} in {redact(self.storage_url)} was created to "
                              f"{self.study.direction.name.lower()} {attrs.get('mmclin.metric')!r}; this config would "
                              f"{self.direction} {self.metric!r}: use another --study name")
        old, new = _flat(attrs["mmclin.config"]), _flat(self._fingerprint())
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise ConfigError(f"study {self.study_name!r} in {redact(self.storage_url)} was created from a different "
                              f"config (differs in {diff[:8]}); resume it with the same config, or start a new study "
                              "with --study NAME")

    def _parent_run(self) -> None:
        """The study's MLflow run: made by the first worker, found again by the others and on resume."""
        import mlflow

        from mmclin.persistence import tracking

        tracking.quiet_mlflow()
        self._experiment_id = tracking._setup(self.config.tracking)
        tracking.mark_dead_runs_killed(self._experiment_id)
        self._client = mlflow.MlflowClient(self.config.tracking.uri)
        info = self.study.user_attrs.get("mmclin.mlflow")
        if info:
            try:
                self._client.get_run(info["run_id"])
            except Exception:
                raise ConfigError(f"study {self.study_name!r} is tracked in MLflow run {info['run_id']} of "
                                  f"{info.get('tracking_uri')!r}, which {self.config.tracking.uri!r} does not hold; "
                                  f"pass --tracking-uri {info.get('tracking_uri')}") from None
            self._parent_id = info["run_id"]
            self._client.update_run(self._parent_id, status="RUNNING")
        else:
            tags = {"mmclin.verb": "tune", "mmclin.study": self.study_name, "mmclin.storage": redact(self.storage_url)}
            run = self._client.create_run(self._experiment_id, run_name=f"study-{self.study_name}", tags=tags)
            self._parent_id = run.info.run_id
            with mlflow.start_run(run_id=self._parent_id):
                tracking.log_config(self.config, self.cohort.frame)
                mlflow.log_params({"tune.metric_resolved": self.metric, "tune.direction_resolved": self.direction,
                                   "n_tuning_subjects": len(self.train_idx), "n_test_subjects": len(self.test_idx)})
            self._client.update_run(self._parent_id, status="RUNNING")
            self.study.set_user_attr("mmclin.mlflow", {"run_id": self._parent_id, "experiment_id": self._experiment_id,
                                                       "tracking_uri": redact(self.config.tracking.uri)})
        self._client.set_tag(self._parent_id, "mmclin.host", HOST)
        self._client.set_tag(self._parent_id, "mmclin.pid", str(os.getpid()))

    # --- trials -----------------------------------------------------------------------------
    def _reap_stale(self) -> None:
        """Fail the running trials of dead workers (under the lock) and enqueue their values again."""
        now = time.time()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            lease = t.user_attrs.get("mmclin.worker")
            beat = t.user_attrs.get("mmclin.heartbeat") or (lease or {}).get("time") or t.datetime_start.timestamp()
            if lease_alive(lease, beat, self.tune.stale_after, now):
                continue
            who = f"{lease['host']}:{lease['pid']}" if lease else "an unknown worker"
            self.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            reason = f"interrupted: worker {who} is gone"
            self._queue_again(t, reason)
            run_id = t.user_attrs.get("mmclin.mlflow_run_id")
            if run_id and self._client is not None:
                with contextlib.suppress(Exception):
                    self._client.set_tag(run_id, "mmclin.state", "failed")
                    self._client.set_tag(run_id, "mmclin.error", reason)
                    self._client.set_terminated(run_id, status="KILLED")
            self.echo(f"trial {t.number} failed ({reason}); its values are queued again")

    def _queue_again(self, failed: optuna.trial.FrozenTrial, reason: str) -> None:
        """Queue a failed trial's values again with Optuna's own retry callback (it records ``retry_history``),
        carrying over only what describes the values, not the dead worker's lease, heartbeat or error."""
        carried = copy.deepcopy(failed)
        carried.user_attrs = {**{k: v for k, v in failed.user_attrs.items() if k == "mmclin.baseline"},
                              "mmclin.retry_reason": reason}
        with warnings.catch_warnings():  # "experimental since 2.8": Optuna 4.9+ names it as RetryFailedTrialCallback's successor
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=False)
        retry(self.study, carried)

    def _ask(self) -> optuna.Trial | None:
        with self.lock.hold():
            self._reap_stale()
            counted = self.study.get_trials(deepcopy=False, states=COUNTED)
            waiting = any(t.state == TrialState.WAITING for t in counted)
            if len(counted) >= self.n_trials and not waiting:  # queued trials are inside the budget: run them
                return None
            trial = self.study.ask()
            trial.set_user_attr("mmclin.worker", worker_lease())
        return trial

    def _step_stride(self) -> int:
        # pruner steps: fold k, epoch e -> k * stride + e, so trials are compared on the same fold and epoch
        p = self.tune.space.get("trainer.max_epochs")
        high = p.high if p is not None and p.type != "categorical" else max(p.choices) if p is not None else 0
        return int(max(self.config.trainer.max_epochs, high or 0)) + 1

    def _cross_validate(self, cfg: ExperimentConfig, trial: optuna.Trial, run: _TrialRun | None, timer: _Timer) -> float:
        from mmclin.interfaces.experiment import _take
        from mmclin.training.core import fit_model

        c = self.cohort
        prune = not isinstance(self.pruner, optuna.pruners.NopPruner)
        if prune and getattr(cfg.model, "pretrained", None):
            raise ConfigError("pruning evaluates each epoch with freshly fitted featurizers, which a pretrained "
                              "model does not use; set tune.pruner: {name: none} with model.pretrained")
        stride, scores, rows = self._step_stride(), [], []
        for k, (tr, va) in enumerate(self.folds):
            f_tr, y_tr, f_va, y_va = c.frame[tr], _take(c.y, tr), c.frame[va], _take(c.y, va)
            sink = run.sink(f"fold{k}_") if run else None
            callbacks = [epoch_metric_pruning(
                trial=trial, frame_train=f_tr, y_train=y_tr, frame_eval=f_va, y_eval=y_va, specs=c.modalities,
                metric=self.metric, step_offset=k * stride, warmup=self.warmup, sink=sink, timer=timer,
                use_score=self.score_is_metric)] if prune else []
            t0 = time.perf_counter()
            before = timer.pruning_eval + timer.machinery_inside
            try:  # a pruned fit ends in TrialPruned: its training time still counts as training
                fitted = fit_model(f_tr, y_tr, c.modalities, cfg.model, cfg.trainer, cfg.model.task or self.task_config,
                                   id_column=c.id_column or None, epoch_sink=sink, extra_callbacks=callbacks)
                metrics = fitted.task.metrics(y_va, fitted.predict_outputs(f_va), y_train=y_tr)
            finally:
                timer.model += time.perf_counter() - t0 - (timer.pruning_eval + timer.machinery_inside - before)
            rows.append(metrics)
            scores.append(metrics.get(self.metric, math.nan))
            if run:
                t1 = time.perf_counter()
                run.log({f"fold{k}_{m}": v for m, v in metrics.items()})
                if k < len(self.folds) - 1:  # progress visible per fold; the last fold is written by run.end
                    run.flush()
                timer.machinery_inside += time.perf_counter() - t1
        value = float(np.nanmean(scores)) if not np.isnan(scores).all() else math.nan
        if run:
            names = sorted({m for r in rows for m in r})
            mean = {f"cv_mean_{m}": float(np.nanmean([r.get(m, math.nan) for r in rows])) for m in names
                    if not np.isnan([r.get(m, math.nan) for r in rows]).all()}
            run.log({**mean, "objective": value})  # written by run.end, with the trial's state
        if not math.isfinite(value):
            raise ValueError(f"{self.metric} is undefined on every fold (NaN)")
        return value

    def _run_trial(self) -> bool:
        t_start = time.perf_counter()
        trial = self._ask()
        if trial is None:
            return False
        heartbeat = _Heartbeat(trial, self.tune.heartbeat_interval)
        timer, run, error, value = _Timer(), None, None, None
        state = TrialState.FAIL
        try:
            values, removed = self.space.suggest(trial, self.base_dump)
            if self._client is not None:
                run = _TrialRun(self._client, self._experiment_id, self._parent_id, self.study_name, trial, values)
                trial.set_user_attr("mmclin.mlflow_run_id", run.run_id)
            cfg = self.space.apply(self.config, values, removed)
            value = self._cross_validate(cfg, trial, run, timer)
            state = TrialState.COMPLETE
        except optuna.TrialPruned as err:
            state, error = TrialState.PRUNED, str(err)
        except (KeyboardInterrupt, SystemExit) as err:
            heartbeat.stop()
            reason = f"interrupted ({type(err).__name__} {getattr(err, 'code', '') or ''})".replace(" )", ")")
            with contextlib.suppress(Exception):
                trial.set_user_attr("mmclin.error", reason)
                self.study.tell(trial, state=TrialState.FAIL)
                self._queue_again(self.study.get_trials(deepcopy=False)[trial.number], reason)
                if run:
                    run.end(TrialState.FAIL, reason)
            raise
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
        heartbeat.stop()
        t_tell = time.perf_counter()
        if error and state == TrialState.FAIL:
            trial.set_user_attr("mmclin.error", error[:2000])
        if state == TrialState.COMPLETE:
            self.study.tell(trial, value)
        else:
            self.study.tell(trial, state=state)
        if run:
            try:
                run.end(state, error if state == TrialState.FAIL else None)
            except Exception as err:  # the trial's result is in the study; a tracking hiccup must not end the study
                self.echo(f"trial {trial.number}: could not close its MLflow run: {type(err).__name__}: {err}")
        total = time.perf_counter() - t_start
        overhead = total - timer.model - timer.pruning_eval
        self.timings.append({"number": trial.number, "state": state_name(state), "seconds": total,
                             "model_seconds": timer.model, "pruning_eval_seconds": timer.pruning_eval,
                             "overhead_seconds": overhead, "tell_and_close_seconds": time.perf_counter() - t_tell})
        shown = f"{self.metric}={value:.4f}" if value is not None else (error or "")
        params = ", ".join(f"{k.split('.', 1)[1]}={_short(v)}" for k, v in trial.params.items())
        attrs = trial.user_attrs
        note = " (baseline)" if attrs.get("mmclin.baseline") else (
            f" (retry of {retry_of(trial)})" if retry_of(trial) is not None else "")
        # 1-based "k/N" for where the study is; Optuna's own 0-based number (#) is what `mmclin studies` lists
        self.echo(f"trial {trial.number + 1:>3}/{self.n_trials} (#{trial.number}){note} {state_name(state):<8} "
                  f"{shown[:160]}  [{params}]  {total:.1f} s")
        self._consecutive_failures = self._consecutive_failures + 1 if state == TrialState.FAIL else 0
        if self._consecutive_failures >= self.tune.max_consecutive_failures:
            raise StudyError(f"{self._consecutive_failures} trials in a row failed; the last one with: {error}")
        return True

    # --- finish -----------------------------------------------------------------------------
    def _claim_refit(self) -> optuna.trial.FrozenTrial | str | None:
        """The best trial to refit, when this worker should do it: the study is full, nothing
        runs any more, and no live worker refits (or has refit) this best trial. ``"more"``:
        a dead worker's trial was queued again, so there is work left."""
        with self.lock.hold():
            self._reap_stale()
            trials = self.study.get_trials(deepcopy=False)
            if any(t.state == TrialState.WAITING for t in trials):
                return "more"
            counted = [t for t in trials if t.state in COUNTED]
            if len(counted) < self.n_trials or any(t.state == TrialState.RUNNING for t in trials):
                return None
            if not self.refit:
                return None
            if not any(t.state == TrialState.COMPLETE for t in trials):
                raise StudyError(f"study {self.study_name!r} has no complete trial to refit")
            best = self.study.best_trial
            claim = self.study.user_attrs.get("mmclin.refit")
            if claim and claim.get("trial") == best.number:
                if claim.get("status") == "done":
                    return None
                lease = claim.get("worker")
                if lease_alive(lease, claim.get("time", 0), self.tune.stale_after):
                    return None
            self.study.set_user_attr("mmclin.refit", {"trial": best.number, "status": "running",
                                                      "worker": worker_lease(), "time": time.time()})
        return best

    def _do_refit(self, best: optuna.trial.FrozenTrial) -> dict[str, Any]:
        import mlflow

        from mmclin.interfaces.experiment import Experiment, log_fitted_model
        from mmclin.persistence import tracking

        removed = self.space.active_keys(best.params, self.base_dump)[1]
        cfg = self.space.apply(self.config, best.params, removed)
        exp = Experiment(cfg)
        exp._cohort = self.cohort  # same frame and split; not loaded twice
        self.echo(f"refitting trial {best.number} ({self.metric}={best.value:.4f}) on all {len(self.train_idx)} "
                  f"training subjects; scoring {len(self.test_idx)} test subjects once")
        res = exp.fit(self.output_dir)
        if res.predictions.height != len(self.test_idx):  # Experiment.fit must split exactly as the study did
            raise StudyError(f"the refit scored {res.predictions.height} subjects, the study held out {len(self.test_idx)}")
        from mmclin.persistence.atomic import atomic_directory

        study_dir = self.output_dir / self.config.name / "study"
        best_raw = cfg.model_dump(mode="json")
        best_raw["tracking"] = self.config.tracking.model_dump(mode="json")
        best_raw["trainer"]["progress_bar"] = self.config.trainer.progress_bar
        best_raw["tune"] = None
        frame = trials_frame(self.study)
        with atomic_directory(study_dir) as tmp:  # the study's files appear together or not at all
            frame.write_parquet(tmp / "trials.parquet")
            (tmp / "best_config.yaml").write_text(config_to_yaml(validate_config(best_raw)))
            (tmp / "best_params.json").write_text(json.dumps(best.params, indent=1, default=str))
            notes = save_study_plots(self.study, tmp)
            if notes:
                (tmp / "plots_not_drawn.json").write_text(json.dumps(notes, indent=1))
        baseline = _baseline_value(self.study)
        if self._parent_id is not None:
            with mlflow.start_run(run_id=self._parent_id):
                tracking.log_metrics(res.metrics, prefix="test_")
                tracking.log_metrics({f"best_cv_{self.metric}": best.value, "best_trial": best.number,
                                      **({f"baseline_cv_{self.metric}": baseline} if baseline is not None else {}),
                                      **{f"n_{s}": float((frame["state"] == s).sum()) for s in ("complete", "pruned", "failed")}})
                mlflow.set_tags({f"best.{k}": str(v)[:500] for k, v in best.params.items()})
                mlflow.log_artifacts(str(study_dir), "study")
                tracking.log_frame(res.predictions, "test_predictions.parquet")
                if self.config.tracking.log_model:
                    log_fitted_model(res.fitted, res.model_dir)
        info = {"trial": best.number, "status": "done", "time": time.time(), "test": res.metrics,
                "model_dir": str(res.model_dir.resolve()), "best_value": best.value}
        self.study.set_user_attr("mmclin.refit", info)
        return info

    def setup(self) -> "StudyRunner":
        """Load the cohort and folds, check the space, open (or create) the study; ``run`` calls it."""
        if not hasattr(self, "study"):
            self._prepare_data()
            self._preflight()
            self._open_study()
            self._consecutive_failures = 0
        return self

    def run(self) -> StudyResult:
        t0 = time.perf_counter()
        self.setup()
        self.echo(f"study {self.study_name!r} in {redact(self.storage_url)}: {self.direction} {self.metric} "
                  f"({f'{self.tune.cv}-fold CV' if self.tune.cv else f'{self.tune.holdout:.0%} hold-out'} over "
                  f"{len(self.train_idx)} training subjects; {len(self.test_idx)} test subjects untouched), "
                  f"target {self.n_trials} trials")
        refit_done = False
        try:
            while True:
                while (self.timeout is None or time.perf_counter() - t0 < self.timeout) and self._run_trial():
                    pass
                if self.timeout is not None and time.perf_counter() - t0 >= self.timeout:
                    self.echo(f"timeout of {self.timeout:g} s reached: no new trials from this worker")
                    break
                best = self._claim_refit()
                if best == "more":
                    continue
                if best is not None:
                    self._do_refit(best)
                    refit_done = True
                break
            self._close_parent(refit_done)
        finally:
            self.lock.close()
        return self._result(time.perf_counter() - t0, refit_done)

    def _close_parent(self, refit_done: bool) -> None:
        """The last worker out ends the parent run: FINISHED when the study is full, KILLED
        (resumable) when it stopped short; while others still run trials it stays RUNNING."""
        if self._client is None or refit_done:
            return  # the refit's `with start_run` already ended it FINISHED
        trials = self.study.get_trials(deepcopy=False)
        if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
            return
        full = sum(t.state in COUNTED for t in trials) >= self.n_trials
        refit = self.study.user_attrs.get("mmclin.refit") or {}
        if full and self.refit and refit.get("status") != "done":
            return  # a live worker is refitting
        self._client.set_terminated(self._parent_id, status="FINISHED" if full else "KILLED")

    def _result(self, seconds: float, refit_done: bool) -> StudyResult:
        trials = self.study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = self.study.best_trial if complete else None
        refit = self.study.user_attrs.get("mmclin.refit") or {}
        current = best is not None and refit.get("trial") == best.number and refit.get("status") == "done"
        return StudyResult(
            study_name=self.study_name, storage=redact(self.storage_url), metric=self.metric, direction=self.direction,
            n_complete=len(complete), n_pruned=sum(t.state == TrialState.PRUNED for t in trials),
            n_failed=sum(t.state == TrialState.FAIL for t in trials),
            best_value=best.value if best else None, best_params=dict(best.params) if best else {},
            best_trial=best.number if best else None, baseline_value=_baseline_value(self.study),
            test_metrics=refit.get("test") if current else None,
            model_dir=Path(refit["model_dir"]) if current else None, parent_run_id=self._parent_id,
            trials=trials_frame(self.study), timings=self.timings, refit_by_this_worker=refit_done, seconds=seconds,
        )


def _flat(d: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(d, dict):
        return {k: v for key, sub in d.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): json.dumps(d, sort_keys=True, default=str)}


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def run_study(config: ExperimentConfig, **kwargs: Any) -> StudyResult:
    """Run (or resume, or join) the study of ``config.tune``; see :class:`StudyRunner` for the options."""
    return StudyRunner(config, **kwargs).run()
