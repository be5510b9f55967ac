"""The sklearn-style estimators: contract, sklearn tools, user frames, persistence."""
import numpy as np
import pandas as pd
import polars as pl
import pytest
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score

from conftest import FAST
from mmclin import ModalitySpec, MultimodalClassifier, MultimodalRegressor, MultimodalSurvivalModel
from mmclin.training.core import FittedModel


def test_init_stores_params_and_nested_params_route_to_options(boring_binary):
    est = MultimodalClassifier(modalities=boring_binary.modalities, fusion="concat")
    assert est.fusion_options is None  # __init__ does no work
    est.set_params(fusion__d_model=16, encoders__clinical__d_model=8, max_epochs=2)
    assert est.fusion_options == {"d_model": 16}
    assert est.encoder_options == {"clinical": {"d_model": 8}}
    params = est.get_params()
    assert params["fusion__d_model"] == 16 and params["encoders__clinical__d_model"] == 8 and params["max_epochs"] == 2
    cloned = clone(est)
    assert cloned.get_params()["fusion__d_model"] == 16 and cloned.fusion_options is not est.fusion_options


def test_survival_model_quickstart_api(boring_survival):
    c = boring_survival
    model = MultimodalSurvivalModel(modalities=c.modalities, fusion="concat", **FAST)
    assert model.fit(c.frame, c.y) is model
    risk = model.predict(c.frame)
    assert risk.shape == (len(c),) and np.isfinite(risk).all()
    times, surv = model.predict_survival_function(c.frame)
    assert surv.shape == (len(c), len(times))
    assert ((surv >= 0) & (surv <= 1)).all() and (np.diff(surv, axis=1) <= 1e-9).all()
    score = model.score(c.frame, c.y)
    from sksurv.metrics import concordance_index_censored

    event, time = c.y.dtype.names
    assert score == pytest.approx(concordance_index_censored(c.y[event], c.y[time], risk)[0])  # Harrell's C of predict
    assert {"c_index", "uno_c", "integrated_brier", "mean_auc"} <= set(model.metrics(c.frame, c.y, y_train=c.y))


def test_survival_learns_planted_signal():
    from mmclin.datasets import make_synthetic_cohort

    c = make_synthetic_cohort(n_subjects=600, task="survival", signal={"clinical": 1.0, "genes": 1.0}, seed=3)
    tr, te = np.arange(450), np.arange(450, 600)
    model = MultimodalSurvivalModel(modalities=c.modalities, max_epochs=30, batch_size=128, random_state=0)
    model.fit(c.frame[tr], c.y[tr])
    assert model.score(c.frame[te], c.y[te]) > 0.7


def test_discrete_time_survival(boring_survival):
    c = boring_survival
    model = MultimodalSurvivalModel(modalities=c.modalities, task="discrete_time", task_options={"n_bins": 5}, **FAST).fit(c.frame, c.y)
    times, surv = model.predict_survival_function(c.frame)
    assert surv.shape[0] == len(c) and (np.diff(surv, axis=1) <= 1e-9).all()


def test_classifier_binary_learns_and_has_sklearn_outputs(boring_binary):
    c = boring_binary
    clf = MultimodalClassifier(modalities=c.modalities, max_epochs=25, batch_size=32, random_state=0).fit(c.frame, c.y)
    proba = clf.predict_proba(c.frame)
    assert proba.shape == (len(c), 2) and np.allclose(proba.sum(1), 1)
    assert set(np.unique(clf.predict(c.frame))) <= set(clf.classes_)
    assert clf.score(c.frame, c.y) > 0.7  # planted signal, training data


def test_classifier_multiclass_and_regressor():
    from mmclin.datasets import make_synthetic_cohort

    mc = make_synthetic_cohort(n_subjects=150, task="multiclass", n_classes=3, seed=4)
    clf = MultimodalClassifier(modalities=mc.modalities, **FAST).fit(mc.frame, mc.y)
    assert clf.predict_proba(mc.frame).shape == (150, 3) and len(clf.classes_) == 3
    rg = make_synthetic_cohort(n_subjects=150, task="regression", seed=5)
    reg = MultimodalRegressor(modalities=rg.modalities, **FAST).fit(rg.frame, rg.y)
    assert reg.predict(rg.frame).shape == (150,)
    assert np.isfinite(reg.score(rg.frame, rg.y))


def test_cross_val_score_and_grid_search(boring_binary):
    c = boring_binary
    est = MultimodalClassifier(modalities=c.modalities, **FAST)
    scores = cross_val_score(est, c.frame, c.y, cv=KFold(2, shuffle=True, random_state=0))
    assert scores.shape == (2,) and np.isfinite(scores).all()
    grid = GridSearchCV(est, {"fusion__d_model": [8, 16], "fusion": ["concat", "late"]}, cv=2).fit(c.frame, c.y)
    assert grid.best_params_["fusion__d_model"] in (8, 16)
    assert grid.best_estimator_.model_.net.fusion.output_dim == grid.best_params_["fusion__d_model"]


