"""Explanations: sanity on planted signal, completeness, every fusion head, survival targets,
reports, MLflow and the CLI verb."""
import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from conftest import encoder_params
from mmclin import MultimodalClassifier, MultimodalRegressor, MultimodalSurvivalModel, make_synthetic_cohort
from mmclin.explain import Explanation, explain
from mmclin.explain.checks import EXPLAIN_FUSION_CHECKS, check_encoder_attributions, example_cohort, untrained_model
from mmclin.explain.sanity import randomisation_check, shuffled_weights
from mmclin.registry import ENCODERS, FUSIONS, load_builtin_components

load_builtin_components()

MODS = {"clinical": ("tabular", 6), "genes": ("genomics", 16)}
# thresholds of the planted-signal checks (docs/explanations.md states them)
MODALITY_SHARE = 0.7  # outcome depends only on modality A: A gets >= 70 % of the mean |Shapley value|
SHUFFLED_SHARE_DROP = 0.2  # shuffled weights: the planted features' share of their modality's attribution drops by >= 0.2
QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "gse7390_survival.yaml"
FAST = ["--set", "trainer.max_epochs=3", "--set", "model.ensemble_size=1", "--set", "trainer.progress_bar=false"]


@pytest.mark.parametrize("check", EXPLAIN_FUSION_CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_explanation_checks_every_fusion_head(fusion, check):
    check(fusion)


def _declares_inputs(name: str) -> bool:
    from mmclin.explain import attributable_inputs

    return bool(attributable_inputs(ENCODERS.get(name).example()))


@pytest.mark.parametrize("encoder", encoder_params(ENCODERS.names(), keep=_declares_inputs))  # notes_hf only when transformers is installed
def test_encoder_attributions_add_up(encoder):
    check_encoder_attributions(encoder)


def _planted(a: str, seed: int = 0):
    """A regression model trained where the outcome depends only on modality ``a`` (signal 2.0)."""
    other = next(m for m in MODS if m != a)
    c = make_synthetic_cohort(n_subjects=600, modalities=MODS, task="regression", signal={a: 2.0, other: 0.0}, seed=seed)
    # trained on complete subjects without modality dropout (the default hides a modality 10% of the time): the
    # checks compare attributions with the planted contribution, which is what such a model learns; with dropout
    # the shuffled-weights share fell by 0.16, not 0.2 (0.856 -> 0.697, clinical), the other checks held
    est = MultimodalRegressor(modalities=c.modalities, max_epochs=40, batch_size=100, learning_rate=3e-3,
                              weight_decay=1e-2, val_fraction=0.0, patience=None, random_state=0, modality_dropout=0.0,
                              encoder_options={"clinical": {"n_layers": 0}, "genes": {"n_layers": 1}})
    return c, est.fit(c.frame[:-100], c.y[:-100])


@pytest.fixture(scope="module", params=["genes", "clinical"])
def planted(request):
    c, est = _planted(request.param)
    return request.param, c, est, est.explain(c.frame[-100:])


def test_planted_modality_gets_most_attribution(planted):
    a, c, est, expl = planted
    s = expl.summary("modality")
    share = dict(zip(s["modality"], s["share"]))
    assert share[a] >= MODALITY_SHARE, f"planted modality {a!r} got {share[a]:.3f} of the attribution"
    assert s["modality"][0] == a
    # per subject, not only on average: the planted modality's Shapley value follows its planted contribution
    # sum_j beta_j (x_j - training mean_j) (random or constant values would not: measured r 0.96 genes, 0.99 clinical)
    X, train = c.frame[-100:], c.frame[:-100]
    coef = dict(zip(next(m for m in c.modalities if m.name == a).columns, c.extra["coefficients"][a][:, 0]))
    contribution = np.nansum([b * (X[col].to_numpy() - np.nanmean(train[col].to_numpy()))
                              for col, b in coef.items() if col in c.extra["informative_columns"][a]], 0)
    m = expl.modality.filter(pl.col("modality") == a).sort("row")
    r = np.corrcoef(m["attribution"].to_numpy(), contribution[m["row"].to_numpy()])[0, 1]
    assert r > 0.85, f"{a}: per-subject Shapley value vs planted contribution r = {r:.3f}"


def test_planted_feature_ranks_first(planted):
    a, c, est, expl = planted
    informative = c.extra["informative_columns"][a]  # coefficients (1, -0.8, 0.6) x 2
    f = expl.summary("feature")
    assert f["feature"][0] == informative[0], f.head(5)
    assert sorted(f.filter(pl.col("modality") == a)["feature"][:3].to_list()) == sorted(informative)
    # noise features of the planted modality stay near zero (measured: mean |IG| 0.12x genes, 0.27x clinical)
    own = f.filter(pl.col("modality") == a)
    noise = own.filter(~pl.col("feature").is_in(informative))["mean_abs"].mean()
    assert noise < 0.4 * own.filter(pl.col("feature").is_in(informative))["mean_abs"].mean(), own
    # the outcome is linear in the planted features, so the learnt function is close to k * sum_j beta_j x_j and IG
    # is close to its closed form k * beta_j * (x_j - training mean_j), with ONE k for every informative feature
    # and subject (measured R^2 0.92 genes, 0.99 clinical; shuffled, random or constant attributions give ~0)
    X, train = c.frame[-100:], c.frame[:-100]
    coef = dict(zip(next(m for m in c.modalities if m.name == a).columns, c.extra["coefficients"][a][:, 0]))
    closed, got = [], []
    for col in informative:
        g = expl.feature.filter((pl.col("feature") == col) & ~pl.col("missing")).sort("row")
        closed.append(coef[col] * (X[col].to_numpy()[g["row"].to_numpy()] - np.nanmean(train[col].to_numpy())))
        got.append(g["attribution"].to_numpy())
    closed, got = np.concatenate(closed), np.concatenate(got)
    k = closed @ got / (closed @ closed)
    r2 = 1 - ((got - k * closed) ** 2).sum() / ((got - got.mean()) ** 2).sum()
    assert k > 0 and r2 > 0.8, f"{a}: IG vs k * beta * (x - mean): k = {k:.3f}, R^2 = {r2:.3f}"


def test_shuffling_the_weights_destroys_the_explanation(planted):
    a, c, est, expl = planted
    X = c.frame[-100:]
    informative = c.extra["informative_columns"][a]

    def planted_share(e: Explanation) -> float:
        f = e.summary("feature").filter(pl.col("modality") == a)
        return f.filter(pl.col("feature").is_in(informative))["mean_abs"].sum() / f["mean_abs"].sum()

    shuffled = explain(shuffled_weights(est.model_, seed=0), X)
    # the share's chance level depends on the design (a numeric column also enters the linear path through its hinges,
    # and 3 of the 4 numeric clinical columns are planted), so the drop is measured from the trained model's share
    assert planted_share(expl) >= 0.6
    assert planted_share(shuffled) <= planted_share(expl) - SHUFFLED_SHARE_DROP
    rho = randomisation_check(est.model_, X, seed=0)
    assert abs(rho["feature_per_subject"]) < 0.4 and abs(rho["modality_per_subject"]) < 0.5, rho
    # the original model is untouched by the check
    np.testing.assert_allclose(est.explain(X, levels="modality").modality["attribution"].to_numpy(),
                               expl.modality["attribution"].to_numpy())


class _PolyEncoder(torch.nn.Module):
    """One token ``[w . x, v . x^2]``: with a summing fusion the network computes ``f(x) = w . x + v . x^2``."""

    output_dim = 2

    def __init__(self, w: torch.Tensor, v: torch.Tensor, baseline: torch.Tensor) -> None:
        super().__init__()
        self.w, self.v, self.b = w, v, baseline

    def forward(self, inputs):
        from mmclin.batch import ModalityTokens

        x = inputs["x"]
        t = torch.stack([(self.w * x).sum(-1), (self.v * x**2).sum(-1)], -1).unsqueeze(1)
        return ModalityTokens(t, torch.ones(len(x), 1, dtype=torch.bool))

    def attributable_inputs(self):
        from mmclin.explain.attributable import AttributableInput

        return [AttributableInput(key="x", baseline=lambda enc, x, inp: enc.b.expand_as(x), baseline_text="b")]


class _SumFusion(torch.nn.Module):
    def forward(self, tokens, present):
        from mmclin.batch import FusionOutput

        return FusionOutput(sum(t.tokens[:, 0].sum(-1, keepdim=True) for t in tokens.values()))


def test_integrated_gradients_match_their_closed_form():
    """IG of f(x) = w . x + v . x^2 from baseline b is w (x - b) + v (x^2 - b^2), exactly (Gauss-Legendre is exact
    for this polynomial path integral). Gradient x input would give w x + 2 v x^2, a zero baseline w x + v x^2, an
    endpoint gradient w (x - b) + 2 v x (x - b): each is off by O(1) on these inputs."""
    from types import SimpleNamespace

    from mmclin.explain.features import integrated_gradients
    from mmclin.explain.targets import resolve_target
    from mmclin.training.model import MultimodalNet

    g = torch.Generator().manual_seed(0)
    x, b = torch.randn(6, 5, generator=g), torch.randn(5, generator=g)
    w, v = torch.tensor([2.0, -1.0, 0.5, 0.0, 0.0]), torch.tensor([0.0, 1.0, -2.0, 0.5, 0.0])
    net = MultimodalNet({"m": _PolyEncoder(w, v, b)}, _SumFusion(), torch.nn.Identity()).eval()
    present = {"m": torch.ones(6, dtype=torch.bool)}
    out = net({"m": {"x": x}}, present)[0].detach().numpy()
    tgt = resolve_target(SimpleNamespace(task_name="raw", output_dim=1, problem="regression"), out)
    _, attrs, reference, _ = integrated_gradients(net, {"m": {"x": x}}, present, tgt, np.arange(6), n_steps=8)
    expected = w * (x - b) + v * (x**2 - b**2)
    torch.testing.assert_close(attrs[0].double(), expected.double(), rtol=0, atol=1e-5)
    assert (attrs[0][:, 4].abs() < 1e-6).all()  # a feature the function ignores gets nothing
    np.testing.assert_allclose(reference.numpy(), (w * b + v * b**2).sum().item(), rtol=1e-6)  # f(b)


def test_ensemble_explanations_add_up():
    c = example_cohort()
    fitted = untrained_model(c, "concat", ensemble_size=3)
    expl = explain(fitted, c.frame, n_steps=16)
    np.testing.assert_allclose(expl.outputs["output"].to_numpy(), fitted.predict_outputs(c.frame)[:, 0], rtol=1e-4, atol=1e-5)
    # categorical embeddings: one IG input per member, summed into one row per column
    cat = expl.feature.filter(pl.col("input") == "categorical")
    assert cat.group_by("row", "modality", "feature").len()["len"].max() == 1
    assert expl.info["ensemble_size"] == 3
    # the ensemble averages its members' outputs, and both IG and Shapley values are linear in the explained
    # function: the ensemble's attributions are the mean of each member's own explanation (the members differ
    # from one another by up to ~0.17, the mean matches to ~1e-8)
    import copy

    feats, mods = [], []
    for member in fitted.net.members:
        alone = copy.copy(fitted)
        alone.net = member
        e = explain(alone, c.frame, n_steps=16)
        feats.append(e.feature.sort("row", "modality", "feature")["attribution"].to_numpy())
        mods.append(e.modality.sort("row", "modality")["attribution"].to_numpy())
    assert np.abs(feats[0] - feats[1]).max() > 1e-2  # the members really differ, so the mean is a real check
    np.testing.assert_allclose(expl.feature.sort("row", "modality", "feature")["attribution"].to_numpy(),
                               np.mean(feats, 0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(expl.modality.sort("row", "modality")["attribution"].to_numpy(), np.mean(mods, 0),
                               rtol=1e-4, atol=1e-6)


def test_batching_does_not_change_the_explanation():
    c = example_cohort()
    fitted = untrained_model(c, "late")
    a = explain(fitted, c.frame, n_steps=16, batch_size=256)
    b = explain(fitted, c.frame, n_steps=16, batch_size=5)
    for level in ("modality", "feature"):
        np.testing.assert_allclose(a.frames()[level]["attribution"].to_numpy(), b.frames()[level]["attribution"].to_numpy(),
                                   rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # IG still gets its gradients
        assert explain(fitted, c.frame.head(3), levels="feature", n_steps=4).feature.height > 0


def test_sampled_shapley_beyond_eight_modalities_is_complete_and_close_to_exact():
    mods = {f"m{i}": ("tabular", 2) for i in range(9)}
    c = make_synthetic_cohort(n_subjects=30, modalities=mods, task="regression", missing={"m3": 0.3}, seed=0)
    fitted = untrained_model(c, "concat", fusion_options={"d_model": 8})
    sampled = explain(fitted, c.frame, levels="modality", n_samples=200)  # auto: 9 > 8 modalities -> sampling
    assert sampled.info["shapley_method"] == "sampling"
    assert sampled.completeness()["modality_max_error"] < 1e-5
    exact = explain(fitted, c.frame, levels="modality", method="exact")
    err = np.abs(sampled.modality["attribution"].to_numpy() - exact.modality["attribution"].to_numpy()).max()
    scale = np.abs(exact.modality["attribution"].to_numpy()).max()
    assert err < 0.2 * scale, (err, scale)
    with pytest.raises(ValueError, match="need 2\\^11 coalitions"):
        c11 = make_synthetic_cohort(n_subjects=8, modalities={f"m{i}": ("tabular", 1) for i in range(11)}, task="regression")
        explain(untrained_model(c11, "concat"), c11.frame, levels="modality", method="exact")


def test_survival_risk_and_horizon_targets(boring_survival):
    c = boring_survival
    for task in ("cox", "discrete_time"):
        model = MultimodalSurvivalModel(modalities=c.modalities, task=task, max_epochs=5, batch_size=64, random_state=0).fit(c.frame, c.y)
        horizon = float(np.median(c.y["time"]))
        risk = model.explain(c.frame, levels="modality")
        np.testing.assert_allclose(risk.outputs["output"].to_numpy(), model.predict(c.frame), rtol=1e-4, atol=1e-5)
        surv = model.explain(c.frame, horizon=horizon, n_steps=16)
        _, s = model.predict_survival_function(c.frame, times=[horizon])
        np.testing.assert_allclose(surv.outputs["output"].to_numpy(), s[:, 0], rtol=1e-4, atol=1e-5)
        assert surv.completeness()["modality_max_error"] < 1e-5
        assert f"S({horizon:g} time units | x)" in surv.info["target"]  # the model does not know the unit
        # survival falls as risk rises: attributions to the risk and to S(t) point opposite ways overall
        both = risk.modality.join(surv.modality, on=["row", "modality"], suffix="_s").filter(pl.col("present"))
        assert np.corrcoef(both["attribution"], both["attribution_s"])[0, 1] < 0
    with pytest.raises(ValueError, match="before the first"):
        model.explain(c.frame, horizon=1e-3)


def test_classification_targets_and_errors(boring_binary):
    c = boring_binary
    clf = MultimodalClassifier(modalities=c.modalities, max_epochs=3, random_state=0).fit(c.frame, c.y)
    e = clf.explain(c.frame.head(10), levels="modality")
    logit = np.log(clf.predict_proba(c.frame.head(10))[:, 1] / clf.predict_proba(c.frame.head(10))[:, 0])
    np.testing.assert_allclose(e.outputs["output"].to_numpy(), logit, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="'horizon' applies to survival tasks only"):
        clf.explain(c.frame, horizon=100)
    with pytest.raises(ValueError, match="unknown explanation level"):
        clf.explain(c.frame, levels=("modality", "pixels"))
    with pytest.raises(ValueError, match="The 'method' parameter of explain must be one of"):
        clf.explain(c.frame, method="kernel")
    with pytest.raises(ValueError, match="level\\(s\\) \\['patch'\\]: no encoder of this model declares"):
        clf.explain(c.frame, levels=("patch",))
    with pytest.raises(ValueError, match="lacks columns: modality 'clinical' needs column 'clinical_0'"):
        clf.explain(c.frame.drop("clinical_0"))

    mc = make_synthetic_cohort(n_subjects=90, task="multiclass", n_classes=3, seed=4)
    m = MultimodalClassifier(modalities=mc.modalities, max_epochs=2, random_state=0).fit(mc.frame, mc.y)
    default = m.explain(mc.frame, levels="modality")
    assert default.outputs["target"].to_list() == [str(v) for v in m.predict(mc.frame)]
    one = m.explain(mc.frame, levels="modality", target=m.classes_[0])
    assert set(one.outputs["target"]) == {str(m.classes_[0])}
    np.testing.assert_allclose(np.exp(one.outputs["output"].to_numpy()), m.predict_proba(mc.frame)[:, 0], rtol=1e-4)
    with pytest.raises(ValueError, match="is not one of the classes"):
        m.explain(mc.frame, target="nope")


def test_multitask_target_selects_a_subtask():
    from mmclin.explain.targets import resolve_target
    from mmclin.tasks.multitask import MultiTask

    task = MultiTask(tasks={"death": {"name": "binary"}, "los": {"name": "regression"}})
    task.fit_targets({"death": np.array([0, 1, 1, 0]), "los": np.array([1.0, 3.0, 5.0, 7.0])})
    out = np.array([[0.5, 1.0], [-0.5, 0.0]])
    t = resolve_target(task, out, "los")
    torch.testing.assert_close(t.columns(torch.tensor(out, dtype=torch.float32))[:, 0],
                               torch.tensor(out[:, 1] * task.tasks["los"].scale_ + task.tasks["los"].mean_, dtype=torch.float32))
    assert resolve_target(task, out).description.startswith("death:")
    with pytest.raises(ValueError, match="not a sub-task"):
        resolve_target(task, out, "stay")


def test_gene_sets_sum_their_genes():
    c = example_cohort()
    genes = next(m for m in c.modalities if m.name == "genes")
    groups = {"first": genes.columns[:3], "rest": genes.columns[3:]}
    c.modalities = [m.model_copy(update={"options": {"groups": groups}}) if m.name == "genes" else m for m in c.modalities]
    fitted = untrained_model(c, "concat")
    expl = explain(fitted, c.frame, levels="feature", n_steps=8)
    gs = expl.gene_set.sort("row", "gene_set")
    by_hand = (expl.feature.filter(pl.col("modality") == "genes")
               .with_columns(pl.when(pl.col("feature").is_in(groups["first"])).then(pl.lit("first")).otherwise(pl.lit("rest")).alias("gene_set"))
               .group_by("row", "gene_set").agg(pl.col("attribution").sum()).sort("row", "gene_set"))
    np.testing.assert_allclose(gs["attribution"].to_numpy(), by_hand["attribution"].to_numpy(), rtol=1e-6, atol=1e-9)
    assert set(gs["n_genes"]) == {3, 5}
    assert expl.summary("gene_set").columns[:2] == ["modality", "gene_set"]


def test_feature_frame_values_and_missing_cells(boring_binary):
    c = boring_binary
    fitted = untrained_model(c, "concat")
    expl = explain(fitted, c.frame, levels="feature", n_steps=8)
    f = expl.feature
    assert f["row"].n_unique() == c.frame.height
    genes_rows = f.filter(pl.col("modality") == "genes")["row"].unique().to_numpy()
    np.testing.assert_array_equal(np.sort(genes_rows), np.flatnonzero(c.extra["present"]["genes"]))  # absent: no rows
    num = f.filter((pl.col("feature") == "clinical_1") & ~pl.col("missing")).sort("row")
    np.testing.assert_allclose(num["value"].to_numpy(), c.frame["clinical_1"].to_numpy()[num["row"].to_numpy()], atol=1e-5)
    missing = f.filter(pl.col("missing") & (pl.col("input") == "numeric"))
    assert missing.height > 0 and (missing["attribution"] == 0).all()  # the learned missing token does not move
    cats = f.filter(pl.col("input") == "categorical")
    assert set(cats["category"].drop_nulls()) <= {"A", "B", "C"}
    assert expl.outputs.columns[:2] == ["row", c.id_column]


def test_plots_html_and_files(tmp_path):
    c = example_cohort()
    expl = explain(untrained_model(c, "concat"), c.frame, n_steps=8)
    written = expl.save(tmp_path / "ex")
    for key in ("modality_png", "feature_png"):
        assert written[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = written["report"].read_text()
    assert html.count("data:image/png;base64,") == 3 and "training mean" in html and "Shapley" in html  # + patients
    assert pl.read_parquet(written["modality"]).equals(expl.modality)
    assert {"target", "completeness", "baselines"} <= set(json.loads(written["info"].read_text()))


@pytest.mark.slow
def test_cli_explain_logs_to_the_fit_run(tmp_path, monkeypatch, capsys):
    import mlflow

    from mmclin.interfaces.cli import main

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert main(["fit", str(QUICKSTART), *FAST, "--tracking-uri", uri, "--output-dir", str(tmp_path / "out")]) == 0
    client = mlflow.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("gse7390_survival").experiment_id])[0]
    capsys.readouterr()
    assert main(["explain", f"runs:/{run.info.run_id}", "--data", "gse7390", "--tracking-uri", uri,
                 "--output-dir", str(tmp_path / "ex"), "--horizon", "1825", "--n-steps", "16"]) == 0
    out = capsys.readouterr().out
    assert "S(1825 days | x)" in out and "1825 days (5.0 years)" in out and "clinical" in out  # the cohort's unit
    assert f"{tmp_path / 'ex' / 'report.html'}  report" in out and f"{tmp_path / 'ex' / 'modality_importance.png'}" in out
    assert (tmp_path / "ex" / "report.html").exists() and (tmp_path / "ex" / "feature_importance.png").exists()
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "explanations")}
    assert {"explanations/report.html", "explanations/modality_importance.png", "explanations/modality.parquet"} <= arts
    shares = {k: v for k, v in client.get_run(run.info.run_id).data.metrics.items() if k.startswith("explain_share_")}
    assert set(shares) == {"explain_share_clinical", "explain_share_genes"} and sum(shares.values()) == pytest.approx(1.0)
    feats = pl.read_parquet(tmp_path / "ex" / "feature.parquet")
    assert feats.columns[:2] == ["row", "patient_id"] and feats["row"].n_unique() == 198
    model_dir = tmp_path / "out" / "gse7390_survival"  # the config's output directory: its newest finished run
    assert main(["explain", str(model_dir), "--data", "gse7390", "--levels", "feature", "--horizon", "1", "--output-dir",
                 str(tmp_path / "ex2")]) == 2
    assert "before the first" in capsys.readouterr().err


def test_time_and_note_levels_on_icu_stays(tmp_path):
    """Irregular series: one row per kept observation, with its variable, value and time; per-variable
    sums; notes: one row per note with its time; all gradient attributions add up."""
    from mmclin.datasets import make_synthetic_icu

    c = make_synthetic_icu(n_stays=24, events_per_stay=15, seed=0)
    opts = {"irregular_series": {"max_events": 12}, "notes": {"n_features": 256, "max_terms": 32}}
    c.modalities = [m.model_copy(update={"options": opts.get(m.kind, m.options)}) for m in c.modalities]
    fitted = untrained_model(c, "concat")
    expl = explain(fitted, c.frame, levels=("modality", "feature", "time", "note"), n_steps=16, batch_size=10)
    t, by_var, notes = expl.other["time"], expl.other["time_by_variable"], expl.other["note"]
    series, all_notes = c.frame["timeseries"].to_list(), c.frame["notes"].to_list()
    for i in (0, 5, 17):
        events = sorted(series[i], key=lambda e: e["time"])[-12:]  # the most recent 12
        rows = t.filter(pl.col("row") == i).sort("step")
        np.testing.assert_allclose(rows["time"].to_numpy(), [e["time"] for e in events], atol=1e-3)
        assert rows["variable"].to_list() == [e["code"] for e in events]
        observed = [e["value"] for e in events]
        np.testing.assert_allclose(rows["value"].to_numpy(), observed, rtol=1e-3, atol=1e-2)
        note_times = sorted(n["time"] for n in (all_notes[i] or []))
        np.testing.assert_allclose(notes.filter(pl.col("row") == i).sort("note")["time"].to_numpy(), note_times, atol=1e-3)
    sums = t.group_by("row", "variable").agg(pl.col("attribution").sum().alias("s")).join(by_var, on=["row", "variable"])
    np.testing.assert_allclose(sums["s"], sums["attribution"], rtol=1e-6, atol=1e-9)
    total = pl.concat([f.select("row", "attribution") for f in (expl.feature, t, notes)]).group_by("row").agg(
        pl.col("attribution").sum().alias("s"))
    o = expl.outputs.join(total, on="row")
    # completeness against the model's own outputs (not Captum's delta): every level's rows together account for
    # output - reference up to the integration error (measured 2.4 % of the largest span at 16 steps)
    span = (o["output"] - o["reference"]).to_numpy()
    assert np.abs(o["s"].to_numpy() - span).max() < 0.05 * np.abs(span).max(), (o["s"].to_numpy(), span)
    top = expl.top("note", 1)
    assert top["row"].n_unique() == top.height == notes["row"].n_unique()
    assert expl.summary("time_by_variable")["variable"].n_unique() > 5
    written = expl.save(tmp_path)
    assert written["time_by_variable_png"].name == "variable_importance.png"
    with pytest.raises(ValueError, match="has no global summary"):
        expl.summary("note")


def test_patch_level_with_attention_and_coordinates():
    """Slide encoders: one row per real patch with its coordinates and MIL attention; padding dropped;
    IG from the slide's mean patch adds up."""
    from types import SimpleNamespace

    from mmclin.encoders.slide_mil import SlideEncoder
    from mmclin.explain.api import _gradient_frames
    from mmclin.explain.features import integrated_gradients
    from mmclin.explain.targets import resolve_target
    from mmclin.fusion.concat import ConcatFusion
    from mmclin.training.model import MultimodalNet

    torch.manual_seed(0)
    enc = SlideEncoder.example().eval()
    net = MultimodalNet({"wsi": enc}, ConcatFusion({"wsi": enc.output_dim}, d_model=8), torch.nn.Linear(8, 1)).eval()
    x = enc.example_input(4)
    x["coords"] = torch.stack([torch.arange(12).repeat(4, 1) * 64, torch.arange(12).repeat(4, 1) * 32], -1)
    present = {"wsi": torch.tensor([True, True, False, True])}
    out = net({"wsi": x}, present)[0].detach().numpy()
    tgt = resolve_target(SimpleNamespace(task_name="raw", output_dim=1, problem="regression"), out)
    rows = np.arange(4)
    parts, attrs, reference, delta = integrated_gradients(net, {"wsi": x}, present, tgt, rows, n_steps=32, levels=("patch",))
    fitted = SimpleNamespace(net=net, featurizers={"wsi": None})
    frame = pl.concat(_gradient_frames(fitted, SimpleNamespace(inputs={"wsi": x}, present=present), rows, parts, attrs)["patch"])
    n_real = x["mask"].sum(1).numpy()
    assert frame.group_by("row").len().sort("row")["len"].to_list() == [n_real[0], n_real[1], n_real[3]]  # row 2 absent
    np.testing.assert_allclose(frame.group_by("row").agg(pl.col("attention").sum()).sort("row")["attention"], 1.0, rtol=1e-5)
    r0 = frame.filter(pl.col("row") == 0).sort("patch")
    assert r0["x"].to_list() == [64 * k for k in range(n_real[0])]
    s = frame.group_by("row").agg(pl.col("attribution").sum()).sort("row")["attribution"].to_numpy()
    span = out[[0, 1, 3], 0] - reference.numpy()[[0, 1, 3]]  # the network's own outputs, not Captum's delta
    assert np.abs(s - span).max() < 0.05 * np.abs(span).max(), (s, span)


# --- the report, for a clinical reader ------------------------------------------------------------
@pytest.fixture(scope="module")
def survival_explanation():
    """An untrained Cox model on 40 synthetic subjects, explained at a horizon (fast)."""
    c = example_cohort(n=40)
    fitted = untrained_model(c, "concat")
    horizon = float(np.round(np.median(c.y["time"])))
    return c, fitted, horizon, explain(fitted, c.frame, horizon=horizon, n_steps=8)


def _sections(html: str) -> dict[str, int]:
    return {name: html.index(f"<section id='{name}'>") for name in ("findings", "cohort", "patients", "methods")}


def test_report_puts_findings_first_with_direction_and_the_time_unit(tmp_path, survival_explanation):
    from mmclin.explain.targets import horizon_text

    c, fitted, horizon, expl = survival_explanation
    html = expl.save(tmp_path / "days", time_unit="days")["report"].read_text()
    at = _sections(html)
    assert at["findings"] < at["cohort"] < at["patients"] < at["methods"]
    findings = html[at["findings"]:at["cohort"]]
    assert "accounts for" in findings and ("raises" in findings or "lowers" in findings)
    assert horizon_text(horizon, "days") in html and not re.search(r"\bt=\d", html)
    assert "survival probability" in html[:at["findings"]]  # what is explained, in words, before anything else
    methods = html[at["methods"]:]
    assert "Shapley" in methods and "Integrated Gradients" in methods and "add up to" in methods
    assert "Gauss-Legendre" not in html[:at["methods"]] and "convergence delta" not in html  # jargon: methods only
    # the direction of effect in the summary table, and the bars coloured by it
    s = expl.summary("feature")
    assert {"corr", "direction"} <= set(s.columns) and "direction of effect" in html
    from mmclin.explain.report import LOWERS, NEUTRAL, RAISES

    fig = expl.plot("feature")
    colours = {matplotlib_hex(p.get_facecolor()) for p in fig.axes[0].patches}
    assert colours <= {RAISES, LOWERS, NEUTRAL} and len(colours) > 1
    # without a unit: "time units", never a bare number
    plain = expl.save(tmp_path / "unknown")["report"].read_text()
    assert f"{horizon:g} time units" in plain and "unit was not given" in plain


def matplotlib_hex(rgba) -> str:
    from matplotlib.colors import to_hex

    return to_hex(rgba)


def test_direction_of_effect_follows_the_planted_coefficients(planted):
    a, c, est, expl = planted
    informative = c.extra["informative_columns"][a]  # coefficients 1, -0.8, 0.6
    d = {r["feature"]: r for r in expl.direction("feature").iter_rows(named=True)}
    assert [d[f]["direction"] for f in informative] == ["higher raises", "higher lowers", "higher raises"]
    assert d[informative[0]]["corr"] > 0.5 and d[informative[1]]["corr"] < -0.5
    f = expl.feature.filter((pl.col("feature") == informative[1]) & ~pl.col("missing"))
    assert d[informative[1]]["corr"] == pytest.approx(np.corrcoef(f["value"], f["attribution"])[0, 1], abs=1e-9)
    cats = expl.direction("feature").filter(pl.col("corr").is_null())  # the categorical columns
    if cats.height:
        assert cats["direction"].str.contains("' raises|' lowers").all()


def test_report_per_patient_view_names_the_patients(tmp_path, survival_explanation):
    c, fitted, horizon, expl = survival_explanation
    o = expl.outputs.sort("output")
    lowest, highest = o[c.id_column][0], o[c.id_column][-1]
    html = expl.save(tmp_path / "auto")["report"].read_text()
    patients = html[_sections(html)["patients"]:_sections(html)["methods"]]
    assert lowest in patients and highest in patients and "highest prediction" in patients
    assert "data:image/png;base64," in patients and (tmp_path / "auto" / "patients.png").exists()
    chosen = [c.frame[c.id_column][3], c.frame[c.id_column][7]]
    html = expl.save(tmp_path / "chosen", patients=chosen)["report"].read_text()
    patients = html[_sections(html)["patients"]:_sections(html)["methods"]]
    assert all(p in patients for p in chosen) and "requested" in patients
    # each chosen patient's signed contributions: modality table and top features
    row = expl.modality.filter(pl.col(c.id_column) == chosen[0])
    assert all(m in patients for m in row["modality"].cast(pl.String))
    with pytest.raises(ValueError, match="not among the explained subjects"):
        expl.save(tmp_path / "bad", patients=["nobody"])
    assert not (tmp_path / "bad").exists()


def test_labels_show_in_the_report_and_plots_probe_ids_are_named(tmp_path, survival_explanation):
    c, fitted, horizon, expl = survival_explanation
    top = expl.summary("feature")["feature"][0]
    labelled = expl.with_display(labels={top: "ESR1"})
    assert labelled.label(top) == f"ESR1 ({top})" and expl.label(top) == top  # the original is unchanged
    html = labelled.save(tmp_path / "ex")["report"].read_text()
    assert f"ESR1 ({top})" in html
    ticks = [t.get_text() for t in labelled.plot("feature").axes[0].get_yticklabels()]
    assert any(f"ESR1 ({top})" in t for t in ticks)
    assert json.loads((tmp_path / "ex" / "info.json").read_text())["feature_labels"] == {top: "ESR1"}
    # probe-set ids without gene symbols: the report says what they are and makes none up
    from dataclasses import replace

    probes = {f: f"X{200000 + k}_at" for k, f in enumerate(expl.feature["feature"].cast(pl.String).unique().sort())}
    as_probes = replace(expl, feature=expl.feature.with_columns(
        pl.col("feature").cast(pl.String).replace_strict(probes).cast(pl.Categorical)))
    html = as_probes.to_html(tmp_path / "probes.html").read_text()
    assert "Affymetrix probe set ids" in html and "no gene symbols were given" in html


def test_save_leaves_only_this_runs_files_and_never_deletes_foreign_ones(tmp_path, survival_explanation):
    from mmclin.persistence.atomic import ForeignFilesError
    from mmclin.explain.explanation import MARKER

    c, fitted, horizon, expl = survival_explanation
    out = tmp_path / "explanations"
    expl.save(out)
    assert (out / "feature.parquet").exists() and (out / MARKER).exists()
    modality_only = explain(fitted, c.frame, levels="modality")
    written = modality_only.save(out)
    assert not (out / "feature.parquet").exists() and not (out / "feature_importance.png").exists()  # stale: gone
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, *(p.name for p in written.values())])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left behind
    (out / "my_notes.txt").write_text("mine")
    with pytest.raises(ForeignFilesError, match=f"{out} holds files mmclin explain did not write \\(my_notes.txt\\)"):
        expl.save(out)
    assert (out / "my_notes.txt").read_text() == "mine" and (out / "modality.parquet").exists()
    assert not (out / "feature.parquet").exists()  # nothing of the refused run was written either
    mine = tmp_path / "someone_elses"
    mine.mkdir()
    (mine / "data.csv").write_text("a,b")
    with pytest.raises(ValueError, match="did not write"):
        expl.save(mine)
    assert (mine / "data.csv").read_text() == "a,b"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert expl.save(empty)["report"].exists()  # an empty directory holds nothing to lose
    # written before the marker existed: recognised by its names and info.json, replaced; with a file of yours, kept
    (empty / MARKER).unlink()
    modality_only.save(empty)
    assert not (empty / "feature.parquet").exists()
    (empty / MARKER).unlink()
    (empty / "cohort.parquet").write_bytes(b"mine")
    with pytest.raises(ValueError, match="did not write"):
        expl.save(empty)
    assert (empty / "cohort.parquet").read_bytes() == b"mine"


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_saved_explanation_follows_the_umask(tmp_path, survival_explanation, umask, file_mode, dir_mode):
    import os
    import stat

    c, fitted, horizon, expl = survival_explanation
    old = os.umask(umask)
    try:
        written = expl.save(tmp_path / "ex")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ex").stat().st_mode) == dir_mode
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ex").iterdir()}
    assert set(modes.values()) == {file_mode} and len(modes) == len(written) + 1


