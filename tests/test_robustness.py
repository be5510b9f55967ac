"""The missing-modality robustness report: subsets, missingness shifts, MLflow, CLI."""
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from conftest import FAST
from mmclin import MultimodalClassifier, MultimodalSurvivalModel, make_synthetic_cohort
from mmclin.evaluation.robustness import (
    ALL, MissingReport, _weighted_pick, modality_subsets, outcome_driver,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fitted_three():
    c = make_synthetic_cohort(
        n_subjects=240, task="binary", modalities={"clinical": ("tabular", 5), "genes": ("genomics", 10), "labs": ("tabular", 4)},
        missing={"genes": 0.3, "labs": 0.25}, seed=3)
    tr, te = np.arange(160), np.arange(160, 240)
    clf = MultimodalClassifier(modalities=c.modalities, fusion="late", **FAST).fit(c.frame[tr], c.y[tr])
    return c, clf, tr, te


def test_subsets_all_when_few_and_sampled_when_many():
    assert modality_subsets(["c", "a", "b"]) == [("a", "b", "c"), ("a", "b"), ("a", "c"), ("b", "c"), ("a",), ("b",), ("c",)]
    names = [f"m{i}" for i in range(8)]  # 255 subsets
    subs = modality_subsets(names, max_subsets=30, seed=1)
    assert len(subs) == 30 == len(set(subs))
    assert tuple(names) in subs and all((n,) in subs for n in names)
    assert all(tuple(x for x in names if x != n) in subs for n in names)  # leave-one-out
    assert subs == modality_subsets(names, max_subsets=30, seed=1)
    with pytest.raises(ValueError, match="max_subsets must be >= 1"):
        modality_subsets(names, max_subsets=0)


def test_subset_scores_equal_scoring_a_frame_with_those_modalities_nulled(fitted_three):
    c, clf, tr, te = fitted_three
    X, y = c.frame[te], c.y[te]
    report = clf.missing_report(X, y, mechanisms=())
    sub = report.subsets
    assert sub.height == 7 and sub["fold"].unique().to_list() == [0]
    full = sub.filter(pl.col("subset") == "clinical+genes+labs").row(0, named=True)
    assert full["n_subjects"] == len(te) and full["auroc"] == pytest.approx(clf.metrics(X, y)["auroc"])
    # only genes given: the same as nulling clinical and labs in the frame and scoring the subjects with genes
    genes_only = sub.filter(pl.col("subset") == "genes").row(0, named=True)
    hidden_cols = [col for m in c.modalities if m.name != "genes" for col in m.columns]
    nulled = X.with_columns([pl.lit(None, dtype=X.schema[col]).alias(col) for col in hidden_cols])
    has = c.extra["present"]["genes"][te]
    assert genes_only["n_subjects"] == int(has.sum())
    proba = clf.predict_proba(nulled)[has]
    from sklearn.metrics import roc_auc_score

    assert genes_only["auroc"] == pytest.approx(roc_auc_score(y[has], proba[:, 1]), rel=1e-6)
    assert genes_only["genes"] and not genes_only["clinical"] and not genes_only["labs"]


def test_shift_hides_the_asked_share_and_never_a_last_modality(fitted_three):
    c, clf, tr, te = fitted_three
    report = clf.missing_report(c.frame[te], c.y[te], y_train=c.y[tr], fraction=0.5, n_repeats=2, seed=4)
    shift = report.shift
    assert set(shift["mechanism"]) == {"none", "mcar", "mar", "mnar"}
    holders = {m: int(c.extra["present"][m][te].sum()) for m in ("clinical", "genes", "labs")}
    for m, n in holders.items():
        rows = shift.filter(pl.col("hidden") == m)
        assert rows.height == 3 * 2 and (rows["n_hidden"] == round(0.5 * n)).all()
    assert (shift["n_subjects"] == len(te)).all()  # nobody lost every modality
    both = shift.filter(pl.col("hidden") == ALL)
    assert (both["n_hidden"] > max(holders.values()) * 0.5).all()
    observed = shift.filter(pl.col("mechanism") == "none").row(0, named=True)
    assert observed["auroc"] == pytest.approx(clf.metrics(c.frame[te], c.y[te])["auroc"])
    s = report.summary()["shift"]
    assert s["mechanism"].to_list()[:2] == ["none", "mcar"] and (s.filter(pl.col("mechanism") != "none")["n_draws"] == 2).all()


def test_mnar_driver_targets_sicker_subjects():
    from mmclin.tasks.survival import SURVIVAL_DTYPE
    from mmclin.registry import TASKS

    y = np.array([(True, 10.0), (True, 500.0), (False, 20.0), (False, 900.0)], dtype=SURVIVAL_DTYPE)
    d = outcome_driver(TASKS.create("cox"), y)
    assert np.argmax(d) == 0 and np.argmin(d) == 3  # earliest event highest, latest censored lowest
    binary = TASKS.create("binary").fit_targets(np.array(["no", "yes"]))
    d = outcome_driver(binary, np.array(["yes", "no", "yes", "no"]))
    assert (d[[0, 2]] > d[[1, 3]]).all()
    rng = np.random.default_rng(0)
    driver = rng.normal(size=2000)
    picked = _weighted_pick(np.arange(2000), 500, driver, 2.0, rng)
    assert len(set(picked.tolist())) == 500 and driver[picked].mean() > 0.8  # exp(2 * driver) tilts the draw
    assert abs(driver[_weighted_pick(np.arange(2000), 500, driver, 0.0, rng)].mean()) < 0.15


def test_report_errors_are_clear(fitted_three):
    c, clf, tr, te = fitted_three
    with pytest.raises(ValueError, match=r"'mechanisms' parameter of missing_report must contain only \['mcar', 'mar', 'mnar'\]. Got \['mnarr'\]"):
        clf.missing_report(c.frame[te], c.y[te], mechanisms=["mnarr"])
    with pytest.raises(ValueError, match=r"'fraction' parameter of missing_report must be in \(0, 1\]. Got 1.5"):
        clf.missing_report(c.frame[te], c.y[te], fraction=1.5)
    with pytest.raises(ValueError, match="X has 80 rows but y has 79"):
        clf.missing_report(c.frame[te], c.y[te][:-1])


def test_folds_combine_into_mean_and_spread_and_plot(tmp_path, fitted_three):
    c, clf, tr, te = fitted_three
    a = clf.missing_report(c.frame[te[:40]], c.y[te[:40]], n_repeats=1)
    b = clf.missing_report(c.frame[te[40:]], c.y[te[40:]], n_repeats=1)
    both = MissingReport.concat([a, b])
    s = both.summary()["subsets"]
    row = s.filter(pl.col("subset") == "clinical").row(0, named=True)
    per_fold = both.subsets.filter(pl.col("subset") == "clinical")["auroc"].to_numpy()
    assert row["n_folds"] == 2 and row["auroc"] == pytest.approx(per_fold.mean()) and row["auroc_std"] == pytest.approx(per_fold.std(ddof=1))
    fig = both.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(fig.axes) == 2


def test_cli_evaluate_missing_report_logs_table_and_plot_to_mlflow(tmp_path, monkeypatch, capsys):
    import mlflow

    from mmclin.interfaces.cli import main

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    args = ["evaluate", str(ROOT / "experiments" / "gse7390_survival.yaml"), "--cv", "2", "--missing-report",
            "--set", "trainer.max_epochs=2", "--set", "model.ensemble_size=1", "--set", "trainer.progress_bar=false",
            "--set", "model.fusion.name=sequential_modular", "--tracking-uri", uri]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "clinical+genes" in out and "mnar" in out and "(all)" in out
    plot = Path("outputs") / "gse7390_survival" / "missing_report.png"  # beside fit's outputs, and said where
    assert f"missing-modality plot: {plot}" in out and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("gse7390_survival")
    run = client.search_runs([exp.experiment_id], "tags.`mmclin.verb` = 'evaluate'")[0]
    files = {a.path for a in client.list_artifacts(run.info.run_id, "missing_report")}
    assert {"missing_report/subsets.parquet", "missing_report/shift.parquet", "missing_report/missing_report.png"} <= files
    assert {"missing_report/subset/clinical:genes/c_index", "missing_report/subset/genes/c_index",
            "missing_report/shift/mnar/genes/c_index", "missing_report/shift/none/c_index"} <= set(run.data.metrics)
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="missing_report/subsets.parquet",
                                                tracking_uri=uri)
    table = pl.read_parquet(local)
    assert table.height == 2 * 3 and sorted(table["fold"].unique()) == [0, 1]


