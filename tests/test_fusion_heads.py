"""The sequential fusion heads: sequential_modular (MultiModN) and cascaded_transformer (3MAT).

The shared conformance checks (tests/test_conformance.py) run on both; these tests cover
what is specific to them: per-step states and predictions, per-sample skipping, the cascade
order, the per-step loss, and use from the estimators and configs by name.
"""
import numpy as np
import polars as pl
import pytest
import torch

from conftest import FAST
from mmclin import MultimodalClassifier, MultimodalRegressor, make_synthetic_cohort
from mmclin.fusion.steps import INITIAL_STEP, per_step_loss
from mmclin.registry import FUSIONS, TASKS, load_builtin_components
from mmclin.testing.conformance import _mask_absent, example_tokens, make_fusion

load_builtin_components()
SEQUENTIAL = ["sequential_modular", "cascaded_transformer"]


@pytest.fixture(scope="module")
def three_modalities():
    return make_synthetic_cohort(
        n_subjects=150, task="binary", modalities={"clinical": ("tabular", 5), "genes": ("genomics", 12), "labs": ("tabular", 4)},
        missing={"genes": 0.3, "labs": 0.3}, seed=7)


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_absent_modality_leaves_state_unchanged_at_that_step(name):
    head = make_fusion(name).eval()
    tokens, present = example_tokens(6)
    order = head.step_names()
    assert order == [INITIAL_STEP, "a_clinical", "b_genes", "c_notes"]
    for m in present:
        present[m][:] = True
    present["b_genes"][2] = False
    out = head(_mask_absent(tokens, present), present)
    prev, step = out.per_step["a_clinical"], out.per_step["b_genes"]
    assert torch.equal(step[2], prev[2])  # exactly: the step was skipped for sample 2
    others = [0, 1, 3, 4, 5]
    assert (step[others] - prev[others]).abs().sum(1).min() > 1e-4  # the step did update everyone else
    torch.testing.assert_close(out.pooled, out.per_step["c_notes"])


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_order_option_sets_the_steps_and_bad_orders_are_named(name):
    cls = FUSIONS.get(name)
    dims = {"a_clinical": 4, "b_genes": 6, "c_notes": 5}
    head = cls(input_dims=dims, **cls.example_options(), order=["c_notes", "a_clinical", "b_genes"]).eval()
    assert head.step_names() == [INITIAL_STEP, "c_notes", "a_clinical", "b_genes"]
    tokens, present = example_tokens(4)
    out = head(_mask_absent(tokens, present), present)
    assert list(out.per_step) == head.step_names()
    default = cls(input_dims=dims, **cls.example_options()).eval()
    default.load_state_dict(head.state_dict())  # same parameters, another order: another function
    assert not torch.allclose(default(_mask_absent(tokens, present), present).pooled, out.pooled)
    with pytest.raises(ValueError, match=rf"'order' option of fusion head '{name}' must list each modality exactly once.*Got \['c_notes', 'a_clinical'\]"):
        cls(input_dims=dims, order=["c_notes", "a_clinical"])
    with pytest.raises(ValueError, match="reserved for the initial state"):
        cls(input_dims={INITIAL_STEP: 3, "x": 2})


def test_per_step_loss_scores_each_step_on_samples_that_had_the_modality():
    head = make_fusion("sequential_modular").eval()
    task = TASKS.create("binary")
    task.fit_targets(np.array([0, 1]))
    lin = torch.nn.Linear(head.output_dim, 1)
    tokens, present = example_tokens(6)
    target = torch.tensor([[0.0], [1.0], [1.0], [0.0], [1.0], [0.0]])
    out = head(_mask_absent(tokens, present), present)
    got = per_step_loss(out, present, head.step_names(), lin, task, target)
    rows = [torch.ones(6, dtype=torch.bool), present["a_clinical"], present["b_genes"]]  # the last step is the main loss
    expected = torch.stack([task.loss(lin(out.per_step[s][r]), target[r])
                            for s, r in zip(head.step_names()[:3], rows)]).mean()
    torch.testing.assert_close(got, expected)


