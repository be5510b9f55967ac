"""Long event tables -> one row per subject: windows, layouts, errors, ragged batching, leakage."""
from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pytest
import torch

from mmclin.datasets import events_to_frame, notes_to_frame
from mmclin.datasets.synthetic_icu import make_icu_tables
from mmclin.batch import Ragged


@pytest.fixture(scope="module")
def small():
    subjects = pl.DataFrame({"subject_id": [1, 2, 3, 1], "prediction_time": [10.0, 5.0, 3.0, 20.0], "y": [0, 1, 0, 1]})
    events = pl.DataFrame({
        "subject_id": [1, 1, 1, 2, 2, 9],
        "time": [12.0, 2.0, 8.0, 1.0, 4.0, 1.0],
        "code": ["HR", "HR", "LAC", "HR", "LAC", "HR"],
        "numeric_value": [200.0, 80.0, None, 90.0, 2.1, 1.0],
    })
    return subjects, events


def test_meds_cutoff_sorting_relative_time_and_absence(small):
    subjects, events = small
    out = events_to_frame(events, subjects, name="labs")
    assert out.columns == ["subject_id", "prediction_time", "y", "labs"] and out.height == 4
    assert out.schema["labs"] == pl.List(pl.Struct({"time": pl.Float64, "code": pl.String, "value": pl.Float64}))
    rows = out["labs"].to_list()
    # row 0: subject 1 cut at 10 -> the event at 12 is gone; sorted by time; a code-only event keeps value None
    assert rows[0] == [{"time": -8.0, "code": "HR", "value": 80.0}, {"time": -2.0, "code": "LAC", "value": None}]
    assert [e["time"] for e in rows[1]] == [-4.0, -1.0]
    assert rows[2] is None  # no events in the window: absent
    # the same subject with a later prediction time (row 3) sees the later event: one row per prediction
    assert [e["value"] for e in rows[3]] == [80.0, None, 200.0]


def test_window_and_window_start_and_max_events(small):
    subjects, events = small
    out = events_to_frame(events, subjects, name="labs", window=5.0)  # (cutoff - 5, cutoff]
    assert [e["time"] for e in out["labs"][0]] == [-2.0]
    start = subjects.with_columns(pl.lit(3.0).alias("adm"))
    out = events_to_frame(events, start, name="labs", window_start="adm", relative_to="window_start")
    assert [e["time"] for e in out["labs"][0]] == [5.0] and out["labs"][1].to_list()[0]["time"] == 1.0
    out = events_to_frame(events, subjects, name="labs", max_events=1)
    assert [e["value"] for e in out["labs"][3]] == [200.0]  # the most recent one


def test_wide_layout_matches_meds_and_datetimes():
    t0 = dt.datetime(2100, 1, 1)
    wide = pl.DataFrame({"sid": ["a", "a", "b"], "charttime": [t0 + dt.timedelta(hours=h) for h in (1, 30, 2)],
                         "HR": [80.0, 99.0, None], "SBP": [120.0, None, 110.0], "note": ["x", "y", "z"]})
    subjects = pl.DataFrame({"sid": ["a", "b"], "adm": [t0, t0], "cut": [t0 + dt.timedelta(hours=24)] * 2})
    out = events_to_frame(wide, subjects, name="vitals", id_column="sid", time_column="charttime", layout="wide",
                          prediction_time="cut", window_start="adm", relative_to="window_start", time_unit="h")
    assert out["vitals"].to_list() == [[{"time": 1.0, "code": "HR", "value": 80.0}, {"time": 1.0, "code": "SBP", "value": 120.0}],
                                       [{"time": 2.0, "code": "SBP", "value": 110.0}]]
    long = wide.unpivot(index=["sid", "charttime"], on=["HR", "SBP"], variable_name="code", value_name="v").drop_nulls("v")
    same = events_to_frame(long, subjects, name="vitals", id_column="sid", time_column="charttime", value_column="v",
                           prediction_time="cut", window="24h", relative_to="window_start")
    assert same["vitals"].to_list() == out["vitals"].to_list()


def test_lazy_parquet_and_csv_scans(tmp_path, small):
    subjects, events = small
    events.write_parquet(tmp_path / "ev.parquet")
    events.write_csv(tmp_path / "ev.csv")
    want = events_to_frame(events, subjects, name="labs")
    lazy = events_to_frame(str(tmp_path / "ev.parquet"), subjects.lazy(), name="labs", lazy=True)
    assert isinstance(lazy, pl.LazyFrame) and lazy.collect().equals(want)
    assert events_to_frame(tmp_path / "ev.csv", subjects, name="labs").equals(want)


def test_notes_window_and_empty_text():
    subjects = pl.DataFrame({"subject_id": [1, 2], "prediction_time": [10.0, 10.0]})
    notes = pl.DataFrame({"subject_id": [1, 1, 1, 2], "time": [1.0, 11.0, 3.0, 2.0], "text": ["a b", "late", "c", "  "]})
    out = notes_to_frame(notes, subjects)
    assert out["notes"].to_list() == [[{"time": -9.0, "text": "a b"}, {"time": -7.0, "text": "c"}], None]


