"""The penalised linear path beside the deep one (mmclin.training.linear_path): what it is fitted to,
that training starts from it and never ends worse than it on the validation rows, that the deep
path still learns what it cannot, and that it honours presence."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from mmclin.cohort import ModalitySpec


def _design_by_hand(frame: pl.DataFrame, numeric: list[str], categorical: list[str]) -> np.ndarray:
    """The design the linear path reads, built here from the frame: training-standardised values (0 where
    missing), missing flags, hinges max(0, z - knot) at the quartiles of each column's observed values (0
    where missing), one-hot categories with mmclin's codes (0 missing, 1 unseen, 2.. sorted)."""
    values = frame.select(numeric).to_numpy().astype(float)
    missing = np.isnan(values)
    mean, std = np.nanmean(values, 0), np.nanstd(values, 0)
    z = np.where(missing, 0.0, (values - mean) / np.where(std > 0, std, 1.0))
    knots = np.stack([np.quantile(z[~missing[:, j], j], [0.25, 0.5, 0.75]) for j in range(z.shape[1])])
    hinges = np.maximum(z[:, :, None] - knots[None], 0) * (~missing)[:, :, None]
    blocks = [z, missing.astype(float), hinges.reshape(len(z), -1)]
    for c in categorical:
        col = frame[c].cast(pl.String)
        cats = sorted(col.drop_nulls().unique().to_list())
        codes = [0 if v is None else 2 + cats.index(v) for v in col.to_list()]
        blocks.append(np.eye(len(cats) + 2)[codes])
    return np.column_stack(blocks)


def test_the_linear_path_is_scikit_survivals_near_ridge_coxnet_on_the_standardised_inputs():
    from mmclin.config import ComponentConfig, ModelConfig, TrainerConfig
    from mmclin.datasets import load_cohort
    from mmclin.tasks.linear_models import CoxnetCV
    from mmclin.training.core import fit_model

    c = load_cohort("veterans")
    spec = c.modalities[0]
    fitted = fit_model(c.frame, c.y, c.modalities, ModelConfig(), TrainerConfig(max_epochs=1, progress_bar=False),
                       ComponentConfig(name="cox"))
    assert fitted.model_config.linear_path is True  # automatic: on, and saved as on
    X = _design_by_hand(c.frame, [col for col in spec.columns if col not in (spec.categorical or [])],
                        list(spec.categorical or []))
    event, time = c.y.dtype.names
    y = np.empty(len(c.y), dtype=[("event", bool), ("time", float)])
    y["event"], y["time"] = c.y[event], c.y[time]
    by_hand = CoxnetCV(l1_ratio=0.05, scoring="deviance", seed=0).fit(X, y)  # near-ridge, penalty as cv.glmnet's
    assert by_hand.scale_ == 1.0  # chosen by partial likelihood: on its scale already, no slope fitted
    np.testing.assert_allclose(fitted.net.linear.weight.numpy()[0], by_hand.calibrated_coef_, rtol=1e-3, atol=1e-5)
    # the model's output is the linear model's log-risk plus what the deep path learnt on top of it
    table = fitted.table(c.frame)
    with torch.no_grad():
        linear = fitted.net.linear(table.inputs, table.present).numpy()[:, 0]
    np.testing.assert_allclose(linear, X @ by_hand.calibrated_coef_, rtol=1e-3, atol=1e-4)


def _planted(n: int, seed: int, interaction: bool) -> tuple[pl.DataFrame, np.ndarray, list[ModalitySpec]]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6))
    eta = 1.5 * x[:, 0] * x[:, 1] if interaction else 1.5 * x[:, 0] - x[:, 1]
    y = (eta + 0.3 * rng.normal(size=n) > 0).astype(int)
    frame = pl.DataFrame({f"x{i}": x[:, i] for i in range(6)})
    return frame, y, [ModalitySpec(name="clinical", kind="tabular", columns=list(frame.columns))]


