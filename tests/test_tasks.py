"""Tasks: the shared conformance checks for every registered task, plus targeted tests of
losses against reference computations, survival curves, validation messages and masking."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmclin.tasks  # noqa: F401  (registration)
from mmclin.registry import TASKS
from mmclin.tasks.survival import SURVIVAL_DTYPE, cox_partial_nll, to_survival_array
from mmclin.testing.task_checks import TASK_CHECKS


# --- conformance: every registered task x every check ------------------------------------------
@pytest.mark.parametrize("check", TASK_CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", TASKS.names())
def test_task_conformance(name: str, check) -> None:
    check(name)


def _surv(event, time) -> np.ndarray:
    y = np.empty(len(time), dtype=SURVIVAL_DTYPE)
    y["event"], y["time"] = event, time
    return y


def _exponential_survival(n: int, seed: int, beta: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    t = rng.exponential(10.0 * np.exp(-beta * x))
    c = rng.uniform(0.0, 25.0, n)
    return x, _surv(t <= c, np.minimum(t, c) + 0.01)


# --- Cox -------------------------------------------------------------------------------------
def _slow_breslow_nll(eta: np.ndarray, event: np.ndarray, time: np.ndarray) -> float:
    """The textbook Breslow partial likelihood by an explicit double loop."""
    total, d = 0.0, 0
    for i in range(len(time)):
        if event[i]:
            denom = sum(math.exp(eta[j]) for j in range(len(time)) if time[j] >= time[i])
            total += eta[i] - math.log(denom)
            d += 1
    return -total / d


def _slow_efron_nll(eta: np.ndarray, event: np.ndarray, time: np.ndarray) -> float:
    """Efron's partial likelihood by explicit loops over the distinct event times."""
    total, d = 0.0, 0
    for t in np.unique(time[event]):
        tied = [i for i in range(len(time)) if event[i] and time[i] == t]
        risk = sum(math.exp(eta[j]) for j in range(len(time)) if time[j] >= t)
        tied_sum = sum(math.exp(eta[i]) for i in tied)
        for rank, i in enumerate(tied):
            total += eta[i] - math.log(risk - rank / len(tied) * tied_sum)
            d += 1
    return -total / d


@pytest.mark.parametrize("ties", [False, True])
def test_cox_loss_matches_explicit_efron_and_breslow(ties: bool) -> None:
    rng = np.random.default_rng(3)
    n = 40
    time = rng.integers(1, 8, n).astype(float) if ties else rng.exponential(5.0, n) + 0.1
    event = rng.random(n) < 0.6
    eta = rng.normal(size=n)
    assert (len(np.unique(time)) < n) == ties
    args = torch.tensor(eta), torch.tensor(event, dtype=torch.float64), torch.tensor(time)
    got = cox_partial_nll(*args, ties="breslow")
    assert got.item() == pytest.approx(_slow_breslow_nll(eta, event, time), rel=1e-10)
    efron = cox_partial_nll(*args)  # the default
    assert efron.item() == pytest.approx(_slow_efron_nll(eta, event, time), rel=1e-10)
    assert (abs(efron.item() - got.item()) > 1e-3) == ties  # the same without ties
    # order of the rows does not matter
    p = rng.permutation(n)
    for how, ref in (("breslow", got), ("efron", efron)):
        again = cox_partial_nll(torch.tensor(eta[p]), torch.tensor(event[p], dtype=torch.float64), torch.tensor(time[p]),
                                ties=how)
        assert again.item() == pytest.approx(ref.item(), rel=1e-10)


def test_cox_loss_without_events_is_zero_and_connected() -> None:
    eta = torch.randn(5, requires_grad=True)
    loss = cox_partial_nll(eta, torch.zeros(5), torch.arange(1.0, 6.0))
    assert loss.item() == 0.0
    loss.backward()
    assert eta.grad is not None and torch.equal(eta.grad, torch.zeros(5))


