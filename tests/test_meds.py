"""MEDS datasets in, ACES labels with many prediction times per subject, MEDS-evaluation predictions out."""
from __future__ import annotations

import datetime as dt
import json
import logging

import numpy as np
import polars as pl
import pytest

from conftest import requires
from mmclin import MultimodalClassifier
from mmclin.datasets.meds import (meds_predictions_frame, meds_split_indices, read_meds, read_meds_labels,
                                  write_meds_predictions)
from mmclin.training.splits import cv_splits

T0 = dt.datetime(2150, 1, 1)
SCHEMA = {"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float32,
          "text_value": pl.String}
SERIES = {"labs": ["LAB//"], "vitals": ["VITAL//"]}


def _h(hours: float) -> dt.datetime:
    return T0 + dt.timedelta(hours=float(hours))


def make_meds(root, n_subjects: int = 40, seed: int = 0, leak: bool = False) -> pl.DataFrame:
    """A small MEDS dataset (two shards, metadata) and its ACES-style labels: three prediction times per
    subject (hours 24, 48, 72); the label follows the lactate measured before each prediction time. With
    ``leak``, every subject also gets, after its last prediction time, events that give the label away:
    huge values of known codes, a new code, a note. Returns the labels."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for s in range(n_subjects):
        sid = 1000 + s
        rows += [(sid, None, "GENDER//" + "FM"[s % 2], None, None), (sid, None, "AGE", float(rng.integers(20, 90)), None)]
        risk = rng.normal()
        for t in np.sort(rng.uniform(0, 80, 12)):
            rows.append((sid, _h(t), "LAB//lactate", float(2 + risk + rng.normal(0, 0.3)), None))
            rows.append((sid, _h(t + 0.5), "VITAL//HR", float(80 + 10 * rng.normal()), None))
        rows.append((sid, _h(rng.uniform(0, 20)), "NOTE//NURSING", None, "stable overnight" if risk < 0 else "on pressors"))
        rows.append((sid, _h(rng.uniform(0, 20)), "DX//I10", None, None))  # a code-only event
        for pt in (24, 48, 72):
            labels.append((sid, _h(pt), bool(risk + 0.01 * pt > 0.3)))
        if leak:  # all after hour 72, this subject's last prediction time
            positive = labels[-1][2]
            rows += [(sid, _h(72 + 1e-6 * 3600), "LAB//lactate", 1e9 if positive else -1e9, None),
                     (sid, _h(73), "LEAK//outcome", 1.0 if positive else 0.0, None),
                     (sid, _h(74), "NOTE//DISCHARGE", None, "expired" if positive else "discharged home")]
    data = pl.DataFrame(rows, schema=SCHEMA, orient="row").sort("subject_id", "time", nulls_last=False)
    (root / "data" / "train").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(exist_ok=True)
    half = 1000 + n_subjects // 2
    data.filter(pl.col("subject_id") < half).write_parquet(root / "data" / "train" / "0.parquet")
    data.filter(pl.col("subject_id") >= half).write_parquet(root / "data" / "1.parquet")
    splits = ["train"] * (n_subjects * 3 // 4) + ["held_out"] * (n_subjects - n_subjects * 3 // 4)
    pl.DataFrame({"subject_id": [1000 + s for s in range(n_subjects)], "split": splits}).write_parquet(
        root / "metadata" / "subject_splits.parquet")
    pl.DataFrame({"code": data["code"].unique().sort(), "description": None, "parent_codes": None},
                 schema={"code": pl.String, "description": pl.String, "parent_codes": pl.List(pl.String)}
                 ).write_parquet(root / "metadata" / "codes.parquet")
    (root / "metadata" / "dataset.json").write_text(json.dumps({"dataset_name": "tiny_meds", "meds_version": "0.4.1",
                                                               "license": "CC0"}))
    lab = pl.DataFrame(labels, schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"),
                                       "boolean_value": pl.Boolean}, orient="row")
    lab.write_parquet(root / "labels.parquet")
    return lab


def test_meds_dataset_many_prediction_times(tmp_path):
    make_meds(tmp_path)
    c = read_meds(tmp_path, tmp_path / "labels.parquet", series=SERIES)
    f = c.frame
    assert c.name == "tiny_meds" and c.licence == "CC0" and c.task == "binary" and f.height == 120
    assert [(m.name, m.kind) for m in c.modalities] == [("static", "tabular"), ("labs", "irregular_series"),
                                                        ("vitals", "irregular_series"), ("notes", "notes")]
    assert c.modalities[0].columns == ["AGE", "GENDER//F", "GENDER//M"]
    assert f["sample_id"][:3].to_list() == ["1000@2150-01-02T00:00:00", "1000@2150-01-03T00:00:00",
                                            "1000@2150-01-04T00:00:00"]
    # each row holds only its own past: event times <= 0 relative to its prediction time, and later rows more
    for row in f.iter_rows(named=True):
        assert all(e["time"] <= 0 for e in row["labs"] or [])
    n_labs = f.group_by("subject_id", maintain_order=True).agg(pl.col("labs").list.len().fill_null(0))["labs"].to_list()
    assert all(a <= b <= c_ for a, b, c_ in n_labs) and any(a < c_ for a, _, c_ in n_labs)
    # the code-only DX event is in none of the named series groups, so it is not there
    assert not any(e["code"].startswith("DX//") for cell in f["vitals"] if cell is not None for e in cell)
    # splits: the dataset's own, by subject; cohort.extra and the frame agree
    assert f["split"].to_list() == c.extra["split"].tolist()
    idx = meds_split_indices(c)
    assert sorted(idx) == ["held_out", "train"] and len(idx["train"]) == 90 and len(idx["held_out"]) == 30
    assert not set(f["subject_id"].gather(idx["train"])) & set(f["subject_id"].gather(idx["held_out"]))
    assert c.extra["group_column"] == "subject_id" and "code" in c.extra["code_metadata"].columns
    # cross-validation grouped by the cohort's group column: a subject never sits in two folds
    groups = f[c.extra["group_column"]].to_numpy()
    for train, test in cv_splits(c.y, "binary", 5, 0, groups=groups):
        assert not set(groups[train]) & set(groups[test])


def test_cutoff_is_inclusive_at_the_prediction_time(tmp_path):
    """MEDS label schema: data up to and including prediction_time may be used; one microsecond later not."""
    (tmp_path / "data").mkdir()
    pl.DataFrame([(1, _h(24), "LAB//k", 4.0, None), (1, _h(24) + dt.timedelta(microseconds=1), "LAB//k", 5.0, None)],
                 schema=SCHEMA, orient="row").write_parquet(tmp_path / "data" / "0.parquet")
    lab = pl.DataFrame({"subject_id": [1, 1], "prediction_time": [_h(24), _h(24) + dt.timedelta(microseconds=1)],
                        "boolean_value": [True, False]})
    f = read_meds(tmp_path, lab).frame
    assert [e["value"] for e in f["events"][0]] == [4.0] and [e["value"] for e in f["events"][1]] == [4.0, 5.0]
    assert f["sample_id"].to_list() == ["1@2150-01-02T00:00:00", "1@2150-01-02T00:00:00.000001"]


def _fit_predict(c) -> np.ndarray:
    clf = MultimodalClassifier(modalities=c.modalities, fusion="concat", max_epochs=2, batch_size=32, num_threads=1,
                               val_fraction=0, random_state=0)
    return clf.fit(c.frame, c.y).predict_proba(c.frame)


def test_post_cutoff_events_change_nothing(tmp_path):
    """Events after every prediction time (huge values, a new code, notes that give the label away) leave the
    frame and a trained model's predictions bit for bit the same; and each row equals the row built from
    the data truncated at that row's own prediction time."""
    clean, leaky = tmp_path / "clean", tmp_path / "leaky"
    labels = make_meds(clean)
    assert make_meds(leaky, leak=True).equals(labels)
    assert pl.read_parquet(leaky / "data" / "1.parquet").height > pl.read_parquet(clean / "data" / "1.parquet").height
    a = read_meds(clean, labels, series=SERIES)
    b = read_meds(leaky, labels, series=SERIES)
    assert a.frame.equals(b.frame) and a.modalities == b.modalities and np.array_equal(a.y, b.y)
    # per row: the data cut at that row's prediction time give that row (events between two prediction
    # times of one subject reach only the later one)
    data = pl.read_parquet(leaky / "data" / "**" / "*.parquet")
    for i in (0, 1, 2, 61):
        row = labels[i]
        cut = tmp_path / f"cut{i}"
        (cut / "data").mkdir(parents=True)
        data.filter((pl.col("subject_id") == row["subject_id"][0])
                    & (pl.col("time").is_null() | (pl.col("time") <= row["prediction_time"][0]))).write_parquet(
            cut / "data" / "0.parquet")
        one = read_meds(cut, row, series=SERIES).frame.row(0, named=True)
        full = b.frame.row(i, named=True)
        assert {k: one[k] for k in ("sample_id", "AGE", "boolean_value")} == {k: full[k] for k in
                                                                             ("sample_id", "AGE", "boolean_value")}
        for name in ("labs", "vitals", "notes"):  # the same events (times to float rounding: another query plan)
            assert [{**e, "time": pytest.approx(e["time"], abs=1e-9)} for e in one[name]] == full[name]
    assert np.array_equal(_fit_predict(a), _fit_predict(b))


