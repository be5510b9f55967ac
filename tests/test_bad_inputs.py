"""A catalogue of bad inputs: each gives a clear error (type + message naming what and where),
or is handled and said (unseen categories). Extended as encoders, adapters and verbs land."""
import datetime
import pickle

import numpy as np
import polars as pl
import pytest

from conftest import FAST
from mmclin import ModalitySpec, MultimodalClassifier, MultimodalSurvivalModel
from mmclin.training.core import FittedModel
from mmclin.training.data import fit_featurizers

T = ModalitySpec(name="clinical", kind="tabular", columns=["a", "b"])
G = ModalitySpec(name="genes", kind="genomics", columns=["g1", "g2"])

FEATURIZER_CASES = [
    ("list in tabular", pl.DataFrame({"a": [[1, 2], [3]], "b": [1.0, 2.0]}), T,
     "modality 'clinical', column 'a': tabular columns must be numeric, boolean or categorical"),
    ("date in tabular", pl.DataFrame({"a": [datetime.date(2020, 1, 1)] * 2, "b": [1.0, 2.0]}), T,
     "column 'a': .* got Date; convert it first"),
    ("string genomics", pl.DataFrame({"g1": [1.0, 2.0], "g2": ["x", "y"]}), G,
     "modality 'genes' \\(genomics\\): column 'g2' has dtype String, expected numeric"),
    ("all-null modality", pl.DataFrame({"g1": [None, None], "g2": [None, None]}, schema={"g1": pl.Float64, "g2": pl.Float64}), G,
     "modality 'genes': all of its columns .* are null in every training row"),
    ("all-null column", pl.DataFrame({"a": [None, None], "b": [1.0, 2.0]}, schema={"a": pl.Float64, "b": pl.Float64}), T,
     "modality 'clinical', column 'a': no values in the training rows"),
    ("infinite value", pl.DataFrame({"a": [1.0, float("-inf")], "b": [1.0, 2.0]}), T,
     "modality 'clinical', column 'a', row 1: value -inf is not finite"),
    ("missing column", pl.DataFrame({"a": [1.0, 2.0], "bb": [1.0, 2.0]}), T,
     "the training frame lacks columns: modality 'clinical' needs column 'b' \\(did you mean 'bb'\\?\\)"),
    ("undeclared categorical", pl.DataFrame({"a": [1.0, 2.0], "b": [1.0, 2.0]}), ModalitySpec(name="clinical", kind="tabular", columns=["a", "b"], categorical=["c"]),
     "modality 'clinical': categorical columns \\['c'\\] are not among its columns"),
]


@pytest.mark.parametrize("case,frame,spec,message", FEATURIZER_CASES, ids=[c[0] for c in FEATURIZER_CASES])
def test_featurizer_bad_input(case, frame, spec, message):
    with pytest.raises(ValueError, match=message):
        fit_featurizers(frame, [spec])


def test_constant_column_is_handled():
    frame = pl.DataFrame({"a": [5.0, 5.0, 5.0], "b": [1.0, 2.0, 3.0]})
    f = fit_featurizers(frame, [T])["clinical"]
    assert np.isfinite(f.transform(frame)[0]["numeric"].numpy()).all()


@pytest.fixture(scope="module")
def fitted_clf():
    from mmclin.datasets import make_synthetic_cohort

    c = make_synthetic_cohort(100, task="multiclass", seed=0)
    return c, MultimodalClassifier(modalities=c.modalities, **FAST).fit(c.frame, c.y)


def test_label_absent_from_training_named_in_metrics(fitted_clf):
    c, clf = fitted_clf
    y = c.y.copy()
    y[7] = 99
    with pytest.raises(ValueError, match="target at row 7 is 99, which is not one of the classes learned from the training targets"):
        clf.metrics(c.frame, y)


def test_wrong_dtype_at_predict(fitted_clf):
    c, clf = fitted_clf
    with pytest.raises(ValueError, match="column 'clinical_0': expected a numeric column as in training, got String"):
        clf.predict(c.frame.with_columns(pl.col("clinical_0").cast(pl.String)))


def test_not_a_frame_and_empty_frame(fitted_clf):
    c, clf = fitted_clf
    with pytest.raises(TypeError, match="expected a polars or pandas DataFrame with one row per subject, got ndarray"):
        clf.predict(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="the training frame has no rows"):
        MultimodalClassifier(modalities=c.modalities, **FAST).fit(c.frame.head(0), c.y[:0])


