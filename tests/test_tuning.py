"""Optuna studies (mmclin.interfaces.studies): the tune section, the search space, pruning, MLflow
nesting, kill-and-resume, and two workers on a real PostgreSQL server."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from mmclin.interfaces.cli import main
from mmclin.config import ConfigError, load_config, validate_config
from mmclin.interfaces.studies import (
    SearchSpace, StudyLock, StudyRunner, epoch_metric_pruning, lease_alive, list_studies, make_sampler, open_storage,
    retry_of, worker_lease,
)

SPACE = {
    "model.fusion.name": {"type": "categorical", "choices": ["concat", "late"]},
    # exists only for the concat head in these tests: removed from the config when 'late' is drawn
    "model.fusion.n_layers": {"type": "int", "low": 1, "high": 2, "when": {"model.fusion.name": "concat"}},
    "trainer.learning_rate": {"type": "float", "low": 0.001, "high": 0.03, "log": True},
}


def small_config(tmp_path: Path, tracking: bool = True, **tune: object) -> dict:
    """GSE7390 (198 real patients), one small network, a few epochs: a trial takes about a second."""
    return {
        "name": "tiny", "output_dir": str(tmp_path / "out"), "data": {"cohort": "gse7390", "test_size": 0.25},
        "model": {"task": {"name": "cox"}, "fusion": {"name": "concat", "d_model": 16, "n_layers": 1},
                  "encoders": {"clinical": {"d_model": 8, "n_layers": 0}, "genes": {"d_model": 16, "n_layers": 1}}},
        "trainer": {"max_epochs": 6, "batch_size": 256, "patience": None, "progress_bar": False, "seed": 0},
        "tracking": {"enabled": tracking, "uri": f"sqlite:///{tmp_path / 'mlruns.db'}", "experiment": "tiny"},
        "tune": {"n_trials": 4, "cv": 2, "sampler": {"name": "tpe", "n_startup_trials": 2},
                 "pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_epochs": 2}, "space": SPACE, **tune},
    }


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, made once: each test copies it instead of running MLflow's migrations."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlruns.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlruns(tmp_path, mlflow_template) -> Path:
    shutil.copy(mlflow_template, tmp_path / "mlruns.db")
    return tmp_path / "mlruns.db"


def write_yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# --- the tune section ----------------------------------------------------------------------------
@pytest.mark.parametrize("param,message", [
    ({"type": "categorical"}, "needs a non-empty 'choices'"),
    ({"type": "float", "low": 1.0, "high": 0.1}, "must not exceed 'high'"),
    ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, "log-scale parameter needs low > 0"),
    ({"type": "int", "low": 1, "high": 4.5}, "whole-number"),
    ({"type": "float", "low": 0.1, "high": 1.0, "log": True, "step": 0.1}, "cannot be combined"),
    ({"type": "int", "choices": [1, 2]}, "not 'choices'"),
    ({"type": "categorical", "choices": [[1, 2]]}, "must be scalars"),
])
def test_bad_search_parameters_name_the_key(tmp_path, param, message):
    raw = small_config(tmp_path)
    raw["tune"]["space"] = {"trainer.learning_rate": param}
    with pytest.raises(ConfigError) as err:
        validate_config(raw)
    assert "tune.space.trainer.learning_rate" in str(err.value) and message in str(err.value)


def test_space_keys_data_keys_order_of_conditions_and_unknown_tune_keys(tmp_path):
    raw = small_config(tmp_path)
    raw["tune"]["space"] = {"data.test_size": {"type": "float", "low": 0.1, "high": 0.3}}
    with pytest.raises(ConfigError, match="only model.\\* and trainer.\\* keys can be tuned"):
        validate_config(raw)
    raw["tune"]["space"] = {"model.fusion.n_layers": {"type": "int", "low": 1, "high": 2, "when": {"model.fusion.name": "concat"}},
                            "model.fusion.name": {"type": "categorical", "choices": ["concat", "late"]}}
    with pytest.raises(ConfigError, match="comes later in the space; declare 'model.fusion.name' first"):
        validate_config(raw)
    raw = small_config(tmp_path)
    raw["tune"]["trails"] = 3
    with pytest.raises(ConfigError, match="tune.trails: unknown key"):
        validate_config(raw)
    assert validate_config(small_config(tmp_path)).tune.space["model.fusion.n_layers"].when == {"model.fusion.name": "concat"}


def test_conditional_keys_are_sampled_only_when_their_condition_holds_and_removed_otherwise(tmp_path):
    cfg = validate_config(small_config(tmp_path))
    space, base = SearchSpace(cfg.tune.space), cfg.model_dump(mode="json")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    seen = set()
    for _ in range(20):
        trial = study.ask()
        values, removed = space.suggest(trial, base)
        trial_cfg = space.apply(cfg, values, removed)
        head = values["model.fusion.name"]
        seen.add(head)
        assert ("model.fusion.n_layers" in values) == (head == "concat") == ("model.fusion.n_layers" not in removed)
        assert trial_cfg.model.fusion.name == head and not trial_cfg.tracking.enabled
        assert ("n_layers" in trial_cfg.model.fusion.options) == (head == "concat")  # the base's n_layers: 1 is gone for 'late'
        assert 0.001 <= trial_cfg.trainer.learning_rate <= 0.03
        study.tell(trial, 0.5)
    assert seen == {"concat", "late"}
    # the config's own values as the baseline trial; a value outside the space means no baseline
    assert space.base_params(base) == ({"model.fusion.name": "concat", "model.fusion.n_layers": 1, "trainer.learning_rate": 0.001}, [])
    base["trainer"]["learning_rate"] = 0.5
    assert space.base_params(base) == (None, ["trainer.learning_rate"])


def test_per_trial_seeds_reproduce_a_trial_and_differ_between_trials():
    def draw(sampler, number):
        study = optuna.create_study(sampler=sampler)
        for _ in range(number):  # earlier trials exist, so this one gets `number`
            study.enqueue_trial({"x": 0.5})
            t = study.ask()
            t.suggest_float("x", 0, 1)
            study.tell(t, 0.0)
        trial = study.ask()
        return trial.number, trial.suggest_float("x", 0, 1)

    from mmclin.config import ComponentConfig

    tpe = ComponentConfig(name="tpe", n_startup_trials=10)
    assert draw(make_sampler(tpe, 7), 2) == draw(make_sampler(tpe, 7), 2)
    assert draw(make_sampler(tpe, 7), 2)[1] != draw(make_sampler(tpe, 7), 3)[1]
    with pytest.raises(ConfigError, match="unknown sampler 'tpee'"):
        make_sampler(ComponentConfig(name="tpee"), 0)


def test_preflight_names_the_key_an_option_a_head_does_not_take(tmp_path):
    raw = small_config(tmp_path, tracking=False)
    raw["tune"]["space"] = {**SPACE, "model.fusion.n_heads": {"type": "int", "low": 1, "high": 4}}
    with pytest.raises(ConfigError, match=r"tune.space\['model.fusion.n_heads'\] = 1: model.fusion \(fusion head 'concat'\): unknown option 'n_heads'"):
        StudyRunner(validate_config(raw), storage=f"sqlite:///{tmp_path / 'o.db'}").setup()
    raw = small_config(tmp_path, tracking=False, metric="cindex")
    with pytest.raises(ConfigError, match="'cindex' is not a metric of task 'cox'; choose one of .*'c_index'"):
        StudyRunner(validate_config(raw), storage=f"sqlite:///{tmp_path / 'o.db'}").setup()
    raw = small_config(tmp_path, tracking=False, metric="integrated_brier")
    with pytest.raises(ConfigError, match="tune.direction is needed for metric 'integrated_brier'"):
        StudyRunner(validate_config(raw), storage=f"sqlite:///{tmp_path / 'o.db'}").setup()
    raw = small_config(tmp_path, tracking=False)
    del raw["tune"]
    with pytest.raises(ConfigError, match="no 'tune' section"):
        StudyRunner(validate_config(raw))


def test_pruning_callback_reports_the_first_member_per_epoch_and_stops_the_fit(tmp_path):
    """Steps are offset per fold, warm-up epochs are not reported, a second ensemble member
    reports nothing (no duplicated steps), and a pruned trial stops the fit."""
    from mmclin.datasets import load_cohort
    from mmclin.training.core import build_task, fit_model
    from mmclin.interfaces.studies.pruning import _Timer, score_computes_metric

    class Trial:
        def __init__(self, prune_at=None):
            self.reports, self.prune_at = [], prune_at

        def report(self, value, step):
            self.reports.append((step, value))

        def should_prune(self):
            return self.prune_at is not None and self.reports[-1][0] >= self.prune_at

    c = load_cohort("gse7390")
    cfg = validate_config(small_config(tmp_path, tracking=False))
    tr, va = np.arange(0, 140), np.arange(140, 198)
    common = dict(frame_train=c.frame[tr], y_train=c.y[tr], frame_eval=c.frame[va], y_eval=c.y[va], specs=c.modalities,
                  metric="c_index", step_offset=100, timer=_Timer(), use_score=True)
    sunk, trial = [], Trial()
    cb = epoch_metric_pruning(trial=trial, warmup=1, sink=lambda m, e: sunk.append((e, m)), **common)
    model = cfg.model.model_copy(update={"ensemble_size": 2})
    fit_model(c.frame[tr], c.y[tr], c.modalities, model, cfg.trainer, cfg.model.task, extra_callbacks=[cb])
    assert cb.fits == 2 and [s for s, _ in trial.reports] == [101, 102, 103, 104, 105]
    assert [e for e, _ in sunk] == [0, 1, 2, 3, 4, 5] and all(0 <= v <= 1 for _, v in trial.reports)
    trial = Trial(prune_at=103)
    cb = epoch_metric_pruning(trial=trial, warmup=0, sink=None, **common)
    with pytest.raises(optuna.TrialPruned, match=r"pruned at step 103 \(epoch 3\): c_index="):
        fit_model(c.frame[tr], c.y[tr], c.modalities, cfg.model, cfg.trainer, cfg.model.task, extra_callbacks=[cb])
    assert [s for s, _ in trial.reports] == [100, 101, 102, 103]
    # per epoch, task.score stands in for metrics()[metric] only where the two agree
    task = build_task(cfg.model.task)
    task.fit_targets(c.y[tr])
    assert score_computes_metric(task, "c_index", c.y[va]) and not score_computes_metric(task, "uno_c", c.y[va])


def test_study_lock_excludes_another_process_and_leases_tell_dead_from_alive(tmp_path):
    lock = StudyLock(f"sqlite:///{tmp_path / 's.db'}", "x")
    probe = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR)\n"
             "try:\n    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\n"
             "except OSError:\n    print('held')")
    path = str(tmp_path / "s.db.mmclin-lock")
    with lock.hold():
        assert subprocess.run([sys.executable, "-c", probe, path], capture_output=True, text=True).stdout.strip() == "held"
    assert subprocess.run([sys.executable, "-c", probe, path], capture_output=True, text=True).stdout.strip() == "free"
    lock.close()
    me = worker_lease()
    assert lease_alive(me, 0, stale_after=1)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert not lease_alive({**me, "pid": gone.pid, "start": None}, time.time(), stale_after=1000)
    other_host = {**me, "host": "elsewhere"}
    assert lease_alive(other_host, time.time() - 10, stale_after=60) and not lease_alive(other_host, time.time() - 100, stale_after=60)


# --- a whole study, in process --------------------------------------------------------------------
@pytest.mark.slow
def test_study_runs_nested_mlflow_runs_refits_once_and_never_sees_test_subjects(tmp_path, mlruns, monkeypatch, capsys):
    import mlflow

    monkeypatch.chdir(tmp_path)
    # a pruned trial by design, not by luck: the baseline trial (the config's own values) learns fastest (the top
    # of the learning-rate range), and a trial is pruned once it falls below the best finished trial at an epoch
    # (percentile 1 keeps the top 1%); trials with a 30x smaller rate are ~0.08 C behind after a few epochs
    raw = small_config(tmp_path, pruner={"name": "percentile", "percentile": 1.0, "n_startup_trials": 1, "n_warmup_epochs": 1})
    raw["trainer"]["learning_rate"] = 0.03
    cfg_path = write_yaml(tmp_path / "tiny.yaml", raw)
    assert main(["tune", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert "refit: test metrics" in out and "config's own values (baseline trial), CV" in out
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'optuna.db'}")  # beside mlruns.db
    trials = study.get_trials()
    states = [t.state for t in trials]
    assert len(trials) == 4 and states.count(TrialState.FAIL) == 0 and TrialState.PRUNED in states
    assert trials[0].user_attrs["mmclin.baseline"] and trials[0].params == {
        "model.fusion.name": "concat", "model.fusion.n_layers": 1, "trainer.learning_rate": 0.03}
    # the folds never contain a test subject; the refit scored exactly the test subjects
    runner = StudyRunner(load_config(cfg_path, ["tracking.enabled=false"]), storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                         echo=None).setup()
    fold_rows = np.concatenate([np.concatenate(f) for f in runner.folds])
    assert not set(fold_rows) & set(runner.test_idx) and set(fold_rows) == set(runner.train_idx)
    import polars as pl

    from mmclin.persistence.outputs import run_directories

    preds = pl.read_parquet(run_directories(tmp_path / "out" / "tiny")[-1] / "test_predictions.parquet")
    assert sorted(preds["patient_id"].to_list()) == sorted(runner.cohort.frame["patient_id"][runner.test_idx].to_list())
    # MLflow: one parent, one nested run per trial with params, per-epoch metrics and its state
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parent = [r for r in runs if r.data.tags.get("mmclin.verb") == "tune"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    parent = parent[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == [0, 1, 2, 3]
    for r in children:
        t = trials[int(r.data.tags["optuna.trial_number"])]
        state = t.state.name.lower()
        assert r.data.tags["mmclin.state"] == state and r.info.status == {"complete": "FINISHED", "pruned": "KILLED"}[state]
        assert r.data.params["model.fusion.name"] == t.params["model.fusion.name"]
        epochs = 2 if state == "complete" else 1  # per epoch; a pruned trial may stop after its first
        assert len(client.get_metric_history(r.info.run_id, "fold0_train_loss")) >= epochs
        assert len(client.get_metric_history(r.info.run_id, "fold0_val_c_index")) >= epochs
        if state == "complete":
            assert r.data.metrics["objective"] == pytest.approx(t.value)
    best = study.best_trial
    assert parent.data.metrics["best_cv_c_index"] == pytest.approx(best.value) and "test_c_index" in parent.data.metrics
    assert parent.data.tags["best.model.fusion.name"] == best.params["model.fusion.name"]
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    assert {"study/optimization_history.png", "study/param_importances.png", "study/best_config.yaml", "study/trials.parquet"} <= arts
    assert {"model", "test_predictions.parquet"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    served = mlflow.pyfunc.load_model(f"runs:/{parent.info.run_id}/pyfunc_model").predict(runner.cohort.frame.head(3).to_pandas())
    assert list(served.columns) == ["patient_id", "risk"] and len(served) == 3  # the refit model, served by MLflow
    # the best config is a plain experiment config: `mmclin fit` takes it
    best_cfg = load_config(tmp_path / "out" / "tiny" / "study" / "best_config.yaml")
    assert best_cfg.model.fusion.name == best.params["model.fusion.name"] and best_cfg.tune is None
    # the same command again: the study is full, nothing runs, nothing is refit twice
    assert main(["tune", str(cfg_path)]) == 0
    again = capsys.readouterr().out
    assert len(study.get_trials()) == 4 and "refit (done earlier)" in again and "refitting" not in again
    assert main(["studies", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}"]) == 0
    listed = capsys.readouterr().out
    assert "tiny" in listed and f"{sum(s == TrialState.COMPLETE for s in states)}/{states.count(TrialState.PRUNED)}/0/0" in listed
    frame = list_studies(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert frame["best_value"][0] == pytest.approx(best.value) and frame["test_value"][0] == pytest.approx(parent.data.metrics["test_c_index"])
    # resuming with another search space is refused, naming what differs
    raw["tune"]["space"]["trainer.learning_rate"]["high"] = 0.1
    assert main(["tune", str(write_yaml(tmp_path / "changed.yaml", raw))]) == 2
    assert "differs in ['tune.space.trainer.learning_rate.high']" in capsys.readouterr().err


def test_journal_file_storage_and_no_tracking(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = small_config(tmp_path, tracking=False, n_trials=2, pruner={"name": "none"})
    res = StudyRunner(validate_config(raw), storage="journal:///studies/optuna.journal", refit=False, echo=None).run()
    assert (tmp_path / "studies" / "optuna.journal").exists() and res.parent_run_id is None and res.test_metrics is None
    assert res.n_complete == 2 and len(res.timings) == 2 and all(t["overhead_seconds"] >= 0 for t in res.timings)
    assert list_studies("journal:///studies/optuna.journal")["complete"].to_list() == [2]
    with pytest.raises(FileNotFoundError, match="no study storage at"):
        list_studies("journal:///nope.journal")


# --- a killed study resumes -------------------------------------------------------------------------
@pytest.mark.slow
def test_killed_study_resumes_with_the_same_command(tmp_path, mlruns, monkeypatch):
    """SIGKILL a worker in the middle of a trial; the same command finishes the study: its
    interrupted trial is failed and retried, no trial number or MLflow run is duplicated."""
    import mlflow

    raw = small_config(tmp_path, n_trials=4, pruner={"name": "none"})
    raw["trainer"]["max_epochs"] = 100  # a trial lasts a few seconds, long enough to be caught running
    raw["tracking"]["log_model"] = False  # the parent run's model is checked in the in-process study test
    cfg_path = write_yaml(tmp_path / "tiny.yaml", raw)
    cmd = ["tune", str(cfg_path)]
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc = subprocess.Popen([sys.executable, "-m", "mmclin.interfaces.cli", *cmd], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline, killed_trial = time.time() + 180, None
    while time.time() < deadline and killed_trial is None:
        time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        try:
            trials = optuna.load_study(study_name="tiny", storage=storage).get_trials(deepcopy=False)
        except Exception:  # not created yet
            continue
        running = [t for t in trials if t.state == TrialState.RUNNING and "mmclin.mlflow_run_id" in t.user_attrs]
        if sum(t.state == TrialState.COMPLETE for t in trials) >= 1 and running:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            # The trial seen running may have finished between that read and the kill: the killed
            # trial is the one the storage still holds as running once the worker is dead.
            after = optuna.load_study(study_name="tiny", storage=storage).get_trials(deepcopy=False)
            still = [t for t in after if t.state == TrialState.RUNNING and "mmclin.mlflow_run_id" in t.user_attrs]
            if not still:  # every trial had ended; start the worker again and catch the next one
                proc = subprocess.Popen([sys.executable, "-m", "mmclin.interfaces.cli", *cmd], cwd=tmp_path,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                continue
            killed_trial = still[0]
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)
    assert killed_trial is not None, "the study never reached a running second trial"
    monkeypatch.chdir(tmp_path)
    assert main(cmd) == 0  # resume: the same command
    trials = optuna.load_study(study_name="tiny", storage=storage).get_trials()
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    assert len(by_state[TrialState.COMPLETE]) == 4 and not by_state[TrialState.RUNNING] and not by_state[TrialState.WAITING]
    assert [t.number for t in by_state[TrialState.FAIL]] == [killed_trial.number]
    retry = [t for t in trials if retry_of(t) == killed_trial.number]
    assert len(retry) == 1 and retry[0].params == killed_trial.params and retry[0].state == TrialState.COMPLETE
    assert [t.number for t in trials] == list(range(5))
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], max_results=100)
    numbers = sorted(int(r.data.tags["optuna.trial_number"]) for r in runs if "optuna.trial_number" in r.data.tags)
    assert numbers == list(range(5))  # one MLflow run per trial, none twice
    killed_run = client.get_run(killed_trial.user_attrs["mmclin.mlflow_run_id"])
    assert killed_run.info.status == "KILLED" and "interrupted" in killed_run.data.tags["mmclin.error"]
    parents = [r for r in runs if r.data.tags.get("mmclin.verb") == "tune"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and "test_c_index" in parents[0].data.metrics


# --- two workers, one PostgreSQL study ---------------------------------------------------------------
@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server on loopback (Debian's `postgresql` package)."""
    from mmclin.testing.postgres import local_postgres, postgres_bindir

    if postgres_bindir() is None:
        reason = "PostgreSQL server binaries (initdb, pg_ctl) are not installed; `apt-get install postgresql` (.ci/run does)"
        print(f"\nSKIPPED the PostgreSQL tests: {reason}")
        pytest.skip(reason)
    with local_postgres(["optuna"]) as url:
        yield url