def _shard(tmp_path, frame: pl.DataFrame, name: str = "0.parquet"):
    (tmp_path / "data").mkdir(exist_ok=True)
    frame.write_parquet(tmp_path / "data" / name)


LAB = pl.DataFrame({"subject_id": [1], "prediction_time": [_h(24)], "boolean_value": [True]})


def test_shards_are_checked_against_the_meds_schema(tmp_path):
    good = pl.DataFrame({"subject_id": [1], "time": [_h(1)], "code": ["HR"], "numeric_value": [1.0]})
    _shard(tmp_path, good)
    _shard(tmp_path, good.with_columns(pl.col("time").dt.strftime("%F %T")), "1.parquet")
    with pytest.raises(ValueError, match=r"MEDS events file '.*1\.parquet' column 'time' has type large_string; "
                                         r"the MEDS DataSchema wants timestamp\[us\]"):
        read_meds(tmp_path, LAB)
    _shard(tmp_path, good.with_columns(pl.col("subject_id").cast(pl.Float64)), "1.parquet")
    with pytest.raises(ValueError, match=r"1\.parquet' column 'subject_id' has type double; .* wants int64"):
        read_meds(tmp_path, LAB)
    _shard(tmp_path, good.drop("code"), "1.parquet")
    with pytest.raises(ValueError, match=r"1\.parquet' lacks column\(s\) \['code'\]"):
        read_meds(tmp_path, LAB)
    _shard(tmp_path, good.with_columns(pl.col("time").dt.replace_time_zone("UTC")), "1.parquet")
    with pytest.raises(ValueError, match=r"column 'time' has type timestamp\[us, tz=UTC\]"):
        read_meds(tmp_path, LAB)
    # numeric_value may be omitted wholesale (meds.DataSchema: optional); int32 ids and float64 values are read
    _shard(tmp_path, good.drop("numeric_value").with_columns(pl.col("subject_id").cast(pl.Int32)), "1.parquet")
    f = read_meds(tmp_path, LAB).frame
    assert f["events"][0].to_list() == [{"time": -23.0, "code": "HR", "value": 1.0},
                                        {"time": -23.0, "code": "HR", "value": None}]