@pytest.mark.parametrize("row,value", [(3, -1.0), (5, np.nan)])
def test_survival_time_errors(row, value, boring_survival):
    y = boring_survival.y.copy()
    y["time"][row] = value
    with pytest.raises(ValueError, match=f"'time' must be finite and > 0; row {row} has {value}"):
        MultimodalSurvivalModel(modalities=boring_survival.modalities, **FAST).fit(boring_survival.frame, y)


def test_event_not_binary(boring_survival):
    y = np.rec.fromarrays([np.where(np.arange(160) == 2, 2, 1), np.ones(160)], names=["event", "time"]).view(np.ndarray)
    with pytest.raises(ValueError, match="'event' must be 0/1 or bool; row 2 has 2"):
        MultimodalSurvivalModel(modalities=boring_survival.modalities, **FAST).fit(boring_survival.frame, y)


def test_crafted_pickle_instead_of_model_is_refused(tmp_path, fitted_clf):
    c, clf = fitted_clf
    path = clf.save(tmp_path / "m")

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    (tmp_path / "m" / "model.safetensors").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError, match="model.safetensors does not match its SHA-256 in manifest.json"):
        FittedModel.load(path)
    (tmp_path / "m" / "manifest.json").unlink()  # an attacker can drop the manifest: the file is still never unpickled
    with pytest.raises(ValueError, match="not a readable safetensors file .* never unpickles model files"):
        FittedModel.load(path)
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "m" / "mmclin.json").write_text("{not json")
    with pytest.raises(ValueError, match="mmclin.json' is not valid JSON"):
        FittedModel.load(path)


@pytest.mark.parametrize("bad_row", [3, 150])
def test_experiment_errors_name_the_row_of_the_file(tmp_path, bad_row):
    """The split hands the featurizers training/test frames; their errors still name the file's row."""
    from mmclin.config import validate_config
    from mmclin.datasets import make_synthetic_cohort
    from mmclin.interfaces.experiment import Experiment

    c = make_synthetic_cohort(160, task="binary", seed=0)
    col = c.modalities[0].columns[0]
    frame = c.frame.with_columns(pl.Series("label", c.y)).with_columns(
        pl.when(pl.int_range(pl.len()) == bad_row).then(float("inf")).otherwise(pl.col(col)).alias(col))
    frame.write_parquet(tmp_path / "c.parquet")
    raw = {"name": "rows", "data": {"path": str(tmp_path / "c.parquet"), "target": ["label"],
                                    "modalities": [m.model_dump() for m in c.modalities]},
           "model": {"task": {"name": "binary"}}, "trainer": {"max_epochs": 1, "progress_bar": False, "checkpoint_every": 0},
           "tracking": {"enabled": False}}
    with pytest.raises(ValueError, match=f"modality 'clinical', column '{col}', row {bad_row}: value inf is not finite"):
        Experiment(validate_config(raw)).fit(tmp_path / "out")


def _write(frame, path, how):
    if how == "tabs":
        frame.write_csv(path, separator="\t")
    elif how == "semicolons":
        frame.write_csv(path, separator=";")
    elif how == "header only":
        frame.head(0).write_csv(path)
    else:
        frame.write_csv(path)


DATA_FILE_CASES = [
    ("header-only CSV", "header only", "binary", lambda f: f, "data file '.*c.csv' has a header but no rows"),
    ("tab-separated .csv", "tabs", "binary", lambda f: f, "its fields seem separated by tabs, not commas; name it .tsv"),
    ("semicolon CSV", "semicolons", "binary", lambda f: f, "its fields seem separated by semicolons"),
    ("label missing in the test rows", "csv", "binary",
     lambda f: f.with_columns(pl.when(pl.int_range(pl.len()) == 7).then(None).otherwise(pl.col("label")).alias("label")),
     r"target column\(s\) \['label'\] in '.*c.csv': binary target is missing at row 7"),
    ("text survival event", "csv", "cox",
     lambda f: f.with_columns(pl.when(pl.col("label") == 1).then(pl.lit("dead")).otherwise(pl.lit("alive")).alias("label"),
                              pl.lit(3.0).alias("time")),
     r"target column\(s\) \['label', 'time'\] in '.*c.csv': 'event' must be 0/1 or bool; row \d+ has '(alive|dead)'"),
]