@pytest.mark.slow
def test_two_workers_share_one_postgresql_study(postgres, tmp_path, mlruns):
    import mlflow

    optuna_url, mlflow_url = f"{postgres}/optuna", f"sqlite:///{mlruns}"
    raw = small_config(tmp_path, n_trials=8, pruner={"name": "none"}, sampler={"name": "tpe", "n_startup_trials": 4, "seed": 3})
    raw["trainer"]["max_epochs"] = 4
    raw["tracking"]["log_model"] = False
    cfg_path = write_yaml(tmp_path / "tiny.yaml", raw)
    cmd = [sys.executable, "-m", "mmclin.interfaces.cli", "tune", str(cfg_path), "--storage", optuna_url, "--study", "shared",
           "--tracking-uri", mlflow_url]
    # hold the study lock until both workers wait for it: they then start together, whatever their import times
    import psycopg

    lock = StudyLock(optuna_url, "shared")
    with lock.hold(), psycopg.connect(optuna_url, autocommit=True) as conn:
        workers = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                   for _ in range(2)]
        deadline = time.time() + 120
        while conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted").fetchone()[0] < 2:
            assert time.time() < deadline and all(w.poll() is None for w in workers), "workers never reached the study lock"
            time.sleep(0.1)
    lock.close()
    outs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-3000:] for o in outs)
    trials = optuna.load_study(study_name="shared", storage=optuna_url).get_trials()
    assert [t.number for t in trials] == list(range(8))  # nothing lost, nothing duplicated
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 8  # one shared seed, yet no repeated draws
    pids = {t.user_attrs["mmclin.worker"]["pid"] for t in trials}
    assert pids == {w.pid for w in workers}, "both workers must have run trials"
    assert sum("refitting trial" in o for o in outs) == 1  # exactly one worker refits
    client = mlflow.MlflowClient(mlflow_url)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("mmclin.verb") == "tune"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and "test_c_index" in parents[0].data.metrics
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == list(range(8))
    assert list_studies(optuna_url).filter(study="shared")["complete"].to_list() == [8]
    # a wrong password in the URL never reaches logs or errors
    with pytest.raises(ValueError) as err:
        open_storage(optuna_url.replace("mmclin@", "mmclin:s3cret@").replace("/optuna", "/nodb"))
    assert "s3cret" not in str(err.value) and "***" in str(err.value)
