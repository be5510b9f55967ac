"""The hand-made summaries behind the classical baselines of irregular events and notes
(mmclin.evaluation.summaries): what each feature holds, what is fitted on training rows only, and
that the baselines learn from them on the same folds as mmclin."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from mmclin.cohort import ModalitySpec
from mmclin.evaluation.baselines import fit_baselines
from mmclin.evaluation.summaries import EventSummaries, NoteTfidf, event_table, note_texts

EVENT = pl.Struct({"time": pl.Float64, "code": pl.String, "value": pl.Float64})
LABS = ModalitySpec(name="labs", kind="irregular_series", columns=["labs"])
NOTES = ModalitySpec(name="notes", kind="notes", columns=["notes"])


def labs_frame(rows: list[list[tuple[float, str, float | None]] | None]) -> pl.DataFrame:
    cells = [None if r is None else [{"time": t, "code": c, "value": v} for t, c, v in r] for r in rows]
    return pl.DataFrame({"labs": cells}, schema={"labs": pl.List(EVENT)})


def test_event_summaries_are_last_value_count_and_time_since_last_per_training_code():
    frame = labs_frame([
        [(-30.0, "hb", 10.0), (-5.0, "hb", 12.0), (-3.0, "hb", None), (-20.0, "na", 140.0)],  # unsorted, a null value
        [(-8.0, "hb", 9.0), (-2.0, "na", 135.0), (-1.0, "k", 4.0)],
        None,  # no labs at all
        [(-4.0, "hb", 11.0), (-1.0, "rare", 1.0)],  # 'rare' only here: a test row
    ])
    table = event_table(frame, LABS)
    summaries = EventSummaries(table, min_subjects=2, prefix="labs").fit(np.array([[0], [1], [2]]))
    assert summaries.codes_ == ["hb", "na"]  # 'k' is in 1 training subject only, 'rare' in none
    assert summaries.reference_time_ == -1.0  # the latest training event (k at -1 counts: it is an event)
    X = summaries.transform(np.array([[3], [0], [2]]))
    names = summaries.get_feature_names_out().tolist()
    assert names == ["labs:hb:last", "labs:na:last", "labs:hb:count", "labs:na:count",
                     "labs:hb:since_last", "labs:na:since_last", "labs:n_events"]
    row = dict(zip(names, X[1]))  # frame row 0: the last *observed* hb is 12 at -5; the null at -3 still counts
    assert row == {"labs:hb:last": 12.0, "labs:na:last": 140.0, "labs:hb:count": 3.0, "labs:na:count": 1.0,
                   "labs:hb:since_last": 2.0, "labs:na:since_last": 19.0, "labs:n_events": 4.0}
    np.testing.assert_array_equal(X[2], [np.nan, np.nan, 0, 0, np.nan, np.nan, 0])  # no labs: missing, count 0
    np.testing.assert_array_equal(X[0], [11.0, np.nan, 1, 0, 3.0, np.nan, 2])  # 'rare' is counted, not a feature


def test_note_tfidf_vocabulary_comes_from_training_rows_only():
    cells = [[{"time": 1.0, "text": "fever and cough"}, {"time": 0.0, "text": "admitted"}],
             [{"time": 0.0, "text": "cough resolved"}], None, [{"time": 0.0, "text": "zebra sighting"}]]
    frame = pl.DataFrame({"notes": cells}, schema={"notes": pl.List(pl.Struct({"time": pl.Float64, "text": pl.String}))})
    texts = note_texts(frame, NOTES)
    assert texts == ["admitted fever and cough", "cough resolved", "", "zebra sighting"]  # in time order
    tfidf = NoteTfidf(texts, prefix="notes").fit(np.array([[0], [1], [2]]))
    terms = tfidf.get_feature_names_out().tolist()
    assert "notes:cough" in terms and not any("zebra" in t for t in terms)
    X = tfidf.transform(np.array([[3], [2], [1]]))
    assert not X[0].any() and not X[1].any() and X[2][terms.index("notes:cough")] > 0


def test_baselines_learn_from_event_and_note_summaries_alone():
    """A cohort whose outcome is planted in the last value of one lab and in one phrase of the notes,
    with no tabular column at all: the classical baselines, fitted on those summaries, find it."""
    from mmclin.training.splits import cv_splits

    rng = np.random.default_rng(0)
    n = 300
    latent = rng.normal(size=n)
    y = (latent + 0.5 * rng.normal(size=n) > 0).astype(int)
    labs, notes = [], []
    for i in range(n):
        times = np.sort(rng.uniform(-48, 0, size=rng.integers(2, 8)))
        # the early values are noise; only the last 'lactate' carries the signal
        events = [{"time": float(t), "code": "lactate", "value": float(rng.normal())} for t in times[:-1]]
        events.append({"time": float(times[-1]), "code": "lactate", "value": float(latent[i])})
        events += [{"time": float(t), "code": "hr", "value": float(rng.normal(80, 10))} for t in times]
        labs.append(events)
        phrase = "patient looks unwell" if latent[i] > 0.5 else "patient comfortable"
        notes.append([{"time": -1.0, "text": f"{phrase} seen on rounds"}])
    frame = pl.DataFrame({"labs": labs, "notes": notes})
    splits = list(cv_splits(y, "binary", 3, 0))
    for specs in ([LABS], [NOTES]):
        got = fit_baselines(frame, y, specs, "binary", splits, names=["logistic_l2"])
        from sklearn.metrics import roc_auc_score

        aucs = [roc_auc_score(y[te], p) for (_, te), p in zip(splits, got.predictions["logistic_l2"])]
        assert np.mean(aucs) > 0.8, (specs[0].name, aucs)
        assert got.skipped == [] and got.summaries == [
            "labs: last value, count, time since last per code" if specs[0] is LABS else "notes: TF-IDF of the notes"]


@pytest.mark.slow
def test_event_summaries_never_see_the_test_fold():
    """Fold 1's test subjects get wild lab values and a code of their own: the baselines' predictions for
    another test subject of that fold do not move (codes, imputation and scaling come
    from training rows), and those subjects' own predictions do."""
    from mmclin.datasets import make_synthetic_icu
    from mmclin.training.splits import cv_splits

    c = make_synthetic_icu(n_stays=240, events_per_stay=40, seed=1)
    specs = [s for s in c.modalities if s.kind == "irregular_series"]
    splits = list(cv_splits(c.y, "binary", 3, 0))
    te = splits[0][1]
    base = fit_baselines(c.frame, c.y, specs, "binary", splits)
    hit = pl.int_range(pl.len()).is_in(te[1:].tolist())
    wild = c.frame.with_columns(
        pl.when(hit).then(pl.col("timeseries").list.eval(pl.struct(
            pl.element().struct.field("time") + 100.0,
            (pl.lit("planted_") + pl.element().struct.field("code").cast(pl.String)).alias("code"),
            pl.element().struct.field("value") * 1000 + 50))).otherwise(pl.col("timeseries")).alias("timeseries"))
    shifted = fit_baselines(wild, c.y, specs, "binary", splits)
    for name in base.predictions:
        assert shifted.predictions[name][0][0] == pytest.approx(base.predictions[name][0][0], rel=1e-9), name
        assert not np.allclose(shifted.predictions[name][0][1:], base.predictions[name][0][1:]), name
