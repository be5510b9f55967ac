"""Interrupted runs never stay RUNNING in MLflow: SIGTERM ends them FAILED, SIGKILL is found and marked KILLED."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "gse7390_survival.yaml"


def _start_fit(tmp_path, uri):
    args = [sys.executable, "-m", "mmclin.interfaces.cli", "fit", str(QUICKSTART), "--tracking-uri", uri,
            "--set", "trainer.max_epochs=100000", "--set", "trainer.patience=null", "--set", "model.ensemble_size=1",
            "--set", "trainer.progress_bar=false", "--output-dir", str(tmp_path / "o")]
    return subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for_run(uri, timeout=90):
    client = mlflow.MlflowClient(uri)
    deadline = time.time() + timeout
    while time.time() < deadline:
        exp = client.get_experiment_by_name("gse7390_survival")
        if exp is not None:
            runs = client.search_runs([exp.experiment_id])
            if runs and client.get_metric_history(runs[0].info.run_id, "train_loss"):
                return client, exp, runs[0]
        time.sleep(0.5)
    pytest.fail("the fit never started logging")


@pytest.mark.slow
@pytest.mark.parametrize("sig,expected", [(signal.SIGTERM, "FAILED"), (signal.SIGKILL, "KILLED")])
def test_killed_fit_is_not_left_running(tmp_path, sig, expected):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    proc = _start_fit(tmp_path, uri)
    client, exp, run = _wait_for_run(uri)
    os.kill(proc.pid, sig)
    proc.wait(timeout=60)
    if sig == signal.SIGKILL:
        assert client.get_run(run.info.run_id).info.status == "RUNNING"  # nobody could mark it
        from mmclin.persistence.tracking import mark_dead_runs_killed

        mlflow.set_tracking_uri(uri)
        assert mark_dead_runs_killed(exp.experiment_id) == [run.info.run_id]  # done at every new run's start
    assert client.get_run(run.info.run_id).info.status == expected
    assert not list((tmp_path / "o" / "gse7390_survival").glob("*/model"))  # no model from an unfinished run
