"""--tracking-uri pointed at a real MLflow server (started on loopback for this test)."""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mmclin.interfaces.cli import main

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "gse7390_survival.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "art"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("MLflow server did not become healthy within 90 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_fit_logs_to_a_server(mlflow_server, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    args = ["fit", str(QUICKSTART), "--set", "trainer.max_epochs=2", "--set", "model.ensemble_size=1",
            "--set", "trainer.progress_bar=false", "--tracking-uri", mlflow_server, "--output-dir", str(tmp_path / "o")]
    assert main(args) == 0
    client = mlflow.MlflowClient(mlflow_server)
    run = client.search_runs([client.get_experiment_by_name("gse7390_survival").experiment_id])[0]
    assert "test_c_index" in run.data.metrics
    assert "model" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert not (tmp_path / "mlruns.db").exists()  # nothing went to the embedded store