def test_cli_explain_says_what_it_wrote_and_refuses_a_foreign_directory(tmp_path, capsys, survival_explanation):
    from mmclin.interfaces.cli import main

    c, fitted, horizon, expl = survival_explanation
    model_dir = fitted.save(tmp_path / "model")
    data = tmp_path / "subjects.parquet"
    c.frame.write_parquet(data)
    gene = next(m for m in c.modalities if m.name == "genes").columns[0]
    (tmp_path / "labels.csv").write_text(f"column,symbol\n{gene},TP53\n")
    out = tmp_path / "ex"
    ids = c.frame[c.id_column].to_list()
    args = ["explain", str(model_dir), "--data", str(data), "--output-dir", str(out), "--no-tracking", "--n-steps", "4",
            "--horizon", f"{horizon:g}", "--time-unit", "days", "--patients", f"{ids[0]},{ids[1]}",
            "--labels", str(tmp_path / "labels.csv")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "explaining the cox model's predictions for 40 subjects" in printed
    for name in ("report.html", "modality_importance.png", "feature_importance.png", "patients.png", "outputs.parquet",
                 "modality.parquet", "feature.parquet", "info.json"):
        assert f"{out / name}  " in printed and (out / name).exists()
    html = (out / "report.html").read_text()
    assert f"TP53 ({gene})" in html and f"{horizon:g} days" in html and ids[0] in html and ids[1] in html
    (out / "mine.txt").write_text("keep me")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmclin explain: error: {out} holds files") and err.count("\n") == 1
    assert (out / "mine.txt").read_text() == "keep me" and (out / "report.html").exists()


def test_modality_values_on_presence_patterns_never_trained_are_flagged(tmp_path):
    """Training on subjects with every modality, without modality dropout, never showed the network one modality alone:
    the explanation says so (info, report); with dropout the same subsets were seen, and it does not."""
    from mmclin import MultimodalClassifier
    from mmclin.datasets import make_synthetic_cohort
    from mmclin.explain.report import untrained_warning

    c = make_synthetic_cohort(n_subjects=120, task="binary", seed=0)
    plain = MultimodalClassifier(modalities=c.modalities, max_epochs=1, modality_dropout=0.0,
                                random_state=0).fit(c.frame, c.y)
    assert plain.model_.presence_counts == {"+".join(sorted(m.name for m in c.modalities)): 120}
    expl = plain.explain(c.frame.head(10), levels=("modality",))
    u = expl.info["untrained_patterns"]
    assert u["patterns"] == sorted(m.name for m in c.modalities) and u["n_subjects"] == 10
    assert "never showed the model" in untrained_warning(expl.info)
    assert "never showed the model" in expl.to_html(tmp_path / "r.html").read_text()
    dropped = MultimodalClassifier(modalities=c.modalities, max_epochs=1, modality_dropout=0.3,
                                   random_state=0).fit(c.frame, c.y)
    again = dropped.explain(c.frame.head(10), levels=("modality",))
    assert again.info["untrained_patterns"] == {} and untrained_warning(again.info) is None
    # the record survives saving
    from mmclin.training.core import FittedModel

    loaded = FittedModel.load(plain.save(tmp_path / "m"))
    assert loaded.presence_counts == plain.model_.presence_counts