def test_training_module_adds_the_step_loss_only_for_heads_that_have_one(three_modalities):
    from mmclin.batch import ModalityBatch
    from mmclin.training.module import MultimodalModule

    c = three_modalities
    losses = {}
    for fusion, options in [("sequential_modular", {}), ("sequential_modular", {"step_loss_weight": 0.0}), ("concat", {})]:
        clf = MultimodalClassifier(modalities=c.modalities, fusion=fusion, fusion_options=options, **FAST).fit(c.frame, c.y)
        fitted = clf.model_
        table = fitted.table(c.frame)
        b = table.batch(torch.arange(40))
        batch = ModalityBatch(b.inputs, b.present, fitted.task.encode(c.y[:40]))
        module = MultimodalModule(fitted.net, fitted.task)
        with torch.no_grad():
            outputs, fused = fitted.net(batch.inputs, batch.present)
            main = fitted.task.loss(outputs.float(), batch.target)
            total = module._loss(batch, batch.present)
        losses[(fusion, bool(options))] = (float(total), float(main), fused, fitted)
    total, main, fused, fitted = losses[("sequential_modular", False)]
    from mmclin.training.linear_path import step_offsets

    b = fitted.table(c.frame).batch(torch.arange(40))
    assert fitted.net.linear is not None  # the default: each step decodes with the linear terms of what it has read
    with torch.no_grad():
        offsets = step_offsets(fitted.net.linear, b.inputs, b.present, fitted.net.fusion.step_names())
        steps = per_step_loss(fused, b.present, fitted.net.fusion.step_names(),
                              fitted.net.head, fitted.task, fitted.task.encode(c.y[:40]), offsets)
    assert total == pytest.approx(main + float(steps), rel=1e-5) and float(steps) > 0
    total0, main0, *_ = losses[("sequential_modular", True)]
    assert total0 == pytest.approx(main0, rel=1e-6)  # step_loss_weight=0: the plain task loss
    total_c, main_c, *_ = losses[("concat", False)]
    assert total_c == pytest.approx(main_c, rel=1e-6)  # other heads: unchanged


def test_per_step_predictions_are_exposed_and_end_at_the_prediction(three_modalities):
    c = three_modalities
    clf = MultimodalClassifier(modalities=c.modalities, fusion="sequential_modular", id_column="patient_id", **FAST).fit(c.frame, c.y)
    frame = c.frame.head(20)
    steps = clf.predict_per_step(frame)
    assert steps.columns == ["patient_id", "step", "modality", "present", "proba_0", "proba_1", "prediction"]
    assert steps.height == 20 * 4
    assert steps["modality"].to_list()[:4] == [None, "clinical", "genes", "labs"]
    # the last step is the model's prediction
    last = steps.filter(pl.col("step") == 3)
    np.testing.assert_allclose(last["proba_1"].to_numpy(), clf.predict_proba(frame)[:, 1], rtol=1e-5, atol=1e-6)
    # presence per step is the subject's, and a skipped step leaves the prediction exactly unchanged
    wide = steps.with_columns(pl.col("proba_1").shift(1).over("patient_id").alias("before"))
    genes_present = c.extra["present"]["genes"][:20]
    assert wide.filter(pl.col("modality") == "genes")["present"].to_list() == genes_present.tolist()
    skipped = wide.filter(pl.col("present") == False)  # noqa: E712
    assert skipped.height > 0 and (skipped["proba_1"] == skipped["before"]).all()
    moved = wide.filter(pl.col("present") == True)  # noqa: E712
    assert (moved["proba_1"] != moved["before"]).all()
    # the initial state is the same prior for everyone
    assert steps.filter(pl.col("step") == 0)["proba_1"].n_unique() == 1


