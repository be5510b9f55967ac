"""The classical penalised linear models of the tasks, with their penalty chosen by inner CV on the rows
they are fitted on: the baselines (:mod:`mmclin.evaluation.baselines`) and the models' linear path
(:mod:`mmclin.training.linear_path`) use the same ones."""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
from sklearn.base import BaseEstimator


@contextmanager
def quiet_solvers() -> Iterator[None]:
    """Convergence chatter of the linear solvers on collinear omics, and scikit-learn's announced default
    changes: the fitted model is the one used either way."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*converge.*")
        yield


class CoxnetCV(BaseEstimator):
    """Elastic-net Cox with its penalty chosen by K-fold CV on the data it is fitted on.

    scikit-survival's ``CoxnetSurvivalAnalysis`` fits a whole path of penalties at once but predicts
    with the smallest one unless told; choosing along the path by inner CV is what its user guide
    does (with ``GridSearchCV``); here the path is fitted once per inner fold rather than once per
    penalty, which is the same choice at a fraction of the cost. ``scoring``: ``"c_index"`` (default:
    Harrell's C, the metric the models are compared on) or ``"deviance"`` (as R's ``cv.glmnet``: the
    cross-validated partial likelihood of Verweij and van Houwelingen; on GSE7390 it chose penalties
    so strong that the 5-fold C fell from 0.687 to 0.62).

    C is blind to the scale of the risk scores, and a weak penalty gives overconfident ones; so the
    calibration slope ``scale_`` is fitted too: the one-parameter Cox model on the out-of-fold risk
    scores at the chosen penalty (van Houwelingen's shrinkage factor). ``calibrated_coef_`` =
    ``scale_ * coef_`` ranks as ``coef_`` does, on the scale of the partial likelihood.

    On more than ``cv_rows`` rows the inner CV runs on a random ``cv_rows`` of them (the penalty and the
    slope need far fewer rows than the fit); the final fit uses every row.
    """

    def __init__(self, l1_ratio: float = 0.5, n_alphas: int = 50, alpha_min_ratio: float = 0.01,
                 inner_folds: int = 5, seed: int = 0, scoring: str = "c_index", cv_rows: int = 20_000) -> None:
        self.l1_ratio, self.n_alphas, self.alpha_min_ratio = l1_ratio, n_alphas, alpha_min_ratio
        self.inner_folds, self.seed, self.scoring, self.cv_rows = inner_folds, seed, scoring, cv_rows

    def fit(self, X: np.ndarray, y: np.ndarray) -> "CoxnetCV":
        from sklearn.model_selection import StratifiedKFold
        from sksurv.metrics import concordance_index_censored

        full_X, full_y = X, y
        alphas = self._path(X, y).alphas_
        if len(X) > self.cv_rows:
            keep = np.sort(np.random.default_rng(self.seed).choice(len(X), self.cv_rows, replace=False))
            X, y = X[keep], y[keep]
        event, time = y[y.dtype.names[0]].astype(bool), y[y.dtype.names[1]]
        scores = np.full((self.inner_folds, len(alphas)), np.nan)
        out_of_fold = np.full((len(time), len(alphas)), np.nan)
        k = min(self.inner_folds, int(event.sum()), int((~event).sum())) if event.any() else 0
        if k >= 2:
            for f, (tr, va) in enumerate(StratifiedKFold(k, shuffle=True, random_state=self.seed).split(X, event)):
                inner = self._path(X[tr], y[tr], alphas)
                for a, alpha in enumerate(inner.alphas_ if inner is not None else []):
                    if self.scoring == "deviance":  # l(beta_-k; all rows) - l(beta_-k; rows without fold k)
                        risk = inner.predict(X, alpha=alpha)
                        scores[f, a] = cox_log_partial_likelihood(risk, time, event) - \
                            cox_log_partial_likelihood(risk[tr], time[tr], event[tr])
                        continue
                    risk = inner.predict(X[va], alpha=alpha)
                    out_of_fold[va, a] = risk
                    scores[f, a] = concordance_index_censored(event[va], time[va], risk)[0] \
                        if event[va].any() and np.ptp(risk) > 0 else 0.5
        mean = np.nanmean(scores, axis=0) if np.isfinite(scores).any() else np.full(len(alphas), np.nan)
        chosen = int(np.nanargmax(mean)) if np.isfinite(mean).any() else len(alphas) // 2
        # the chosen penalty, or where it does not fit the whole data, the next larger ones (alphas descend)
        for a in range(chosen, -1, -1):
            self.model_ = self._path(full_X, full_y, alphas[a:a + 1])
            if self.model_ is not None:
                self.alpha_ = float(alphas[a])
                self.scale_ = calibration_slope(out_of_fold[:, a], time, event)
                return self
        raise ValueError("penalised Cox (Coxnet) fits no penalty on these rows; the inputs may be degenerate "
                         "(a column that separates events perfectly, or constant columns only)")

    def _path(self, X: np.ndarray, y: np.ndarray, alphas: Any = None) -> Any:
        """scikit-survival's path, fitted; where its solver overflows at the weakest penalties ("weights are too
        large", small or separable data), the weaker half of the penalties is dropped and it is fitted again
        (the path of all penalties: a larger smallest penalty). None when no penalty fits."""
        from sksurv.linear_model import CoxnetSurvivalAnalysis

        ratios = [self.alpha_min_ratio, 0.05, 0.2, 0.5] if alphas is None else [self.alpha_min_ratio]
        for ratio in ratios:
            current = None if alphas is None else np.asarray(alphas)
            while current is None or len(current):
                try:
                    return CoxnetSurvivalAnalysis(l1_ratio=self.l1_ratio, n_alphas=self.n_alphas, alphas=current,
                                                  alpha_min_ratio=ratio, max_iter=100_000).fit(X, y)
                except ArithmeticError:
                    if current is None:
                        break  # the next, larger smallest penalty
                    current = current[:len(current) // 2]
        if alphas is None:
            raise ValueError("penalised Cox (Coxnet): the solver overflows at every penalty path on these rows; the "
                             "inputs may be degenerate (a column that separates events perfectly)")
        return None

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.model_.predict(X, alpha=self.alpha_)

    @property
    def coef_(self) -> np.ndarray:
        """The log-hazard coefficients at the chosen penalty. Shapes: ``[p]``."""
        return np.asarray(self.model_.coef_, dtype=np.float64)[:, -1]

    @property
    def calibrated_coef_(self) -> np.ndarray:
        """``scale_ * coef_``: the same ranking, risks on the scale the out-of-fold data support. Shapes: ``[p]``."""
        return self.scale_ * self.coef_


def calibration_slope(risk: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """The slope ``s`` maximising Cox's partial likelihood of ``s * risk`` (1 where it cannot be fitted:
    no finite out-of-fold risk, no event, constant risk), within [0, 10]."""
    from scipy.optimize import minimize_scalar

    use = np.isfinite(risk)
    if not use.any() or not event[use].any() or np.ptp(risk[use]) == 0:
        return 1.0
    r, t, e = risk[use], time[use], event[use]
    best = minimize_scalar(lambda s: -cox_log_partial_likelihood(s * r, t, e), bounds=(0.0, 10.0), method="bounded")
    return float(best.x) if best.success else 1.0


def cox_log_partial_likelihood(eta: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """Cox's log partial likelihood of log-risks ``eta`` (Breslow's ties: a tied time's risk set holds all
    rows tied with it). Shapes: ``[N]`` each -> a float."""
    order = np.argsort(-np.asarray(time, dtype=np.float64), kind="stable")
    t, e, d = np.asarray(time, dtype=np.float64)[order], np.asarray(eta, dtype=np.float64)[order], np.asarray(event)[order]
    log_risk_set = np.logaddexp.accumulate(e)  # rows with time >= t_i, before ties are counted in
    last_tied = np.searchsorted(-t, -t, side="right") - 1
    return float(np.sum((e - log_risk_set[last_tied])[d.astype(bool)]))


def logistic_cv(seed: int = 0, min_class: int | None = None) -> Any:
    """Ridge-penalised logistic regression, its penalty chosen by CV on the log loss (``LogisticRegressionCV``);
    with fewer than 2 rows in a class (``min_class``) no CV is possible and C is 1. See :func:`fit_logistic`
    for many rows."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    if min_class is not None and min_class < 2:
        return LogisticRegression(C=1.0, max_iter=5000)
    folds = 5 if min_class is None else min(5, min_class)
    # l1_ratios=(0,): the ridge penalty said, not defaulted; use_legacy_attributes=False: C_ is one number
    return LogisticRegressionCV(Cs=10, l1_ratios=(0.0,), cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                                scoring="neg_log_loss", max_iter=5000, random_state=seed, use_legacy_attributes=False)


def ridge_cv() -> Any:
    """Ridge regression with its penalty chosen by efficient leave-one-out CV (``RidgeCV``)."""
    from sklearn.linear_model import RidgeCV

    return RidgeCV(alphas=np.logspace(-3, 3, 13))


def fit_logistic(X: np.ndarray, labels: np.ndarray, seed: int = 0, cv_rows: int = 10_000) -> Any:
    """:func:`logistic_cv` fitted; on more than ``cv_rows`` rows its penalty is chosen on a random ``cv_rows`` of
    them and the model with that penalty is then fitted on every row."""
    from sklearn.linear_model import LogisticRegression

    rows = np.arange(len(X))
    if len(X) > cv_rows:
        rows = np.sort(np.random.default_rng(seed).choice(len(X), cv_rows, replace=False))
    counts = np.bincount(labels[rows])
    model = logistic_cv(seed, min_class=int(counts[counts > 0].min()))
    with quiet_solvers():
        model.fit(X[rows], labels[rows])
        if len(rows) < len(X):
            model = LogisticRegression(C=float(np.ravel(model.C_)[0]), max_iter=5000).fit(X, labels)
    return model

