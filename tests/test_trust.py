"""Trust with patient data: no silent non-finite output, models whose parts prove they belong together,
outputs that never replace the user's data, counts that are refused instead of silently replaced."""
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from mmclin.interfaces.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "gse7390_survival.yaml"
FAST = ["--set", "trainer.max_epochs=2", "--set", "model.ensemble_size=1", "--set", "trainer.progress_bar=false",
        "--no-tracking"]


def _cohort_file(tmp_path, edit=None):
    from mmclin.datasets import load_cohort

    frame = load_cohort("gse7390").frame
    if edit is not None:
        frame = edit(frame)
    path = tmp_path / "cohort.parquet"
    frame.write_parquet(path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""name: c
data:
  path: {path}
  id_column: patient_id
  target: [event, time]
  modalities:
    - {{name: clinical, kind: tabular, columns: [age, er, grade, size]}}
model: {{task: {{name: cox}}}}
trainer: {{max_epochs: 2, progress_bar: false}}
tracking: {{enabled: false}}
""")
    return path, cfg


def test_a_value_whose_square_overflows_is_refused_naming_column_and_row(tmp_path, capsys):
    _, cfg = _cohort_file(tmp_path, lambda f: f.with_columns(
        pl.when(pl.int_range(pl.len()) == 7).then(1e300).otherwise(pl.col("age")).alias("age")))
    assert main(["fit", str(cfg), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "modality 'clinical', column 'age': values too large to standardise" in err and "1e+300" in err


def test_a_value_far_outside_training_at_predict_time_is_refused(tmp_path, capsys):
    path, cfg = _cohort_file(tmp_path)
    assert main(["fit", str(cfg), "--output-dir", str(tmp_path / "o")]) == 0
    pl.read_parquet(path).with_columns(pl.when(pl.int_range(pl.len()) == 3).then(1e30).otherwise(pl.col("age"))
                                       .alias("age")).write_parquet(tmp_path / "new.parquet")
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "o" / "c"), "--data", str(tmp_path / "new.parquet"),
                 "--output", str(tmp_path / "p.parquet")]) == 2
    err = capsys.readouterr().err
    assert "modality 'clinical', column 'age', row 3: value 1e+30 is" in err and "training standard deviations" in err
    assert not (tmp_path / "p.parquet").exists()


def test_diverging_training_stops_naming_the_epoch(capsys, tmp_path):
    assert main(["fit", str(QUICKSTART), *FAST, "--set", "trainer.learning_rate=1e8", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    # the epoch is named (the deep path starts at zero beside the linear path, so it is not always the first)
    assert re.search(r"training diverged at epoch \d+", err) and "lower trainer.learning_rate (now 1e+08)" in err
    assert not list(tmp_path.glob("*/*/model"))  # no model was saved


def test_non_finite_outputs_are_never_written(tmp_path):
    from mmclin.training.predictions import check_finite_outputs

    with pytest.raises(ValueError, match="2 row\\(s\\) of the frame got a non-finite prediction, the first at row 1"):
        check_finite_outputs(np.array([[0.1], [np.nan], [np.inf]]))
    assert check_finite_outputs(np.zeros((3, 2))).shape == (3, 2)


def test_edited_model_json_or_flipped_weight_bytes_are_refused(tmp_path):
    import json

    from mmclin.datasets import make_synthetic_cohort
    from mmclin.interfaces.estimators import MultimodalClassifier
    from mmclin.training.core import FittedModel

    c = make_synthetic_cohort(n_subjects=80, task="binary", seed=0)
    path = Path(MultimodalClassifier(modalities=c.modalities, max_epochs=1).fit(c.frame, c.y).save(tmp_path / "m"))
    FittedModel.load(path)
    meta = json.loads((path / "mmclin.json").read_text())
    name = next(iter(meta["featurizers"]))
    state = meta["featurizers"][name]
    key = "mean" if "mean" in state else next(iter(state))
    original = (path / "mmclin.json").read_text()
    state[key] = [v + 30.0 for v in state[key]] if isinstance(state[key], list) else state[key]
    (path / "mmclin.json").write_text(json.dumps(meta, indent=1))
    with pytest.raises(ValueError, match="mmclin.json does not match its SHA-256 in manifest.json"):
        FittedModel.load(path)
    (path / "mmclin.json").write_text(original)
    weights = bytearray((path / "model.safetensors").read_bytes())
    weights[-5] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(ValueError, match="model.safetensors does not match its SHA-256"):
        FittedModel.load(path)


def test_predict_never_overwrites_its_input_nor_an_existing_file_unasked(tmp_path, capsys):
    path, cfg = _cohort_file(tmp_path)
    assert main(["fit", str(cfg), "--output-dir", str(tmp_path / "o")]) == 0
    before = path.read_bytes()
    assert main(["predict", str(tmp_path / "o" / "c"), "--data", str(path), "--output", str(path)]) == 2
    assert "is the --data file" in capsys.readouterr().err and path.read_bytes() == before
    mine = tmp_path / "mine.csv"
    mine.write_text("my,own\n1,2\n")
    assert main(["predict", str(tmp_path / "o" / "c"), "--data", str(path), "--output", str(mine)]) == 2
    assert "already exists" in capsys.readouterr().err and mine.read_text() == "my,own\n1,2\n"
    assert main(["predict", str(tmp_path / "o" / "c"), "--data", str(path), "--output", str(mine), "--overwrite"]) == 0
    assert pl.read_csv(mine).height == 198
    from mmclin.persistence.outputs import run_directories

    model_dir = run_directories(tmp_path / "o" / "c")[-1] / "model"
    inside = model_dir / "preds.csv"
    assert main(["predict", str(tmp_path / "o" / "c"), "--data", str(path), "--output", str(inside)]) == 2
    assert "is inside the model directory" in capsys.readouterr().err and not inside.exists()


def test_id_column_typo_is_an_error_not_predictions_without_ids(tmp_path, capsys):
    path, cfg = _cohort_file(tmp_path)
    assert main(["fit", str(cfg), "--output-dir", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "o" / "c"), "--data", str(path), "--output", str(tmp_path / "p.parquet"),
                 "--id-column", "patient_idd"]) == 2
    assert "id column 'patient_idd' is not in the data; did you mean 'patient_id'?" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["tune", str(QUICKSTART), "--trials", "0"], "--trials: expected a whole number >= 1, got '0'"),
    (["evaluate", str(QUICKSTART), "--cv", "1"], "--cv: expected a whole number >= 2, got '1'"),
])
def test_counts_out_of_range_are_refused_not_replaced(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_duplicated_yaml_key_is_refused_naming_key_and_lines(tmp_path):
    from mmclin.config import ConfigError, load_config

    cfg = tmp_path / "dup.yaml"
    cfg.write_text("name: a\ndata: {cohort: gse7390}\ntrainer:\n  max_epochs: 3\n  max_epochs: 30\n")
    with pytest.raises(ConfigError, match="key 'max_epochs' appears twice .*lines 4 and 5"):
        load_config(cfg)


def test_too_few_training_rows_is_an_error_not_an_untrained_model():
    from mmclin.datasets import make_synthetic_cohort
    from mmclin.interfaces.estimators import MultimodalRegressor

    c = make_synthetic_cohort(n_subjects=40, task="regression", seed=0)
    with pytest.raises(ValueError, match="only 1 training row\\(s\\) left after the validation carve-out"):
        MultimodalRegressor(modalities=c.modalities, max_epochs=1).fit(c.frame[:1], c.y[:1])


def test_csv_coercions_are_refused_or_kept_as_written(tmp_path):
    from mmclin.interfaces.experiment import read_table, targets_from_frame

    na = tmp_path / "na.csv"
    na.write_text("id,age\n0001,50\n0002,NA\n0003,61\n0004,70\n0005,48\n0006,55\n")
    with pytest.raises(ValueError, match="column 'age': numbers, but 1 cell\\(s\\) hold the word 'NA' \\(first at row 1\\)"
                                         ".*data.null_values: \\['NA'\\]"):
        read_table(na)
    frame = read_table(na, ["id"], ["NA"])
    assert frame["id"].to_list()[:2] == ["0001", "0002"] and frame["age"].dtype == pl.Int64 and frame["age"][1] is None
    dup = tmp_path / "dup.csv"
    dup.write_text("id,age,age\n1,2,3\n")
    with pytest.raises(ValueError, match="the header names column 'age' twice \\(the second time as field 3\\)"):
        read_table(dup)
    import datetime

    dated = pl.DataFrame({"event": [1, 0], "time": [datetime.date(2020, 1, 1), datetime.date(2021, 1, 1)]})
    with pytest.raises(ValueError, match="target time column 'time' holds dates"):
        targets_from_frame(dated, ["event", "time"], "survival")


def test_null_or_repeated_ids_at_predict_time_are_not_passed_silently(tmp_path, caplog):
    from mmclin.datasets import make_synthetic_cohort
    from mmclin.interfaces.estimators import MultimodalClassifier
    from mmclin.training.predictions import prediction_frame

    c = make_synthetic_cohort(n_subjects=80, task="binary", seed=0)
    fitted = MultimodalClassifier(modalities=c.modalities, max_epochs=1).fit(c.frame, c.y).model_
    ids = c.frame[c.id_column]
    with pytest.raises(ValueError, match=f"id column {c.id_column!r} is null in 1 row\\(s\\), the first at row 2"):
        prediction_frame(fitted, c.frame.with_columns(ids.scatter(2, None)), c.id_column)
    caplog.set_level("WARNING", logger="mmclin")
    out = prediction_frame(fitted, pl.concat([c.frame.head(3), c.frame.head(2)]), c.id_column)
    assert out.height == 5 and "2 row(s) repeat an earlier row's id" in caplog.text
