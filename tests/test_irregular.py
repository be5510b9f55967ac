"""The irregular_series featurizer and encoders: training-only statistics, truncation, errors,
a timing-only planted signal, mixed modalities through the estimators, persistence."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict

from mmclin import ModalitySpec, MultimodalClassifier, MultimodalSurvivalModel
from mmclin.datasets import make_synthetic_icu
from mmclin.encoders.irregular_series import FIRST_CODE, UNKNOWN_CODE
from mmclin.training.core import FittedModel
from mmclin.training.data import featurize, fit_featurizers

EV = pl.List(pl.Struct({"time": pl.Float64, "code": pl.String, "value": pl.Float64}))


def _frame(cells: list) -> pl.DataFrame:
    return pl.DataFrame({"ev": cells}, schema={"ev": EV})


def _spec(**options) -> ModalitySpec:
    return ModalitySpec(name="labs", kind="irregular_series", columns=["ev"], options=options)


def test_featurizer_fits_on_training_rows_only_and_truncates():
    train = _frame([
        [{"time": -3.0, "code": "HR", "value": 80.0}, {"time": -1.0, "code": "HR", "value": 100.0},
         {"time": -2.0, "code": "LAC", "value": 2.0}],  # not time-sorted: the featurizer sorts
        [{"time": -5.0, "code": "HR", "value": 90.0}, {"time": 0.0, "code": "LAC", "value": None}],
        None,
    ])
    f = fit_featurizers(train, [_spec(max_events=2)])["labs"]
    assert f.vocab == ["HR", "LAC"]
    assert f.mean[FIRST_CODE] == pytest.approx(90.0) and f.mean[FIRST_CODE + 1] == pytest.approx(2.0)
    assert (f.time_shift, f.time_scale) == (0.0, pytest.approx(4.92))  # t_max - 1st percentile
    test = _frame([
        [{"time": -9.0, "code": "HR", "value": 1000.0}, {"time": -4.0, "code": "NEW", "value": 3.0},
         {"time": -1.0, "code": "HR", "value": 90.0}],
        [],
    ])
    table = featurize(test, {"labs": f})
    assert table.present["labs"].tolist() == [True, False]  # an empty list is absent, like null
    b = table.batch(torch.arange(2)).inputs["labs"]
    assert b["mask"].tolist() == [[True, True], [False, False]]  # the 2 most recent of 3 kept; padded to 2
    assert b["code"][0].tolist() == [UNKNOWN_CODE, FIRST_CODE]  # unseen code -> "unknown"
    assert b["value"][0, 1].item() == pytest.approx(0.0)  # 90 is the training mean of HR
    assert b["time"][0].tolist() == pytest.approx([-4.0 / f.time_scale, -1.0 / f.time_scale])
    # state round trip (JSON-able) gives the same tensors
    import json

    g = type(f)(f.spec).load_state_dict(json.loads(json.dumps(f.state_dict())))
    torch.testing.assert_close(featurize(test, {"labs": g}).batch(torch.arange(2)).inputs["labs"], b)


def test_featurizer_errors_name_modality_column_and_row():
    with pytest.raises(ValueError, match=r"modality 'labs', column 'ev': expected list\[struct\{time, code, value\}\].*events_to_frame"):
        fit_featurizers(pl.DataFrame({"ev": [1.0, 2.0]}), [_spec()])
    bad = _frame([[{"time": -1.0, "code": "HR", "value": 1.0}], [{"time": None, "code": "HR", "value": 1.0}]])
    with pytest.raises(ValueError, match="modality 'labs', column 'ev', row 1: an event has no finite time"):
        fit_featurizers(bad, [_spec()])
    inf = _frame([[{"time": -1.0, "code": "HR", "value": float("inf")}]])
    with pytest.raises(ValueError, match="row 0: value inf is not finite"):
        fit_featurizers(inf, [_spec()])
    with pytest.raises(ValueError, match="null in every training row"):
        fit_featurizers(_frame([None, []]), [_spec()])
    from mmclin.config import ComponentConfig, ModelConfig
    from mmclin.training.core import build_net, build_task

    with pytest.raises(ValueError, match="'max_events' is a featurizer option"):
        build_net([_spec()], {"labs": {"n_codes": 4}}, ModelConfig(encoders={"labs": {"max_events": 3}}),
                  build_task(ComponentConfig(name="binary")))


@pytest.fixture(scope="module")
def timing_cohort():
    # only the timing of one MechVent event per stay carries the outcome
    return make_synthetic_icu(n_stays=560, events_per_stay=30, signal={"values": 0.0, "notes": 0.0, "static": 0.0,
                                                                       "timing": 1.5}, seed=1)


def test_timing_signal_is_invisible_without_times(timing_cohort):
    """Per-code counts and mean values (no timing) do not predict the outcome."""
    c = timing_cohort
    flat = (c.frame.select(pl.int_range(pl.len()).alias("row"), "timeseries").explode("timeseries").unnest("timeseries")
            .group_by("row", "code").agg(pl.len().alias("n"), pl.col("value").mean().alias("mean")))
    wide = flat.pivot(on="code", index="row", values=["n", "mean"]).sort("row").fill_null(0.0)
    x = wide.drop("row").to_numpy()
    p = cross_val_predict(LogisticRegression(max_iter=2000), (x - x.mean(0)) / (x.std(0) + 1e-9), c.y, cv=4, method="predict_proba")[:, 1]
    assert roc_auc_score(c.y, p) < 0.62


@pytest.mark.parametrize("encoder", ["irregular_series", "utde", "mtand"])
def test_encoder_learns_a_timing_signal(timing_cohort, encoder):
    c = timing_cohort
    spec = ModalitySpec(name="timeseries", kind="irregular_series", columns=["timeseries"], encoder=encoder,
                        options={"d_model": 32})
    tr, te = np.arange(400), np.arange(400, 560)
    clf = MultimodalClassifier(modalities=[spec], max_epochs=12, batch_size=64, learning_rate=3e-3, val_fraction=0.0,
                               patience=None, random_state=0).fit(c.frame[tr], c.y[tr])
    auc = roc_auc_score(c.y[te], clf.predict_proba(c.frame[te])[:, 1])
    assert auc > 0.8, auc


def test_mixed_modalities_survival_and_round_trip(tmp_path):
    """Tabular + irregular + notes in one survival model; save/load predicts the same."""
    c = make_synthetic_icu(n_stays=200, events_per_stay=15, seed=4)
    rng = np.random.default_rng(0)
    time = rng.exponential(30, c.frame.height) + 1.0
    y = np.array(list(zip(c.y.astype(bool), time)), dtype=[("event", bool), ("time", float)])
    specs = [c.modalities[0], c.modalities[1].model_copy(update={"encoder": "mtand", "options": {"d_model": 8, "n_ref": 4}}),
             c.modalities[2].model_copy(update={"options": {"n_features": 1024, "d_model": 8}})]
    model = MultimodalSurvivalModel(modalities=specs, fusion="late", max_epochs=2, batch_size=32, random_state=0,
                                    id_column="subject_id").fit(c.frame, y)
    risk = model.predict(c.frame)
    assert risk.shape == (200,) and np.isfinite(risk).all()
    loaded = FittedModel.load(model.save(tmp_path / "m"))
    np.testing.assert_allclose(loaded.predict_outputs(c.frame), model.model_.predict_outputs(c.frame), rtol=1e-5, atol=1e-6)
    # a subject whose series is absent still gets a prediction; only that subject's changes
    frame = c.frame.head(6).with_columns(pl.when(pl.int_range(pl.len()) == 2).then(None).otherwise(pl.col("timeseries")).alias("timeseries"))
    before, after = model.predict(c.frame.head(6)), model.predict(frame)
    assert np.isfinite(after).all() and before[2] != after[2]
    np.testing.assert_allclose(np.delete(before, 2), np.delete(after, 2), rtol=1e-5)