def test_survival_report_uses_training_targets(boring_survival):
    c = boring_survival
    model = MultimodalSurvivalModel(modalities=c.modalities, fusion="cascaded_transformer", **FAST).fit(c.frame[:110], c.y[:110])
    report = model.missing_report(c.frame[110:], c.y[110:], y_train=c.y[:110], n_repeats=1)
    assert report.primary_metric == "c_index"
    full = report.subsets.filter(pl.col("n_modalities") == 2).row(0, named=True)
    assert full["uno_c"] == pytest.approx(model.metrics(c.frame[110:], c.y[110:], y_train=c.y[:110])["uno_c"])


def _drawn(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    return fig.canvas.get_renderer()


def _chance_lines(ax, vertical: bool) -> list:
    return [ln for ln in ax.lines if ln.get_linestyle() == ":" and
            set(np.asarray(ln.get_xdata() if vertical else ln.get_ydata(), dtype=float)) == {0.5}]


def test_plot_has_a_chance_line_an_axis_near_the_data_and_a_legend_that_covers_nothing(fitted_three):
    c, clf, tr, te = fitted_three
    report = clf.missing_report(c.frame[te], c.y[te], n_repeats=2)
    fig = report.plot()
    ax1, ax2 = fig.axes
    s = report.summary()
    sub = s["subsets"]["auroc"].to_numpy()
    shift = s["shift"]["auroc"].to_numpy()
    lo, hi = ax1.get_xlim()
    assert 0 < lo <= min(0.4, sub.min()) and max(sub.max(), 0.5) <= hi <= 1.0  # not from 0: from near the data
    lo, hi = ax2.get_ylim()
    assert 0 < lo <= min(0.4, shift.min()) and shift.max() <= hi <= 1.0
    assert len(_chance_lines(ax1, vertical=True)) == 1 and len(_chance_lines(ax2, vertical=False)) == 1
    renderer = _drawn(fig)
    assert len(fig.legends) == 1 and not ax1.get_legend() and not ax2.get_legend()
    legend = fig.legends[0].get_window_extent(renderer)
    bars = [p.get_window_extent(renderer) for ax in (ax1, ax2) for p in ax.patches]
    assert bars and not any(legend.overlaps(b) for b in bars)
    assert not any(legend.overlaps(ax.get_window_extent(renderer)) for ax in (ax1, ax2))  # outside the data area
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "chance (0.5)" in labels and any(t.startswith("MNAR") for t in labels)


def _report(metric: str, values: list[float]) -> MissingReport:
    """A two-modality report with the given metric values (subsets a+b, a, b; then observed, MCAR a/b/(all))."""
    subsets = pl.DataFrame({"fold": [0] * 3, "subset": ["a+b", "a", "b"], "n_modalities": [2, 1, 1],
                            "a": [True, True, False], "b": [True, False, True], "n_subjects": [50] * 3, metric: values[:3]})
    shift = pl.DataFrame({"fold": [0] * 4, "mechanism": ["none", "mcar", "mcar", "mcar"], "hidden": ["", "a", "b", ALL],
                          "fraction": [0.0, 0.5, 0.5, 0.5], "repeat": [0] * 4, "n_hidden": [0, 10, 10, 20],
                          "n_subjects": [50] * 4, metric: values[3:7]})
    return MissingReport(subsets, shift, ["a", "b"], metric, metric != "log_loss")


def test_plot_axis_reaches_below_chance_and_no_chance_line_without_a_chance_level():
    from mmclin.evaluation.robustness import chance_level

    assert chance_level("c_index") == chance_level("death/auroc") == chance_level("auroc/label") == 0.5
    assert chance_level("r2") is None and chance_level("log_loss") is None
    fig = _report("c_index", [0.62, 0.3, 0.58, 0.62, 0.55, 0.35, 0.5]).plot()
    ax1, ax2 = fig.axes
    assert ax1.get_xlim()[0] < 0.3 and ax2.get_ylim()[0] < 0.35  # a worse-than-chance subset stays in view
    bars = sorted(ax1.patches, key=lambda p: p.get_width())
    assert bars[0].get_x() == pytest.approx(0.5) and bars[0].get_width() == pytest.approx(0.3 - 0.5)  # from chance, leftwards
    fig = _report("r2", [0.31, 0.12, 0.2, 0.31, 0.25, 0.18, 0.1]).plot()
    assert not any(ln.get_linestyle() == ":" for ax in fig.axes for ln in ax.lines)
    _drawn(fig)
    assert "chance" not in " ".join(t.get_text() for t in fig.legends[0].get_texts())
