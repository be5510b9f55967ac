"""Optuna studies over config keys, tracked in MLflow (``mmclin tune``, ``mmclin studies``).

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
import functools
import json
import math
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import optuna
import polars as pl
from optuna.trial import TrialState

from mmclin.config import ComponentConfig, ConfigError, ExperimentConfig, SearchParam, config_to_yaml, validate_config

HOST = socket.gethostname()
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
# keys that may differ when a study is resumed or joined by another worker
_VOLATILE = ("name", "output_dir", "tracking", "tune.n_trials", "tune.timeout", "tune.storage", "tune.study",
             "tune.heartbeat_interval", "tune.stale_after", "tune.max_consecutive_failures", "tune.enqueue_config",
             "trainer.progress_bar", "trainer.num_threads", "trainer.device", "trainer.devices", "trainer.strategy",
             "trainer.num_nodes", "trainer.precision")


def state_name(state: TrialState) -> str:
    """complete, pruned, failed, running, waiting: the trial states as MLflow tags and tables show them."""
    return "failed" if state == TrialState.FAIL else state.name.lower()


class StudyError(RuntimeError):
    """The study cannot go on (e.g. every recent trial failed); the message says why."""


# --- storage -------------------------------------------------------------------------------
def default_storage(config: ExperimentConfig) -> str:
    """``sqlite:///<dir>/optuna.db`` beside a SQLite MLflow store, else ``sqlite:///optuna.db`` here."""
    uri = config.tracking.uri
    if config.tracking.enabled and uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).parent / 'optuna.db'}"
    return "sqlite:///optuna.db"


def redact(url: str) -> str:
    """The storage URL without its password, for logs and MLflow tags."""
    if url.startswith(("sqlite", "journal:")):
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy knows: show the scheme only
        return url.split("://")[0] + "://***"


def _journal_path(url: str) -> Path:
    # like sqlite URLs: journal:///relative/file.log, journal:////absolute/file.log
    if not url.startswith("journal:///"):
        raise ValueError(f"journal storage must look like journal:///optuna.journal or journal:////abs/path, got {url!r}")
    return Path(url[len("journal:///"):])