@pytest.mark.parametrize("case,how,task,edit,message", DATA_FILE_CASES, ids=[c[0] for c in DATA_FILE_CASES])
def test_bad_data_files_fail_before_training(tmp_path, case, how, task, edit, message):
    from mmclin.config import validate_config
    from mmclin.datasets import make_synthetic_cohort
    from mmclin.interfaces.experiment import Experiment

    c = make_synthetic_cohort(60, task="binary", seed=0)
    _write(edit(c.frame.with_columns(pl.Series("label", c.y))), tmp_path / "c.csv", how)
    raw = {"name": "bad", "data": {"path": str(tmp_path / "c.csv"), "target": ["label", "time"] if task == "cox" else ["label"],
                                   "modalities": [m.model_dump() for m in c.modalities]},
           "model": {"task": {"name": task}}, "tracking": {"enabled": False}}
    with pytest.raises(ValueError, match=message):
        Experiment(validate_config(raw)).fit(tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


CLI_CASES = [
    ("data file missing", ["--data", "nothere.csv", "--output", "p.parquet"], "data file 'nothere.csv' does not exist"),
    ("output of unknown type", ["--data", "gse7390", "--output", "p.txt"], "output 'p.txt': expected a .parquet or .csv"),
    ("model is not a directory", None, "model 'nope' is neither a model directory nor an MLflow run"),
    ("unknown MLflow run", "runs:/0123456789abcdef0123456789abcdef",
     "no model of MLflow run 0123456789abcdef0123456789abcdef in 'sqlite:///.*x.db'"),
]


@pytest.mark.parametrize("case,args,message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_predict_verb_bad_arguments(tmp_path, monkeypatch, capsys, fitted_clf, case, args, message):
    """Exit status 2 and one line naming what is wrong; no traceback, no output file."""
    import re

    from mmclin.interfaces.cli import main

    monkeypatch.chdir(tmp_path)
    model = str(fitted_clf[1].save(tmp_path / "model"))
    if args is None:
        argv = ["predict", "nope", "--data", "gse7390", "--output", "p.parquet"]
    elif isinstance(args, str):
        import mlflow

        mlflow.MlflowClient(f"sqlite:///{tmp_path / 'x.db'}").search_experiments()  # a store without that run
        argv = ["predict", args, "--data", "gse7390", "--output", "p.parquet", "--tracking-uri", f"sqlite:///{tmp_path / 'x.db'}"]
    else:
        argv = ["predict", model, *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err
    assert not list(tmp_path.glob("p.*"))


@pytest.mark.parametrize("method", ["predict", "predict_proba", "score", "metrics"])
def test_unfitted_estimator_raises_not_fitted(boring_binary, method):
    from sklearn.exceptions import NotFittedError

    clf = MultimodalClassifier(modalities=boring_binary.modalities)
    args = (boring_binary.frame, boring_binary.y) if method in ("score", "metrics") else (boring_binary.frame,)
    with pytest.raises(NotFittedError):
        getattr(clf, method)(*args)


def test_binary_training_targets_of_one_class(boring_binary):
    with pytest.raises(ValueError, match=r"binary training targets hold one class only \(\[0\] in all 160 rows\)"):
        MultimodalClassifier(modalities=boring_binary.modalities, **FAST).fit(boring_binary.frame, np.zeros(160, int))


def test_devices_a_cpu_only_machine_does_not_have_are_refused(monkeypatch):
    """trainer.devices: 4 with no GPU would quietly become 4 CPU processes; device: gpu would fail deep in Lightning."""
    import torch

    from mmclin.config import TrainerConfig
    from mmclin.training.core import resolve_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"trainer.devices: 4 asks for several devices, but this machine has no GPU; "
                                         r"set trainer.device: cpu"):
        resolve_accelerator(TrainerConfig(devices=4))
    with pytest.raises(ValueError, match=r"trainer.device: 'gpu', but torch sees no GPU"):
        resolve_accelerator(TrainerConfig(device="gpu"))
    assert resolve_accelerator(TrainerConfig(device="cpu", devices=2))[0] == "cpu"  # asked for on purpose
    assert resolve_accelerator(TrainerConfig())[0] == "cpu"