def test_user_frame_pandas_with_own_specs():
    rng = np.random.default_rng(0)
    n = 120
    df = pd.DataFrame({
        "age": rng.normal(60, 10, n), "sex": rng.choice(["F", "M"], n),
        "ldh": np.where(rng.random(n) < 0.2, np.nan, rng.normal(200, 50, n)),
        **{f"gene{i}": rng.normal(size=n) for i in range(10)},
    })
    df.loc[:30, [f"gene{i}" for i in range(10)]] = np.nan  # no expression data for 31 patients
    y = (df["age"] + 20 * df["gene0"].fillna(0) > 60).map({True: "high", False: "low"}).to_numpy()
    mods = [ModalitySpec(name="clinical", kind="tabular", columns=["age", "sex", "ldh"]),
            ModalitySpec(name="expression", kind="genomics", columns=[f"gene{i}" for i in range(10)])]
    clf = MultimodalClassifier(modalities=mods, fusion="late", **FAST).fit(df, y)
    assert set(clf.classes_) == {"high", "low"}
    assert clf.predict(df.iloc[:5]).shape == (5,)


def test_bad_fusion_parameter_message(boring_binary):
    est = MultimodalClassifier(modalities=boring_binary.modalities, fusion="concatt", **FAST)
    with pytest.raises(ValueError, match="The 'fusion' parameter of MultimodalClassifier must be one of .*Got 'concatt' instead"):
        est.fit(boring_binary.frame, boring_binary.y)


def test_survival_target_errors(boring_survival):
    c = boring_survival
    y = c.y.copy()
    y["time"][3] = 0.0
    with pytest.raises(ValueError, match="row 3"):
        MultimodalSurvivalModel(modalities=c.modalities, **FAST).fit(c.frame, y)
    with pytest.raises(ValueError, match="X has 160 rows but y has 159"):
        MultimodalSurvivalModel(modalities=c.modalities, **FAST).fit(c.frame, c.y[:-1])


def test_predict_on_frame_missing_columns_is_clear(boring_binary):
    c = boring_binary
    clf = MultimodalClassifier(modalities=c.modalities, **FAST).fit(c.frame, c.y)
    col = c.modalities[0].columns[0]
    with pytest.raises(ValueError, match=f"the frame given to predict lacks columns: modality '{c.modalities[0].name}' needs column '{col}'"):
        clf.predict(c.frame.drop(col))


def test_presence_is_per_sample_at_prediction(boring_binary):
    """Dropping one patient's genes changes only that patient's prediction."""
    c = boring_binary
    clf = MultimodalClassifier(modalities=c.modalities, **FAST).fit(c.frame, c.y)
    genes = next(m for m in c.modalities if m.name == "genes").columns
    frame = c.frame.head(10)
    base = clf.predict_proba(frame)
    changed = frame.with_columns([pl.when(pl.int_range(pl.len()) == 4).then(None).otherwise(pl.col(g)).alias(g) for g in genes])
    after = clf.predict_proba(changed)
    others = [i for i in range(10) if i != 4]
    np.testing.assert_allclose(base[others], after[others], rtol=1e-5, atol=1e-6)


def test_save_load_round_trip_without_pickle(tmp_path, boring_survival):
    c = boring_survival
    model = MultimodalSurvivalModel(modalities=c.modalities, ensemble_size=2, **FAST).fit(c.frame, c.y)
    path = model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["manifest.json", "mmclin.json", "model.safetensors"]
    loaded = FittedModel.load(path)
    np.testing.assert_allclose(loaded.predict_outputs(c.frame), model.model_.predict_outputs(c.frame), rtol=1e-5)
    t1, s1 = loaded.task.survival_function(loaded.predict_outputs(c.frame))
    t2, s2 = model.predict_survival_function(c.frame)
    np.testing.assert_allclose(s1, s2, rtol=1e-5)


def test_cpu_runs_are_repeatable(boring_binary):
    c = boring_binary
    a = MultimodalClassifier(modalities=c.modalities, modality_dropout=0.2, **FAST).fit(c.frame, c.y).predict_proba(c.frame)
    b = MultimodalClassifier(modalities=c.modalities, modality_dropout=0.2, **FAST).fit(c.frame, c.y).predict_proba(c.frame)
    np.testing.assert_array_equal(a, b)


def test_a_column_vector_y_is_one_label_per_row_and_said():
    """scikit-learn reads a (n, 1) y as one label per row (with a warning); it used to become a one-label
    multilabel task without a word."""
    from mmclin import MultimodalClassifier
    from mmclin.datasets import make_synthetic_cohort

    c = make_synthetic_cohort(n_subjects=80, task="binary", seed=0)
    with pytest.warns(UserWarning, match=r"y is a column vector \(shape \(80, 1\)\); it is taken as one label per row"):
        model = MultimodalClassifier(modalities=c.modalities, max_epochs=1, random_state=0).fit(
            c.frame, np.asarray(c.y).reshape(-1, 1))
    assert model.task_.task_name == "binary" and model.predict_proba(c.frame).shape == (80, 2)