def test_labels_are_checked_against_the_label_schema(tmp_path, caplog):
    with pytest.raises(ValueError, match=r"MEDS labels row 1 repeats another row's subject_id and prediction_time "
                                         r"\(subject_id=1, prediction_time=2150-01-02 00:00:00\)"):
        read_meds_labels(pl.concat([LAB, LAB]))
    with pytest.raises(ValueError, match=r"column 'boolean_value' is null in 1 row\(s\), the first at row 1"):
        read_meds_labels(pl.DataFrame({"subject_id": [1, 2], "prediction_time": [_h(1)] * 2,
                                       "boolean_value": [True, None]}))
    with pytest.raises(ValueError, match=r"column 'subject_id' has dtype String; expected integers"):
        read_meds_labels(LAB.with_columns(pl.col("subject_id").cast(pl.String)))
    with pytest.raises(ValueError, match=r"'prediction_time' has time zone 'UTC'"):
        read_meds_labels(LAB.with_columns(pl.col("prediction_time").dt.replace_time_zone("UTC")))
    with pytest.raises(ValueError, match="exactly one non-empty value column"):
        read_meds_labels(LAB.with_columns(float_value=pl.lit(1.0)))
    path = tmp_path / "aces.parquet"  # ACES writes every value column, the unused ones null
    LAB.with_columns(integer_value=pl.lit(None, pl.Int64), float_value=pl.lit(None, pl.Float32),
                     categorical_value=pl.lit(None, pl.String), note=pl.lit("x")).write_parquet(path)
    with caplog.at_level(logging.WARNING, "mmclin.datasets"):
        lab, value = read_meds_labels(path)
    assert value == "boolean_value" and lab.columns == ["subject_id", "prediction_time", "boolean_value"]
    assert "['note'] are not in the MEDS label schema" in caplog.text and str(path) in caplog.text
    _shard(tmp_path, pl.DataFrame({"subject_id": [1], "time": [_h(1)], "code": ["HR"], "numeric_value": [1.0]}))
    multi = read_meds(tmp_path, pl.DataFrame({"subject_id": [1, 1], "prediction_time": [_h(2), _h(3)],
                                              "categorical_value": ["a", "b"]}))
    assert multi.task == "multiclass" and multi.y.tolist() == ["a", "b"]