def test_training_starts_from_the_linear_model_and_keeps_it_when_training_only_hurts():
    """A learning rate so large that the first epoch wrecks the deep path: the untrained start (the linear
    model alone, best epoch -1) is kept, so the predictions are exactly the logistic regression's."""
    from mmclin import MultimodalClassifier

    frame, y, specs = _planted(400, 0, interaction=False)
    model = MultimodalClassifier(modalities=specs, max_epochs=3, learning_rate=30.0, patience=None,
                                 random_state=0).fit(frame, y)
    assert model.model_.best_epoch == -1
    table = model.model_.table(frame)
    with torch.no_grad():
        linear = model.model_.net.linear(table.inputs, table.present).numpy()[:, 0]
    proba = model.predict_proba(frame)[:, 1]
    np.testing.assert_allclose(proba, 1 / (1 + np.exp(-linear)), rtol=1e-5, atol=1e-6)
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y, proba) > 0.9  # the linear model found the linear signal


def test_the_deep_path_learns_what_the_linear_model_cannot():
    """An interaction x0 * x1: the linear path sees nothing (AUROC ~0.5), the model with it learns it."""
    from sklearn.metrics import roc_auc_score

    from mmclin import MultimodalClassifier

    frame, y, specs = _planted(1200, 1, interaction=True)
    test, y_test, _ = _planted(600, 2, interaction=True)
    model = MultimodalClassifier(modalities=specs, max_epochs=60, learning_rate=3e-3, batch_size=128,
                                 random_state=0).fit(frame, y)
    table = model.model_.table(test)
    with torch.no_grad():
        linear = model.model_.net.linear(table.inputs, table.present).numpy()[:, 0]
    assert roc_auc_score(y_test, linear) < 0.6
    assert roc_auc_score(y_test, model.predict_proba(test)[:, 1]) > 0.85
    assert model.model_.best_epoch > 0


def test_the_linear_path_honours_presence_and_can_be_turned_off_or_refused():
    from mmclin import MultimodalClassifier
    from mmclin.config import ComponentConfig, ModelConfig
    from mmclin.training.linear_path import linear_path_enabled
    from mmclin.training.core import build_task

    frame, y, specs = _planted(200, 3, interaction=False)
    two = [ModalitySpec(name="a", kind="tabular", columns=["x0", "x1", "x2"]),
           ModalitySpec(name="b", kind="tabular", columns=["x3", "x4", "x5"])]
    model = MultimodalClassifier(modalities=two, max_epochs=2, random_state=0).fit(frame, y)
    table = model.model_.table(frame.head(4))
    present = {m: p.clone() for m, p in table.present.items()}
    present["b"][0] = False
    with torch.no_grad():
        full = model.model_.net.linear(table.inputs, table.present)
        dropped = model.model_.net.linear(table.inputs, present)
    terms = model.model_.net.linear.contributions(table.inputs)
    assert torch.allclose(full[0] - dropped[0], terms["b"][0], atol=1e-5) and terms["b"][0].abs().sum() > 0
    assert torch.equal(full[1:], dropped[1:])  # another sample's absence changes nothing here
    off = MultimodalClassifier(modalities=two, max_epochs=2, linear_path=False, random_state=0).fit(frame, y)
    assert off.model_.net.linear is None and off.model_.model_config.linear_path is False
    multilabel = build_task(ComponentConfig(name="multilabel"))
    assert not linear_path_enabled(None, two, multilabel)  # automatic: off where the task has no linear model
    with pytest.raises(ValueError, match="model.linear_path: true, but the 'multilabel' task has no penalised linear"):
        linear_path_enabled(True, two, multilabel)
    notes = [ModalitySpec(name="report", kind="notes", columns=["report"])]
    with pytest.raises(ValueError, match=r"there is none \(modalities: report \(notes\)\)"):
        linear_path_enabled(True, notes, build_task(ComponentConfig(name="binary")))
    assert ModelConfig().linear_path is None


def test_cross_validated_partial_likelihood_uses_the_training_loss_definition():
    """The deviance that chooses Coxnet's penalty is Cox's log partial likelihood with Breslow's ties, the
    same as mmclin's own loss (times the number of events), on tied times too."""
    from mmclin.tasks.linear_models import cox_log_partial_likelihood
    from mmclin.tasks.survival import cox_partial_nll

    rng = np.random.default_rng(0)
    time, event, eta = rng.integers(1, 8, 60).astype(float), rng.random(60) < 0.6, rng.normal(size=60)
    ours = cox_log_partial_likelihood(eta, time, event)
    loss = cox_partial_nll(torch.tensor(eta), torch.tensor(event, dtype=torch.float64), torch.tensor(time), "breslow")
    assert ours == pytest.approx(-float(loss) * event.sum(), rel=1e-10)