def test_per_step_predictions_with_multitask_targets_and_ensembles(three_modalities):
    c = three_modalities
    rng = np.random.default_rng(0)
    los = c.extra["linear_predictor"][:, 0] + rng.normal(size=len(c))
    los[:10] = np.nan  # unlabelled rows are masked in every step's loss
    y = {"death": c.y, "los": los}
    tasks = {"death": {"name": "binary"}, "los": {"name": "regression"}}
    est = MultimodalRegressor(modalities=c.modalities, fusion="sequential_modular", task="multitask",
                              task_options={"tasks": tasks}, ensemble_size=2, **FAST).fit(c.frame, y)
    steps = est.predict_per_step(c.frame.head(5))
    assert {"death/proba_1", "death/prediction", "los/prediction"} <= set(steps.columns) and steps.height == 20
    last = steps.filter(pl.col("step") == 3)
    final = est.predict(c.frame.head(5))
    np.testing.assert_allclose(last["los/prediction"].to_numpy(), final["los"], rtol=1e-5, atol=1e-6)


def test_cascade_reads_each_modality_with_its_own_self_attention_first():
    """3MAT: within-modality self-attention before the stage; an absent modality's rows stay finite
    (also in the gradient) and leave the running state unchanged."""
    import torch

    from mmclin.batch import ModalityTokens
    from mmclin.fusion.cascaded_transformer import CascadedTransformerFusion

    torch.manual_seed(0)
    head = CascadedTransformerFusion({"a": 4, "b": 4}, d_model=8, n_heads=2)
    assert len(head.intra["a"]) == 1 and isinstance(head.intra["a"][0], torch.nn.TransformerEncoderLayer)
    assert len(CascadedTransformerFusion({"a": 4, "b": 4}, d_model=8, n_heads=2, intra_layers=0).intra["a"]) == 0
    tokens = {m: ModalityTokens(torch.randn(3, 5, 4, requires_grad=True), torch.ones(3, 5, dtype=torch.bool)) for m in "ab"}
    tokens["b"].mask[1] = False  # subject 1 has no "b" tokens at all
    present = {"a": torch.ones(3, dtype=torch.bool), "b": torch.tensor([True, False, True])}
    out = head(tokens, present)
    out.pooled.sum().backward()
    assert torch.isfinite(out.pooled).all() and all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)
    torch.testing.assert_close(out.per_step["b"][1], out.per_step["a"][1])  # skipped: state unchanged
    # the intra layer is used: changing one token of "a" changes what "a" contributes through the others
    with torch.no_grad():
        before = head.eval()(tokens, present).pooled.clone()
        tokens["a"].tokens[0, 4] += 5.0
        assert not torch.allclose(head(tokens, present).pooled[0], before[0])