def test_cox_recovers_sksurv_coefficient_on_whas500() -> None:
    from sksurv.datasets import load_whas500
    from sksurv.linear_model import CoxPHSurvivalAnalysis

    X, y = load_whas500()  # fields ('fstat', 'lenfol'): event first, as sksurv accepts; with ties
    x = ((X["age"] - X["age"].mean()) / X["age"].std()).to_numpy()[:, None]
    reference = CoxPHSurvivalAnalysis(ties="breslow").fit(x, y).coef_[0]
    task = TASKS.create("cox").fit_targets(y)
    torch.manual_seed(0)
    head, target, xt = task.build_head(1), task.encode(y), torch.tensor(x, dtype=torch.float32)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        task.loss(head(xt), target).backward()
        opt.step()
    assert abs(reference) > 0.5  # age matters: the comparison is not between two zeros
    assert head.weight.item() == pytest.approx(reference, abs=0.05)


def test_cox_survival_function_needs_calibrate_then_matches_breslow() -> None:
    from sksurv.linear_model.coxph import BreslowEstimator

    x, y = _exponential_survival(200, seed=1, beta=0.7)
    task = TASKS.create("cox").fit_targets(y)
    outputs = 0.7 * x[:, None]
    with pytest.raises(RuntimeError, match=r"call task\.calibrate"):
        task.survival_function(outputs)
    assert math.isnan(task.metrics(y, outputs)["integrated_brier"])  # NaN, not a crash
    task.calibrate(outputs, y)
    times = np.linspace(0.5, 20.0, 7)
    _, surv = task.survival_function(outputs[:5], times)
    ref = BreslowEstimator().fit(0.7 * x, y["event"], y["time"]).get_survival_function(0.7 * x[:5])
    np.testing.assert_allclose(surv, np.stack([f(times) for f in ref]), rtol=1e-10)
    assert task.predict(outputs).tolist() == outputs[:, 0].tolist()  # risk = log-risk, higher = worse


@pytest.mark.parametrize("name", ["cox", "discrete_time"])
def test_survival_curves_are_probabilities_and_non_increasing(name: str) -> None:
    _, y = _exponential_survival(100, seed=2)
    task = TASKS.create(name).fit_targets(y)
    outputs = np.random.default_rng(0).normal(scale=3.0, size=(100, task.output_dim))
    task.calibrate(outputs, y)
    times = np.r_[0.001, np.sort(y["time"]), 1e6]  # before the first and after the last time too
    for grid in (None, times):
        t, surv = task.survival_function(outputs, grid)
        assert surv.shape == (100, len(t))
        assert np.all((surv >= 0) & (surv <= 1))
        assert np.all(np.diff(surv, axis=1) <= 1e-12)


