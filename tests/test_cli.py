"""The CLI end to end: fit (tracked in a real SQLite MLflow store), evaluate --cv, predict, cohorts."""
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from mmclin.interfaces.cli import main
from mmclin.persistence.outputs import newest_finished_model, run_directories

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "gse7390_survival.yaml"
FAST = ["--set", "trainer.max_epochs=3", "--set", "model.ensemble_size=1", "--set", "trainer.progress_bar=false"]


def test_help_is_fast_and_does_not_import_torch():
    code = "import sys; from mmclin.interfaces.cli import build_parser; build_parser().format_help(); assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "mmclin.interfaces.cli", "--help"], capture_output=True, text=True, check=True)
    assert "fit" in out.stdout and "evaluate" in out.stdout


@pytest.mark.slow
def test_fit_tracks_run_and_model_then_predict(tmp_path, monkeypatch, capsys):
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert main(["fit", str(QUICKSTART), *FAST, "--tracking-uri", uri, "--output-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "c_index" in out and "MLflow run" in out
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("gse7390_survival")
    run = client.search_runs([exp.experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert {"test_c_index", "test_uno_c", "test_integrated_brier", "train_loss", "val_loss"} <= set(run.data.metrics)
    assert run.data.params["model.fusion.name"] == "concat"
    assert run.data.tags["version.torch"].startswith("2.13") and len(run.data.tags["data.sha256"]) == 64
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 3  # per-epoch
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "model", "test_predictions.parquet"} <= artifacts
    # patient data stays out of artifacts: predictions carry ids and outputs only, no input example
    assert not [a for a in client.list_artifacts(run.info.run_id, "pyfunc_model") if "input_example" in a.path]
    preds_file = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="test_predictions.parquet", tracking_uri=uri)
    assert pl.read_parquet(preds_file).columns == ["patient_id", "risk"]
    # the pyfunc model predicts from a frame
    from mmclin.datasets import load_cohort

    frame = load_cohort("gse7390").frame.head(5).to_pandas()
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/pyfunc_model")
    preds = pyfunc.predict(frame)
    assert list(preds.columns) == ["patient_id", "risk"] and len(preds) == 5
    # predict from the model directory and from the run
    model_dir = newest_finished_model(tmp_path / "out" / "gse7390_survival")
    assert main(["predict", str(model_dir), "--data", "gse7390", "--output", str(tmp_path / "p.csv")]) == 0
    p = pl.read_csv(tmp_path / "p.csv")
    assert p.columns == ["patient_id", "risk"] and p.height == 198
    assert main(["predict", f"runs:/{run.info.run_id}", "--tracking-uri", uri, "--data", "gse7390", "--output", str(tmp_path / "p.parquet")]) == 0
    assert pl.read_parquet(tmp_path / "p.parquet")["risk"].to_list() == pytest.approx(p["risk"].to_list(), rel=1e-5)


def test_evaluate_cv_patient_level_folds(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", str(QUICKSTART), "--cv", "3", *FAST, "--no-tracking"]) == 0
    out = capsys.readouterr().out
    assert "mean over 3 fold(s)" in out and "c_index" in out


def test_bad_override_and_bad_file_give_clear_errors(tmp_path, capsys):
    assert main(["fit", str(QUICKSTART), "--set", "model.fusion.name=concatt", "--no-tracking"]) == 2
    assert "Did you mean 'concat'" in capsys.readouterr().err
    assert main(["fit", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_fit_from_user_file(tmp_path, monkeypatch):
    """data.path: a user's own one-row-per-subject parquet file."""
    from mmclin.datasets import make_synthetic_cohort

    monkeypatch.chdir(tmp_path)
    c = make_synthetic_cohort(n_subjects=120, task="binary", seed=0)
    c.frame.write_parquet(tmp_path / "cohort.parquet")
    cfg = tmp_path / "exp.yaml"
    mods = "\n".join(f"    - {{name: {m.name}, kind: {m.kind}, columns: {m.columns}}}" for m in c.modalities)
    cfg.write_text(f"""name: user
data:
  path: {tmp_path / 'cohort.parquet'}
  id_column: {c.id_column}
  target: [label]
  modalities:
{mods}
model:
  task: {{name: binary}}
trainer: {{max_epochs: 2, progress_bar: false}}
tracking: {{enabled: false}}
""")
    assert main(["fit", str(cfg), "--output-dir", str(tmp_path / "o")]) == 0
    preds = pl.read_parquet(run_directories(tmp_path / "o" / "user")[-1] / "test_predictions.parquet")
    assert preds.columns[0] == c.id_column and "prediction" in preds.columns


def test_cohorts_lists_builtins(capsys):
    assert main(["cohorts"]) == 0
    assert "gse7390" in capsys.readouterr().out


@pytest.mark.slow
def test_multitask_from_file_and_cv_predictions(tmp_path, monkeypatch):
    """A binary + regression multitask config over a user's file; evaluate logs out-of-fold predictions."""
    import mlflow
    import numpy as np

    from mmclin.datasets import make_synthetic_cohort
    from mmclin.interfaces.experiment import Experiment

    monkeypatch.chdir(tmp_path)
    c = make_synthetic_cohort(n_subjects=150, task="binary", seed=0)
    rng = np.random.default_rng(0)
    los = [None if u < 0.2 else float(v) for u, v in zip(rng.random(150), rng.gamma(2.0, 3.0, 150))]  # unknown stays: masked, not imputed
    c.frame.with_columns(pl.Series("los", los, dtype=pl.Float64)).write_parquet(tmp_path / "cohort.parquet")
    mods = [m.model_dump() for m in c.modalities]
    raw = {"name": "mt", "data": {"path": str(tmp_path / "cohort.parquet"), "id_column": c.id_column,
                                  "target": ["label", "los"], "modalities": mods},
           "model": {"task": {"name": "multitask", "tasks": {"label": {"name": "binary"}, "los": {"name": "regression"}}}},
           "trainer": {"max_epochs": 2, "progress_bar": False},
           "tracking": {"uri": f"sqlite:///{tmp_path / 'm.db'}", "experiment": "mt"}}
    from mmclin.config import validate_config

    res = Experiment(validate_config(raw)).evaluate(cv=2)
    assert {"label/auroc", "los/mae"} <= set(res.summary["metric"].to_list())
    assert res.predictions.height == 150
    assert [c for c in res.predictions.columns if "/" in c] == ["label/proba_0", "label/proba_1", "label/prediction", "los/prediction"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    assert "cv_predictions.parquet" in {a.path for a in client.list_artifacts(res.run_id)}


def test_builtin_cohort_without_model_task_takes_the_cohorts_default_task():
    """A config naming only the cohort (as benchmarks/cohorts_vs_baselines.py writes it) gets the
    cohort's default task; the id-column check used to ask for the task, which loaded the cohort again."""
    from mmclin.config import validate_config
    from mmclin.interfaces.experiment import Experiment

    exp = Experiment(validate_config({"name": "v", "data": {"cohort": "veterans"}, "tracking": {"enabled": False}}))
    assert exp.task_config().name == "cox" and exp.cohort.id_column and exp.cohort.frame.height == 137