def test_builder_errors_name_the_problem(small):
    subjects, events = small
    with pytest.raises(ValueError, match="no column 'prediction_time'.*each row's cutoff"):
        events_to_frame(events, subjects.drop("prediction_time"))
    with pytest.raises(ValueError, match="no column 'cod' \\(did you mean 'code'\\?\\)"):
        events_to_frame(events, subjects, code_column="cod")
    with pytest.raises(ValueError, match="row 1 \\(subject_id=2\\) has no prediction time"):
        events_to_frame(events, subjects.with_columns(pl.when(pl.col("subject_id") == 2).then(None)
                                                      .otherwise(pl.col("prediction_time")).alias("prediction_time")))
    with pytest.raises(ValueError, match="both must be datetimes or both numbers"):
        events_to_frame(events, subjects.with_columns(pl.lit(dt.datetime(2100, 1, 1)).alias("prediction_time")))
    with pytest.raises(ValueError, match="'numeric_value' has dtype String"):
        events_to_frame(events.with_columns(pl.col("numeric_value").cast(pl.String)), subjects)
    with pytest.raises(ValueError, match="already has a column 'y'"):
        events_to_frame(events, subjects, name="y")
    with pytest.raises(ValueError, match="'48h'"):
        events_to_frame(events, subjects, window="48h")  # a duration string needs datetime times


def test_ragged_pads_per_batch_not_per_table():
    lengths = torch.tensor([20_000, 3, 0, 5])
    offsets = torch.zeros(5, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    r = Ragged({"v": torch.arange(int(offsets[-1]), dtype=torch.float32)}, offsets)
    b = r.pad(torch.tensor([1, 2, 3]))  # the long subject is not in this batch: width 5, not 20,000
    assert b["v"].shape == (3, 5) and b["mask"].sum(1).tolist() == [3, 0, 5]
    assert b["v"][0, :3].tolist() == [20_000.0, 20_001.0, 20_002.0] and b["v"][0, 3:].tolist() == [0.0, 0.0]
    sub = r.take(torch.tensor([3, 1]))
    assert sub.lengths.tolist() == [5, 3] and sub.fields["v"][:5].tolist() == r.fields["v"][20_003:20_008].tolist()
    # two levels: notes -> terms
    inner = Ragged({"t": torch.arange(6)}, torch.tensor([0, 2, 3, 6]), mask_key="term_mask")
    two = Ragged({"nt": torch.tensor([1, 2, 3])}, torch.tensor([0, 2, 3]), "note_mask", inner)
    p = two.pad(torch.tensor([1, 0]))
    assert p["nt"].tolist() == [[3, 0], [1, 2]] and p["t"].shape == (2, 2, 3)
    assert p["t"][0, 0].tolist() == [3, 4, 5] and p["term_mask"][1].tolist() == [[True, True, False], [True, False, False]]
    assert two.take(torch.tensor([1])).inner.fields["t"].tolist() == [3, 4, 5]


# ------------------------------------------------------------------------------ leakage
def _with_leak(tables: dict) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Plant, after every stay's prediction time, an event and a note that give the label away."""
    s = tables["subjects"]
    leak_events = pl.DataFrame({"subject_id": s["subject_id"], "time": s["prediction_time"] + 0.5,
                                "code": pl.Series(["OUTCOME"] * s.height), "numeric_value": s["died"].cast(pl.Float32)})
    leak_notes = pl.DataFrame({"subject_id": s["subject_id"], "time": s["prediction_time"] + 1.0,
                               "text": pl.Series(np.where(s["died"].to_numpy() == 1, "patient died", "patient discharged home").tolist())})
    return pl.concat([tables["events"], leak_events]), pl.concat([tables["notes"], leak_notes])


def _cohort_frame(tables: dict, events: pl.DataFrame, notes: pl.DataFrame, prediction_time: str | None = "prediction_time"):
    f = events_to_frame(events, tables["subjects"], name="timeseries", prediction_time=prediction_time,
                        relative_to="prediction_time" if prediction_time else None)
    return notes_to_frame(notes, f, name="notes", prediction_time=prediction_time,
                          relative_to="prediction_time" if prediction_time else None)


def test_events_after_the_cutoff_change_nothing():
    """An event and a note planted after the prediction time that would make the prediction
    perfect change neither the cohort frame nor a trained model's predictions; without the
    cutoff the same leak is learned (so the test can tell)."""
    from sklearn.metrics import roc_auc_score

    from mmclin import ModalitySpec, MultimodalClassifier

    tables = make_icu_tables(n_stays=240, events_per_stay=20, signal={"values": 0.0, "timing": 0.0, "notes": 0.0}, seed=3)
    leaky_events, leaky_notes = _with_leak(tables)
    clean = _cohort_frame(tables, tables["events"], tables["notes"])
    leaky = _cohort_frame(tables, leaky_events, leaky_notes)
    assert leaky.equals(clean)
    assert not leaky_events.filter(pl.col("code") == "OUTCOME").is_empty()

    y = tables["subjects"]["died"].to_numpy()
    specs = [ModalitySpec(name="timeseries", kind="irregular_series", columns=["timeseries"], options={"d_model": 16}),
             ModalitySpec(name="notes", kind="notes", columns=["notes"], options={"d_model": 16, "n_features": 2**12})]
    kw = dict(modalities=specs, max_epochs=8, batch_size=64, learning_rate=3e-3, val_fraction=0.0, patience=None,
              random_state=0, id_column="subject_id")
    tr, te = np.arange(160), np.arange(160, 240)
    p_clean = MultimodalClassifier(**kw).fit(clean[tr], y[tr]).predict_proba(clean[te])
    p_leaky = MultimodalClassifier(**kw).fit(leaky[tr], y[tr]).predict_proba(leaky[te])
    np.testing.assert_array_equal(p_clean, p_leaky)
    assert roc_auc_score(y[te], p_clean[:, 1]) < 0.75  # no signal planted: nothing to find before the cutoff
    # the counter-check: without a cutoff, the planted leak is found
    uncut = _cohort_frame(tables, leaky_events, leaky_notes, prediction_time=None)
    p_uncut = MultimodalClassifier(**kw).fit(uncut[tr], y[tr]).predict_proba(uncut[te])
    assert roc_auc_score(y[te], p_uncut[:, 1]) > 0.95