# --- discrete time ---------------------------------------------------------------------------
def test_discrete_time_matches_kaplan_meier_with_constant_features() -> None:
    from sksurv.nonparametric import kaplan_meier_estimator

    _, y = _exponential_survival(1000, seed=0)
    task = TASKS.create("discrete_time", n_bins=10).fit_targets(y)
    assert task.output_dim == 10
    np.testing.assert_allclose(task.edges_, np.quantile(y["time"][y["event"]], np.linspace(0.1, 1, 10)))
    torch.manual_seed(0)
    head, target, x = task.build_head(1), task.encode(y), torch.ones(1000, 1)
    opt = torch.optim.Adam(head.parameters(), lr=0.1)
    losses = []
    for _ in range(300):
        opt.zero_grad()
        loss = task.loss(head(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    times, surv = task.survival_function(head(x[:1]).detach().numpy())
    km_t, km_s = kaplan_meier_estimator(y["event"], y["time"])
    km = km_s[np.searchsorted(km_t, times, side="right") - 1]
    assert np.max(np.abs(surv[0] - km)) < 0.05


def test_discrete_time_intervals_by_hand() -> None:
    task = TASKS.create("discrete_time", n_bins=2).fit_targets(_surv([1, 1, 1, 0], [1.0, 2.0, 4.0, 9.0]))
    np.testing.assert_allclose(task.edges_, [2.0, 4.0])  # median and max of the event times
    y = _surv([1, 0, 0, 1, 0, 1], [2.0, 0.9, 1.1, 3.0, 3.5, 5.0])
    interval, event = task.intervals(y)
    # event at 2 -> (0, 2]; censored 0.9 < mid 1 -> 0; 1.1 >= 1 -> credited (0, 2];
    # event 3 -> (2, 4]; censored 3.5 >= mid 3 -> both; event after the last edge -> censored there
    assert interval.tolist() == [0, 0, 1, 1, 2, 2]
    assert event.tolist() == [1, 0, 0, 1, 0, 0]
    # risk = -RMST: a sure early death is riskier than a sure survivor
    assert task.predict(np.array([[9.0, 9.0], [-9.0, -9.0]])).tolist()[0] > task.predict(np.array([[-9.0, -9.0]]))[0]


# --- survival targets and metrics ----------------------------------------------------------------
@pytest.mark.parametrize(
    "event, time, message",
    [
        ([1, 0, 1], [1.0, 0.0, 2.0],
         "'time' must be finite and > 0; row 1 has 0.0 (events on the day of inclusion: add a small offset "
         "such as 0.5 day)."),
        ([1, 0, 1], [1.0, 2.0, -3.0], "'time' must be finite and > 0; row 2 has -3.0."),
        ([1, 0, 1], [1.0, np.nan, 2.0], "'time' must be finite and > 0; row 1 has nan."),
        ([1, 0, 1], [1.0, 2.0, np.inf], "'time' must be finite and > 0; row 2 has inf."),
        ([1, 2, 1], [1.0, 2.0, 3.0], "'event' must be 0/1 or bool; row 1 has 2. All events are 1 or 2: R's survival "
         "coding (1 = censored, 2 = event)? Then give event == 2 as the event (e.g. pl.col('event') == 2)."),
        ([1, 0, 1], [1.0, 2.0], "'event' has 3 samples but 'time' has 2."),
    ],
)
def test_survival_validation_messages_are_exact(event, time, message) -> None:
    with pytest.raises(ValueError) as info:
        to_survival_array((np.array(event), np.array(time)))
    assert str(info.value) == message


def test_survival_fit_needs_an_event() -> None:
    with pytest.raises(ValueError) as info:
        TASKS.create("cox").fit_targets({"event": [0, 0], "time": [1.0, 2.0]})
    assert str(info.value) == (
        "survival targets have no event (all 2 samples are censored); at least one event is needed."
    )


def test_survival_target_forms_agree() -> None:
    event, time = np.array([True, False, True]), np.array([3.0, 1.0, 2.0])
    other_names = np.array(list(zip(event, time)), dtype=[("fstat", "?"), ("lenfol", "<f8")])
    forms = [_surv(event, time), other_names, {"event": event.astype(int), "time": time}, (event, time)]
    for form in forms:
        np.testing.assert_array_equal(to_survival_array(form), _surv(event, time))


def _harrell_by_hand(y: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C by its definition: pairs (i, j) with an event at T_i and T_j > T_i, or T_j = T_i censored (the
    censored subject outlived the event); concordant if risk_i > risk_j, a tied risk counts one half."""
    num = den = 0.0
    for i in np.flatnonzero(y["event"]):
        for j in range(len(y)):
            if y["time"][j] > y["time"][i] or (y["time"][j] == y["time"][i] and not y["event"][j]):
                den += 1
                num += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return num / den


def test_harrell_c_on_a_tied_example_counted_by_hand() -> None:
    """Risk ties (one half) and an event tied in time with a censoring (comparable): 10 of 12 pairs."""
    y = _surv(np.array([1, 1, 0, 1, 1, 0], dtype=bool), np.array([1.0, 2.0, 2.0, 3.0, 4.0, 5.0]))
    risk = np.array([4.0, 3.0, 3.0, 1.0, 3.0, 0.0])
    assert _harrell_by_hand(y, risk) == 10 / 12
    task = TASKS.create("cox").fit_targets(y)
    assert task.metrics(y, risk[:, None])["c_index"] == pytest.approx(10 / 12, abs=1e-12)
    assert task.metrics(y, -risk[:, None])["c_index"] == pytest.approx(1 - 10 / 12, abs=1e-12)  # ties stay one half


def test_survival_metrics_nan_when_undefined_and_uno_without_train() -> None:
    x, y = _exponential_survival(200, seed=4, beta=1.0)
    task = TASKS.create("cox").fit_targets(y[:100])
    task.calibrate(x[:100, None], y[:100])
    good = task.metrics(y[100:], x[100:, None], y_train=y[:100])
    # the true log-risk scores: Harrell's C is the hand count; Uno's C estimates the censoring-free population value
    # E[sigmoid(|x_i - x_j|)] = 0.725 (x ~ N(0, 1), beta 1; measured 0.709 here, 0.717-0.734 on seeds 5-7)
    assert good["c_index"] == pytest.approx(_harrell_by_hand(y[100:], x[100:]), abs=1e-12)
    assert abs(good["uno_c"] - 0.725) < 0.06 and good["mean_auc"] > 0.7, good
    # the direction is read from the outputs: the negated score is exactly the mirror (no tied scores here)
    flipped = task.metrics(y[100:], -x[100:, None], y_train=y[:100])
    for name in ("c_index", "uno_c", "mean_auc"):
        assert good[name] + flipped[name] == pytest.approx(1.0, abs=1e-9), name
    # the Brier score knows a calibrated true risk from noise (measured 0.189 vs 0.270)
    noise = task.metrics(y[100:], np.random.default_rng(4).normal(size=(100, 1)), y_train=y[:100])
    assert good["integrated_brier"] < 0.25 and noise["integrated_brier"] > good["integrated_brier"] + 0.03
    assert task.score(y[100:], x[100:, None]) == good["c_index"]
    assert np.isfinite(list(task.metrics(y[100:], x[100:, None]).values())).all()  # y_true as IPCW reference
    censored = y[100:110].copy()
    censored["event"] = False
    assert all(math.isnan(v) for v in task.metrics(censored, x[100:110, None], y_train=y[:100]).values())


# --- classification ----------------------------------------------------------------------------
def test_binary_labels_probabilities_and_undefined_metrics() -> None:
    task = TASKS.create("binary").fit_targets(["no", "yes", "yes"])
    outputs = np.array([[-2.0], [3.0], [0.5]])
    assert task.predict(outputs).tolist() == ["no", "yes", "yes"]
    proba = task.predict_proba(outputs)
    assert proba.shape == (3, 2) and np.allclose(proba.sum(1), 1) and proba[1, 1] > 0.9
    assert task.encode(["yes", "no"]).tolist() == [[1.0], [0.0]]
    one_class = task.metrics(["yes", "yes", "yes"], outputs)
    assert math.isnan(one_class["auroc"]) and math.isnan(one_class["auprc"])
    assert one_class["accuracy"] == pytest.approx(2 / 3) and task.score(["yes"] * 3, outputs) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"row 1 is 'maybe'"):
        task.encode(["no", "maybe"])
    assert TASKS.create("binary").fit_targets(np.array([1, 1, 1, 0])).classes_.tolist() == [0, 1]
    with pytest.raises(ValueError, match="one class only"):  # nothing to learn to tell apart
        TASKS.create("binary").fit_targets(np.zeros(4, dtype=int))


def test_binary_loss_is_bce() -> None:
    task = TASKS.create("binary").fit_targets([0, 1])
    out, y = torch.tensor([[0.3], [-1.2]]), task.encode([1, 0])
    assert task.loss(out, y).item() == pytest.approx(F.binary_cross_entropy_with_logits(out, y).item())


def test_multiclass_classes_and_metrics() -> None:
    task = TASKS.create("multiclass").fit_targets(["b", "c", "a", "b"])
    assert task.output_dim == 3 and task.classes_.tolist() == ["a", "b", "c"]
    outputs = np.array([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0]])
    assert task.predict(outputs).tolist() == ["a", "b", "c"]
    assert np.allclose(task.predict_proba(outputs).sum(1), 1)
    m = task.metrics(["a", "b", "c"], outputs)
    assert m["accuracy"] == 1.0 and m["auroc"] == 1.0 and m["f1"] == 1.0
    target = task.encode(["c", "a"])
    assert task.loss(torch.tensor([[0.0, 0, 2], [1.0, 0, 0]]), target).item() == pytest.approx(
        F.cross_entropy(torch.tensor([[0.0, 0, 2], [1.0, 0, 0]]), torch.tensor([2, 0])).item()
    )


def test_multilabel_label_names_and_metrics() -> None:
    task = TASKS.create("multilabel", labels=["sepsis", "aki"]).fit_targets(np.array([[0, 1], [1, 1]]))
    outputs = np.array([[2.0, 2.0], [-2.0, 2.0], [2.0, 2.0]])
    assert task.predict(outputs).tolist() == [[1, 1], [0, 1], [1, 1]]
    m = task.metrics(np.array([[1, 1], [0, 1], [1, 1]]), outputs)
    assert m["accuracy"] == 1.0 and m["auroc/sepsis"] == 1.0 and math.isnan(m["auroc/aki"])
    assert m["auroc"] == 1.0  # macro over the labels where AUROC is defined


# --- regression ---------------------------------------------------------------------------------
def test_regression_standardisation_is_fitted_on_training_targets_only() -> None:
    y_train, y_test = np.array([10.0, 20.0, 30.0]), np.array([100.0, 200.0])
    task = TASKS.create("regression").fit_targets(y_train)
    assert (task.mean_, task.scale_) == (pytest.approx(20.0), pytest.approx(np.std(y_train)))
    z = task.encode(y_test)
    assert (task.mean_, task.scale_) == (pytest.approx(20.0), pytest.approx(np.std(y_train)))  # unchanged
    np.testing.assert_allclose(z.numpy()[:, 0], (y_test - 20.0) / np.std(y_train), rtol=1e-6)
    np.testing.assert_allclose(task.predict(z.numpy()), y_test, rtol=1e-6)
    assert task.metrics(y_test, z.numpy())["r2"] == pytest.approx(1.0)
    huber = TASKS.create("regression", loss="huber").fit_targets(y_train)
    assert huber.loss(torch.tensor([[3.0]]), torch.tensor([[0.0]])).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match=r"must be one of .*Got 'mae' instead"):
        TASKS.create("regression", loss="mae")
    with pytest.raises(ValueError, match=r"row 1 is nan"):
        task.encode([1.0, np.nan])


def test_unknown_option_suggests_the_closest() -> None:
    with pytest.raises(TypeError, match=r"Unknown option 'nbins' for task 'discrete_time'. Did you mean 'n_bins'\?"):
        TASKS.create("discrete_time", nbins=5)


# --- multitask ----------------------------------------------------------------------------------
def _multitask():
    return TASKS.create(
        "multitask", tasks={"los": {"name": "regression"}, "death": {"name": "binary"}}, weights={"los": 0.5}
    )


def test_multitask_masks_missing_sub_labels() -> None:
    y = {"death": np.array([0, None, 1, 1], dtype=object), "los": np.array([1.0, 2.0, np.nan, 4.0])}
    task = _multitask().fit_targets(y)
    assert task.tasks["los"].mean_ == pytest.approx(np.mean([1.0, 2.0, 4.0]))  # fitted on labelled rows
    target = task.encode(y)
    assert target.shape == (4, 2) and torch.isnan(target[1, 0]) and torch.isnan(target[2, 1])
    outputs = torch.randn(4, 2, requires_grad=True)
    loss = task.loss(outputs, target)
    keep_d, keep_l = [0, 2, 3], [0, 1, 3]
    expected = F.binary_cross_entropy_with_logits(outputs[keep_d, 0], target[keep_d, 0]) + 0.5 * F.mse_loss(
        outputs[keep_l, 1], target[keep_l, 1]
    )
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert outputs.grad[1, 0] == 0 and outputs.grad[2, 1] == 0  # masked, not imputed
    assert outputs.grad[0, 0] != 0 and outputs.grad[1, 1] != 0
    # a batch in which one sub-task has no label at all
    only = task.loss(outputs[1:2], target[1:2])
    assert torch.isfinite(only)

    preds = task.predict(outputs.detach().numpy())
    assert set(preds) == {"death", "los"} and preds["death"].shape == (4,)
    metrics = task.metrics(y, outputs.detach().numpy())
    assert task.primary_metric == "death/auroc" and "los/r2" in metrics and "death/auroc" in metrics
    state = json.loads(json.dumps(task.state_dict()))
    other = _multitask()
    other.load_state_dict(state)
    assert torch.equal(torch.nan_to_num(other.encode(y)), torch.nan_to_num(target))


def test_multitask_accepts_dataframes_and_checks_keys() -> None:
    import pandas as pd
    import polars as pl

    rows = {"death": [0, 1, None, 1], "los": [1.0, None, 3.0, 4.0]}
    task = _multitask().fit_targets(rows)
    expected = torch.nan_to_num(task.encode(rows), nan=-1)
    for frame in (pl.DataFrame(rows), pd.DataFrame(rows)):
        assert torch.equal(torch.nan_to_num(task.encode(frame), nan=-1), expected)
    with pytest.raises(ValueError, match=r"missing \['los'\], unexpected \['los_days'\]"):
        task.encode({"death": [0, 1], "los_days": [1.0, 2.0]})
    with pytest.raises(ValueError, match=r"'los' has 1 samples but 'death' has 2"):
        task.encode({"death": [0, 1], "los": [1.0]})


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_cox_loss_matches_scikit_survival_coefficients_on_a_tied_real_cohort(ties):
    """Veterans (31 tied event times): the linear Cox model fitted by minimising mmclin's partial
    likelihood has scikit-survival's CoxPHSurvivalAnalysis(ties=...) coefficients."""
    from sksurv.column import encode_categorical
    from sksurv.datasets import load_veterans_lung_cancer
    from sksurv.linear_model import CoxPHSurvivalAnalysis

    from mmclin.tasks.survival import cox_partial_nll

    X, y = load_veterans_lung_cancer()
    X = encode_categorical(X).to_numpy(float)
    X = (X - X.mean(0)) / X.std(0)
    event, time = (np.ascontiguousarray(y[f]) for f in y.dtype.names)
    assert len(time[event]) - len(np.unique(time[event])) > 20  # really tied
    beta = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([beta], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe")
    xt, et, tt = torch.tensor(X), torch.tensor(event, dtype=torch.float64), torch.tensor(time, dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = cox_partial_nll(xt @ beta, et, tt, ties)
        loss.backward()
        return loss

    opt.step(closure)
    np.testing.assert_allclose(beta.detach().numpy(), CoxPHSurvivalAnalysis(ties=ties).fit(X, y).coef_, atol=1e-6)
    if ties == "efron":  # the two differ on this cohort, so the test tells them apart
        other = CoxPHSurvivalAnalysis(ties="breslow").fit(X, y).coef_
        assert np.abs(beta.detach().numpy() - other).max() > 1e-3


def test_cox_times_stay_float64_so_close_times_are_not_tied():
    from mmclin.tasks.survival import CoxTask

    task = CoxTask()
    # times in seconds (half a year = 1.6e7 s) or fractional days over centuries: float32 merges neighbours
    times = [16777216.0, 16777217.0]
    y = np.array([(True, t) for t in times], dtype=[("event", bool), ("time", float)])
    target = task.encode(y)
    assert target.dtype == torch.float64 and target[0, 1] != target[1, 1]
    assert torch.tensor(times, dtype=torch.float32).unique().numel() == 1  # what float32 did
    assert CoxTask(ties="breslow").ties == "breslow" and CoxTask().ties == "efron"
    with pytest.raises(ValueError, match="'ties' option of the cox task must be 'efron' or 'breslow'. Got 'exact'"):
        CoxTask(ties="exact")