def _file_of(url: str) -> Path | None:
    if url.startswith("journal:"):
        return _journal_path(url)
    if url.startswith("sqlite:///"):
        from sqlalchemy.engine import make_url

        db = make_url(url).database
        return Path(db) if db and db != ":memory:" else None
    return None


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``sqlite:///f.db``, ``journal:///f.journal`` or a database URL
    (``postgresql://user:pw@host/db``; driver from ``pip install 'mmclin[postgres]'``)."""
    path = _file_of(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(path)))
    kwargs: dict[str, Any] = _sqlite_engine_kwargs(path) if url.startswith("sqlite") and path else {"pool_pre_ping": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except ModuleNotFoundError as err:
        raise ValueError(f"storage {redact(url)!r} needs a database driver ({err.name}); for PostgreSQL: "
                         "pip install 'mmclin[postgres]'") from None
    except Exception as err:  # sqlalchemy ArgumentError / OperationalError: say which storage
        raise ValueError(f"cannot open Optuna storage {redact(url)!r}: {type(err).__name__}: {err}") from None


def _sqlite_engine_kwargs(path: Path) -> dict[str, Any]:
    """WAL journal + ``synchronous=NORMAL``: a commit no longer waits for an fsync (per-epoch
    reports cost ~2 ms instead of ~20 ms here); a killed process loses nothing committed,
    only an OS crash can lose the last commits. The file must be on a local disk (WAL)."""
    import sqlite3

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(str(path), timeout=60, check_same_thread=False)  # heartbeat thread shares the pool
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    return {"creator": connect}


class StudyLock:
    """Serialises the short count/ask/reap steps of all mmclin workers of one storage.

    SQLite and journal files: a POSIX lock (``fcntl.lockf``, NFS-safe where NFS locking works)
    on ``<file>.mmclin-lock``; PostgreSQL: a session advisory lock. Both vanish with a killed
    process. Other databases get no lock: the trial count may then overshoot by up to the
    number of workers (a warning says so).
    """

    def __init__(self, url: str, study_name: str) -> None:
        self.url, self.study_name = url, study_name
        self._fd: int | None = None
        self._conn = None
        self._key = int.from_bytes(__import__("hashlib").sha1(study_name.encode()).digest()[:8], "big", signed=True)
        path = _file_of(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(f"{path}.mmclin-lock", os.O_RDWR | os.O_CREAT, 0o644)
        elif url.startswith("postgresql"):
            import sqlalchemy
            from sqlalchemy.pool import NullPool

            engine = sqlalchemy.create_engine(url, poolclass=NullPool)
            self._conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        else:
            warnings.warn(f"no study lock for storage {redact(url)!r}: with several workers the study may end "
                          "with a few more trials than asked for", stacklevel=2)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        if self._fd is not None:
            import fcntl

            fcntl.lockf(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)
        elif self._conn is not None:
            import sqlalchemy

            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
            try:
                yield
            finally:
                self._conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
        else:
            yield

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# --- the search space ------------------------------------------------------------------------
_MISSING = object()


def get_key(tree: dict[str, Any], key: str, default: Any = None) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _set_key(tree: dict[str, Any], key: str, value: Any) -> None:
    *path, leaf = key.split(".")
    node = tree
    for part in path:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"tune.space key {key!r}: {part!r} is a value, not a section")
        node = nxt
    node[leaf] = value


def _del_key(tree: dict[str, Any], key: str) -> None:
    *path, leaf = key.split(".")
    node = tree
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(leaf, None)


class SearchSpace:
    """``tune.space`` as Optuna suggestions, in declaration order, with conditions.

    A key whose ``when`` does not hold is not sampled and is *removed* from the trial's
    config, so an option of one fusion head never reaches another head.
    """

    def __init__(self, space: dict[str, SearchParam]) -> None:
        self.space = dict(space)

    @staticmethod
    def _holds(when: dict[str, Any] | None, values: dict[str, Any], removed: set[str], base: dict[str, Any]) -> bool:
        for ref, expected in (when or {}).items():
            actual = None if ref in removed else values.get(ref, get_key(base, ref))
            allowed = expected if isinstance(expected, list) else [expected]
            if actual not in allowed:
                return False
        return True

    def suggest(self, trial: optuna.Trial, base: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Sampled ``{key: value}`` and the keys whose condition did not hold."""
        values: dict[str, Any] = {}
        removed: list[str] = []
        for key, p in self.space.items():
            if not self._holds(p.when, values, set(removed), base):
                removed.append(key)
                continue
            if p.type == "categorical":
                values[key] = trial.suggest_categorical(key, p.choices)
            elif p.type == "int":
                values[key] = trial.suggest_int(key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
            else:
                values[key] = trial.suggest_float(key, float(p.low), float(p.high), step=p.step, log=p.log)
        return values, removed

    def active_keys(self, values: dict[str, Any], base: dict[str, Any]) -> tuple[list[str], list[str]]:
        """Keys sampled and removed for given values (as ``suggest`` would decide)."""
        active, removed = [], []
        for key, p in self.space.items():
            (active if self._holds(p.when, values, set(removed), base) else removed).append(key)
        return active, removed

    @staticmethod
    def contains(p: SearchParam, value: Any) -> bool:
        """Could Optuna suggest ``value`` for ``p``?"""
        if p.type == "categorical":
            return value in p.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not p.low <= value <= p.high:
            return False
        if p.type == "int" and value != int(value):
            return False
        if p.log or (p.type == "float" and p.step is None):
            return True
        q = (value - p.low) / (p.step or 1)
        return math.isclose(q, round(q), abs_tol=1e-9)

    def base_params(self, base: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
        """The base config's own values as trial params, or None with the keys that do not fit the space."""
        values: dict[str, Any] = {}
        removed: set[str] = set()
        misfits = []
        for key, p in self.space.items():
            if not self._holds(p.when, values, removed, base):
                removed.add(key)
                continue
            v = get_key(base, key, _MISSING)
            if v is _MISSING or not self.contains(p, v):
                misfits.append(key)
                continue
            values[key] = int(v) if p.type == "int" else v
        return (None if misfits else values), misfits

    def apply(self, base: ExperimentConfig, values: dict[str, Any], removed: list[str]) -> ExperimentConfig:
        """The trial's config: base + values, removed keys deleted, validated like a YAML file."""
        raw = base.model_dump(mode="json")
        for key in removed:
            _del_key(raw, key)
        for key, v in values.items():
            _set_key(raw, key, v)
        raw["tracking"]["enabled"] = False  # the study tracks trials itself
        raw["trainer"]["progress_bar"] = False
        return validate_config(raw, f"(trial values {values})")

    def representative_configs(self, base: ExperimentConfig) -> Iterator[tuple[str, Any, ExperimentConfig]]:
        """For the pre-flight check: each key at each choice / at low and high, its conditions made true."""
        raw = base.model_dump(mode="json")
        for key, p in self.space.items():
            forced = {ref: (exp[0] if isinstance(exp, list) else exp) for ref, exp in (p.when or {}).items()}
            candidates = p.choices if p.type == "categorical" else sorted({p.low, p.high})
            for v in candidates:
                v = int(v) if p.type == "int" else v
                values = {**forced, key: v}
                removed = self.active_keys(values, raw)[1]
                yield key, v, self.apply(base, values, [k for k in removed if k not in values])


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


# --- worker liveness ----------------------------------------------------------------------------
def _proc_start(pid: int) -> str | None:
    """Start time of a process (Linux ``/proc``), to tell a reused pid from the original."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _process_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return start is None or _proc_start(pid) in (None, start)


def worker_lease() -> dict[str, Any]:
    return {"host": HOST, "pid": os.getpid(), "start": _proc_start(os.getpid()), "time": time.time()}


def lease_alive(lease: dict[str, Any] | None, last_beat: float, stale_after: float, now: float | None = None) -> bool:
    """Same host: is the process still there? Other hosts: was there a heartbeat within ``stale_after``?"""
    now = time.time() if now is None else now
    if lease and lease.get("host") == HOST and isinstance(lease.get("pid"), int):
        return _process_alive(lease["pid"], lease.get("start"))
    return now - last_beat <= stale_after


class _Heartbeat:
    """Refreshes ``mmclin.heartbeat`` of the running trial every ``interval`` seconds."""

    def __init__(self, trial: optuna.Trial, interval: float) -> None:
        self.trial, self.interval = trial, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"mmclin-heartbeat-{trial.number}")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.trial.set_user_attr("mmclin.heartbeat", time.time())
            except Exception:  # the trial finished meanwhile, or the storage hiccupped: try next time
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


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


# --- MLflow ----------------------------------------------------------------------------------------
class _TrialRun:
    """One trial as a nested MLflow run (created through the client: no global active run);
    per-epoch metrics are buffered and written in batches."""

    def __init__(self, client: Any, experiment_id: str, parent_id: str, study_name: str, trial: optuna.Trial,
                 params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        tags = {"mlflow.parentRunId": parent_id, "mmclin.verb": "tune-trial", "mmclin.study": study_name,
                "optuna.trial_number": str(trial.number), "mmclin.host": HOST, "mmclin.pid": str(os.getpid())}
        self.client = client
        self.run_id = client.create_run(experiment_id, run_name=f"trial-{trial.number}", tags=tags).info.run_id
        batch = [Param(k, str(v)[:500]) for k, v in params.items()] + [Param("trial_number", str(trial.number))]
        client.log_batch(self.run_id, params=batch)
        self._buffer: list[Any] = []

    def sink(self, prefix: str) -> Callable[[dict[str, float], int], None]:
        from mlflow.entities import Metric

        def add(metrics: dict[str, float], step: int) -> None:
            now = int(time.time() * 1000)
            self._buffer += [Metric(f"{prefix}{k}", float(v), now, int(step)) for k, v in metrics.items()
                             if v is not None and math.isfinite(v)]

        return add

    def log(self, metrics: dict[str, float], step: int = 0) -> None:
        self.sink("")(metrics, step)

    def flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def end(self, state: TrialState, error: str | None = None) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag("mmclin.state", state_name(state))] + ([RunTag("mmclin.error", error[:4000])] if error else [])
        chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
        self.flush()
        self.client.log_batch(self.run_id, metrics=chunk, tags=tags)  # one write for the last metrics and the state
        status = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED"}.get(state, "FAILED")
        self.client.set_terminated(self.run_id, status=status)


# --- results ---------------------------------------------------------------------------------------
@dataclass
class StudyResult:
    study_name: str
    storage: str  # redacted
    metric: str
    direction: str
    n_complete: int
    n_pruned: int
    n_failed: int
    best_value: float | None
    best_params: dict[str, Any]
    best_trial: int | None
    baseline_value: float | None  # the config's own values (the enqueued first trial)
    test_metrics: dict[str, float] | None  # the refit, scored once on the test subjects
    model_dir: Path | None
    parent_run_id: str | None
    trials: pl.DataFrame
    timings: list[dict[str, Any]] = field(default_factory=list)  # this worker's trials
    refit_by_this_worker: bool = False
    seconds: float = 0.0


def trials_frame(study: optuna.Study) -> pl.DataFrame:
    """One row per trial: number, state, value, seconds, baseline / retry markers, error, params."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        secs = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        rows.append({"number": t.number, "state": state_name(t.state), "value": t.value,
                     "seconds": secs, "baseline": bool(t.user_attrs.get("mmclin.baseline", False)),
                     "retry_of": t.user_attrs.get("mmclin.retry_of"), "error": t.user_attrs.get("mmclin.error"),
                     "params": json.dumps(t.params, sort_keys=True, default=str)})
    schema = {"number": pl.Int64, "state": pl.String, "value": pl.Float64, "seconds": pl.Float64, "baseline": pl.Boolean,
              "retry_of": pl.Int64, "error": pl.String, "params": pl.String}
    return pl.DataFrame(rows, schema=schema)