def test_metadata_files_are_checked(tmp_path):
    make_meds(tmp_path, n_subjects=4)
    splits = tmp_path / "metadata" / "subject_splits.parquet"
    pl.DataFrame({"subject_id": [1000, 1000], "split": ["train", "held_out"]}).write_parquet(splits)
    with pytest.raises(ValueError, match=r"subject_splits\.parquet' row 1: subject_id 1000 has more than one split"):
        read_meds(tmp_path, tmp_path / "labels.parquet")
    pl.DataFrame({"subject_id": [1000], "fold": ["train"]}).write_parquet(splits)
    with pytest.raises(ValueError, match=r"subject_splits\.parquet' lacks column\(s\) \['split'\]"):
        read_meds(tmp_path, tmp_path / "labels.parquet")
    splits.unlink()
    c = read_meds(tmp_path, tmp_path / "labels.parquet")
    assert "split" not in c.frame.columns and "split" not in c.extra
    with pytest.raises(ValueError, match="has no MEDS splits"):
        meds_split_indices(c)
    (tmp_path / "metadata" / "dataset.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"dataset\.json' holds a list; expected a JSON object"):
        read_meds(tmp_path, tmp_path / "labels.parquet")


@requires("meds")
def test_dataset_json_is_checked_with_meds(tmp_path):
    make_meds(tmp_path, n_subjects=4)
    (tmp_path / "metadata" / "dataset.json").write_text(json.dumps({"dataset_name": 3}))
    with pytest.raises(ValueError, match=r"dataset\.json' field 'dataset_name': 3 is not of type 'string'"):
        read_meds(tmp_path, tmp_path / "labels.parquet")


def test_meds_predictions_frame_checks(tmp_path):
    frame = pl.DataFrame({"subject_id": [1, 2], "prediction_time": [_h(1)] * 2, "boolean_value": [True, False]})
    out = meds_predictions_frame(frame, [0.9, 0.2])
    assert out.columns == ["subject_id", "prediction_time", "boolean_value", "predicted_boolean_value",
                           "predicted_boolean_probability"]
    assert out["predicted_boolean_value"].to_list() == [True, False]
    assert out["predicted_boolean_probability"].dtype == pl.Float32
    with pytest.raises(ValueError, match="probability at row 1 is nan"):
        meds_predictions_frame(frame, [0.9, float("nan")])
    with pytest.raises(ValueError, match=r"lacks \['prediction_time'\]"):
        meds_predictions_frame(frame.drop("prediction_time"), [0.9, 0.2])
    with pytest.raises(ValueError, match=r"holds \[0, 2\]; MEDS-evaluation's boolean_value needs booleans or 0/1"):
        meds_predictions_frame(frame.with_columns(boolean_value=pl.Series([0, 2])), [0.9, 0.2])
    with pytest.raises(ValueError, match=r"expected a \.parquet path"):
        write_meds_predictions(None, frame, tmp_path / "p.csv")


@requires("meds", "meds_evaluation")
def test_meds_evaluation_reads_mmclin_predictions(tmp_path):
    from meds_evaluation.evaluate import evaluate_binary_classification
    from meds_evaluation.schema import PredictionSchema
    from sklearn.metrics import roc_auc_score

    make_meds(tmp_path)
    c = read_meds(tmp_path, tmp_path / "labels.parquet", series=SERIES)
    clf = MultimodalClassifier(modalities=c.modalities, max_epochs=3, batch_size=32, num_threads=1, val_fraction=0,
                               random_state=0).fit(c.frame, c.y)
    path = tmp_path / "predictions.parquet"
    written = write_meds_predictions(clf, c.frame, path)
    read = pl.read_parquet(path)
    assert read.equals(written) and read.height == c.frame.height
    PredictionSchema.validate(read.to_arrow())  # raises if the schema is not met
    proba = clf.predict_proba(c.frame)[:, 1].astype(np.float32)
    assert np.array_equal(read["predicted_boolean_probability"].to_numpy(), proba)
    assert read["subject_id"].equals(c.frame["subject_id"]) and read["prediction_time"].equals(c.frame["prediction_time"])
    results = evaluate_binary_classification(read)
    per_sample = results["samples_equally_weighted"]
    assert per_sample["roc_auc_score"] == pytest.approx(roc_auc_score(c.y, proba))
    assert per_sample["binary_accuracy"] == pytest.approx(float(np.mean((proba >= 0.5) == c.y.astype(bool))))
    assert set(results["subjects_equally_weighted"]) >= {"roc_auc_score", "brier_score"}


def test_cli_predict_writes_the_meds_evaluation_table(tmp_path, capsys):
    """`mmclin predict --format meds` writes what write_meds_predictions writes; a CSV output or a non-binary model is refused."""
    from mmclin.interfaces.cli import main

    make_meds(tmp_path)
    c = read_meds(tmp_path, tmp_path / "labels.parquet", series=SERIES)
    assert "boolean_value" in c.frame.columns
    clf = MultimodalClassifier(modalities=c.modalities, max_epochs=2, batch_size=32, num_threads=1, val_fraction=0,
                               random_state=0).fit(c.frame, c.y)
    clf.save(str(tmp_path / "model"))
    c.frame.write_parquet(tmp_path / "samples.parquet")
    out = tmp_path / "meds_predictions.parquet"
    assert main(["predict", str(tmp_path / "model"), "--data", str(tmp_path / "samples.parquet"), "--output", str(out),
                 "--format", "meds"]) == 0
    expected = write_meds_predictions(clf, c.frame, tmp_path / "expected.parquet")
    assert pl.read_parquet(out).equals(expected)
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "model"), "--data", str(tmp_path / "samples.parquet"),
                 "--output", str(tmp_path / "p.csv"), "--format", "meds"]) == 2
    assert "--format meds writes parquet" in capsys.readouterr().err