def test_per_step_predictions_need_a_sequential_head(boring_binary):
    c = boring_binary
    concat = MultimodalClassifier(modalities=c.modalities, fusion="concat", **FAST).fit(c.frame, c.y)
    with pytest.raises(ValueError, match="this model's fusion head is 'concat'"):
        concat.predict_per_step(c.frame)
    cascade = MultimodalClassifier(modalities=c.modalities, fusion="cascaded_transformer",
                                   fusion_options={"step_loss_weight": 0.0}, **FAST).fit(c.frame, c.y)
    with pytest.raises(ValueError, match="'cascaded_transformer' with step_loss_weight 0"):
        cascade.predict_per_step(c.frame)
    # 3MAT trains its auxiliary per-stage outputs: so does the default, whose steps are decodable
    default = MultimodalClassifier(modalities=c.modalities, fusion="cascaded_transformer", **FAST).fit(c.frame, c.y)
    assert default.predict_per_step(c.frame.head(2)).height == 2 * (len(c.modalities) + 1)
    trained = MultimodalClassifier(modalities=c.modalities, fusion="cascaded_transformer",
                                   fusion_options={"step_loss_weight": 0.5, "order": ["genes", "clinical"]}, **FAST).fit(c.frame, c.y)
    steps = trained.predict_per_step(c.frame.head(3))
    assert steps["modality"].to_list()[:3] == [None, "genes", "clinical"]


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_heads_by_name_from_config_and_saved_model(name, tmp_path):
    from mmclin.interfaces.experiment import Experiment
    from mmclin.training.core import FittedModel

    exp = Experiment.from_yaml("experiments/gse7390_survival.yaml", [
        f"model.fusion={{name: {name}, d_model: 16, order: [genes, clinical]}}", "model.ensemble_size=1",
        "trainer.max_epochs=2", "trainer.progress_bar=false", "tracking.enabled=false"])
    res = exp.fit(output_dir=tmp_path)
    loaded = FittedModel.load(res.model_dir)
    assert loaded.net.fusion.order == ["genes", "clinical"]
    # the saved model predicts what the fitted one scored: the test metric is reproduced from the files
    c = exp.cohort
    test = res.predictions[c.id_column].to_list()
    rows = np.flatnonzero(c.frame[c.id_column].is_in(test).to_numpy())
    again = loaded.task.metrics(c.y[rows], loaded.predict_outputs(c.frame[rows]))["c_index"]
    assert again == pytest.approx(res.metrics["c_index"])
    frame = exp.cohort.frame.head(8)
    np.testing.assert_allclose(loaded.predict_outputs(frame), res.fitted.predict_outputs(frame), rtol=1e-5)


def test_per_step_predictions_show_what_each_modality_adds():
    """Planted signal in both modalities: on subjects who have genes, the prediction after the
    genes step ranks them better than the one after the clinical step."""
    from sklearn.metrics import roc_auc_score

    c = make_synthetic_cohort(n_subjects=600, task="binary", modalities={"clinical": ("tabular", 4), "genes": ("genomics", 8)},
                              signal={"clinical": 1.5, "genes": 1.5}, missing={"genes": 0.4}, seed=13)
    tr, te = np.arange(400), np.arange(400, 600)
    clf = MultimodalClassifier(modalities=c.modalities, fusion="sequential_modular", max_epochs=30, batch_size=64,
                               weight_decay=0.01, random_state=0).fit(c.frame[tr], c.y[tr])
    assert clf.metrics(c.frame[te], c.y[te])["auroc"] > 0.72
    steps = clf.predict_per_step(c.frame[te])
    has = c.extra["present"]["genes"][te]
    auroc = {m: roc_auc_score(c.y[te][has], steps.filter(pl.col("modality") == m)["proba_1"].to_numpy()[has])
             for m in ("clinical", "genes")}
    assert auroc["genes"] > auroc["clinical"] + 0.02, auroc


def test_plain_concat_is_the_towers_outputs_and_flags_as_they_are(monkeypatch):
    """``concat`` with ``plain=True`` (the MLP-tower model of the peer libraries): no projection, no MLP; an absent
    modality is zeros with its flag 0; and it passes the shared fusion contract."""
    from mmclin.fusion.concat import ConcatFusion
    from mmclin.testing import conformance

    head = ConcatFusion({"a": 3, "b": 2}, plain=True)
    assert head.output_dim == 3 + 2 + 2 and not list(head.parameters())
    tokens, present = example_tokens(4, {"a": 3, "b": 2})
    present = {"a": torch.tensor([True, True, False, True]), "b": torch.tensor([True, False, True, True])}
    out = head(_mask_absent(tokens, present), present).pooled
    pooled = {m: tokens[m].pooled() for m in ("a", "b")}
    expected = torch.cat([pooled["a"] * present["a"].unsqueeze(1), pooled["b"] * present["b"].unsqueeze(1),
                          present["a"].float().unsqueeze(1), present["b"].float().unsqueeze(1)], 1)
    assert torch.allclose(out, expected)
    base = ConcatFusion.example_options()
    monkeypatch.setattr(ConcatFusion, "example_options", classmethod(lambda cls: {**base, "plain": True}))
    for check in conformance.FUSION_CHECKS:
        check("concat")