def save_study_plots(study: optuna.Study, out_dir: str | Path) -> dict[str, str]:
    """Optimisation history and parameter importances (Optuna's matplotlib backend) as PNGs;
    returns ``{file: note}`` for plots that could not be drawn (e.g. one complete trial)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes = {}
    plots = {"optimization_history.png": lambda: plot_optimization_history(study),
             "param_importances.png": lambda: plot_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))}
    for name, draw in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ax = draw()
            except (ValueError, RuntimeError, ZeroDivisionError) as err:
                notes[name] = f"not drawn: {err}"
                continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
    return notes


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
            self.study.enqueue_trial(t.params, user_attrs={"mmclin.retry_of": t.number, "mmclin.retry_reason": reason})
            run_id = t.user_attrs.get("mmclin.mlflow_run_id")
            if run_id and self._client is not None:
                with contextlib.suppress(Exception):
                    self._client.set_tag(run_id, "mmclin.state", "failed")
                    self._client.set_tag(run_id, "mmclin.error", reason)
                    self._client.set_terminated(run_id, status="KILLED")
            self.echo(f"trial {t.number} failed ({reason}); its values are queued again")

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
                self.study.enqueue_trial(trial.params, user_attrs={"mmclin.retry_of": trial.number, "mmclin.retry_reason": reason})
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
            f" (retry of {attrs['mmclin.retry_of']})" if attrs.get("mmclin.retry_of") is not None else "")
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

        from mmclin.persistence import tracking
        from mmclin.interfaces.experiment import Experiment

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
                    tracking.log_fitted_model(res.fitted, res.model_dir)
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


def _baseline_value(study: optuna.Study) -> float | None:
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.user_attrs.get("mmclin.baseline"):
            return t.value
    return None


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def run_study(config: ExperimentConfig, **kwargs: Any) -> StudyResult:
    """Run (or resume, or join) the study of ``config.tune``; see :class:`StudyRunner` for the options."""
    return StudyRunner(config, **kwargs).run()


# --- listing -----------------------------------------------------------------------------------------
def list_studies(storage: str) -> pl.DataFrame:
    """One row per study in ``storage``: trials by state, best and baseline values, the refit's test metric."""
    path = _file_of(storage)
    if path is not None and not path.exists():
        raise FileNotFoundError(f"no study storage at {str(path)!r} (run `mmclin tune CONFIG` first, or pass --storage)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = open_storage(storage)
    rows = []
    for s in optuna.get_all_study_summaries(st, include_best_trial=False):
        study = optuna.load_study(study_name=s.study_name, storage=st)
        trials = study.get_trials(deepcopy=False)
        count = {state: sum(t.state == state for t in trials) for state in TrialState}
        metric = s.user_attrs.get("mmclin.metric", "")
        refit = s.user_attrs.get("mmclin.refit") or {}
        best = study.best_trial if count[TrialState.COMPLETE] and len(study.directions) == 1 else None
        rows.append({
            "study": s.study_name, "metric": metric, "direction": "/".join(d.name.lower() for d in study.directions),
            "complete": count[TrialState.COMPLETE], "pruned": count[TrialState.PRUNED], "failed": count[TrialState.FAIL],
            "running": count[TrialState.RUNNING] + count[TrialState.WAITING],
            "best_trial": best.number if best else None, "best_value": best.value if best else None,
            "baseline_value": _baseline_value(study),
            "test_value": (refit.get("test") or {}).get(metric) if refit.get("status") == "done" else None,
            "started": s.datetime_start.strftime("%Y-%m-%d %H:%M") if s.datetime_start else "",
        })
    return pl.DataFrame(rows) if rows else pl.DataFrame(schema={"study": pl.String})