def test_coxnet_falls_back_to_stronger_penalties_where_its_solver_overflows(monkeypatch):
    """scikit-survival raises 'weights are too large' when a weak penalty lets coefficients explode (small or
    separable data): CoxnetCV then fits the stronger part of the path instead of failing the whole fit."""
    from sksurv.linear_model import CoxnetSurvivalAnalysis

    from mmclin.datasets import load_cohort
    from mmclin.tasks.linear_models import CoxnetCV

    c = load_cohort("veterans")
    X = c.frame.select("Age_in_years", "Karnofsky_score", "Months_from_Diagnosis").to_numpy().astype(float)
    X = (X - X.mean(0)) / X.std(0)
    event, time = c.y.dtype.names
    y = np.empty(len(c.y), dtype=[("event", bool), ("time", float)])
    y["event"], y["time"] = c.y[event], c.y[time]
    free = CoxnetCV().fit(X, y)
    real_fit = CoxnetSurvivalAnalysis.fit
    floor = free.alpha_ * 1.5  # the penalty CV chose and every weaker one "overflow"

    def overflowing(self, X_, y_):
        fitted = real_fit(self, X_, y_)
        if fitted.alphas_.min() < floor:
            raise ArithmeticError("Numerical error, because weights are too large. Consider increasing alpha.")
        return fitted

    monkeypatch.setattr(CoxnetSurvivalAnalysis, "fit", overflowing)
    stiff = CoxnetCV().fit(X, y)
    assert stiff.alpha_ >= floor and np.isfinite(stiff.coef_).all()
    assert np.abs(stiff.coef_).sum() <= np.abs(free.coef_).sum()  # a stronger penalty: smaller coefficients


def test_the_calibration_slope_undoes_an_overconfident_scale():
    """Times drawn from a Cox model with log-risk r: the slope of r is near 1, of 5 r near 1/5, and a
    constant risk has no slope to fit (1)."""
    from mmclin.tasks.linear_models import calibration_slope

    rng = np.random.default_rng(0)
    r = rng.normal(size=4000)
    time = rng.exponential(np.exp(-r))
    event = rng.random(4000) < 0.8
    assert calibration_slope(r, time, event) == pytest.approx(1.0, abs=0.1)
    assert calibration_slope(5 * r, time, event) == pytest.approx(0.2, abs=0.02)
    assert calibration_slope(np.zeros(4000), time, event) == 1.0


def test_on_many_rows_the_penalty_is_chosen_on_a_sample_and_the_model_fitted_on_all():
    from sklearn.linear_model import LogisticRegression
    from sksurv.linear_model import CoxnetSurvivalAnalysis

    from mmclin.tasks.linear_models import CoxnetCV, fit_logistic, logistic_cv

    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 5))
    labels = (X[:, 0] + rng.normal(size=3000) > 0).astype(int)
    model = fit_logistic(X, labels, cv_rows=1000)
    rows = np.sort(np.random.default_rng(0).choice(3000, 1000, replace=False))
    chosen = logistic_cv(0, min_class=int(np.bincount(labels[rows]).min())).fit(X[rows], labels[rows])
    np.testing.assert_allclose(model.coef_, LogisticRegression(C=float(np.ravel(chosen.C_)[0]), max_iter=5000).fit(X, labels).coef_)
    y = np.empty(3000, dtype=[("event", bool), ("time", float)])
    y["event"], y["time"] = rng.random(3000) < 0.7, rng.exponential(np.exp(-X[:, 0]))
    cox = CoxnetCV(cv_rows=800).fit(X, y)
    everyone = CoxnetSurvivalAnalysis(l1_ratio=0.5, alphas=[cox.alpha_], max_iter=100_000).fit(X, y)
    np.testing.assert_allclose(cox.coef_, everyone.coef_[:, 0], rtol=1e-6)
