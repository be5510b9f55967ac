"""Explanation checks every registered fusion head (``EXPLAIN_FUSION_CHECKS``) and encoder
(``check_encoder_attributions``) must pass; tests parametrise over ``FUSIONS`` and ``ENCODERS``.

They run on an untrained network over a small synthetic cohort with three modalities and
missing ones, so a new head is checked without training or a new test:

* the all-present coalition reproduces the model's own prediction;
* completeness: per subject, the modality Shapley values add up to the output minus the
  output with every modality absent (which must be finite);
* the exact values equal Captum's ``ShapleyValues`` (all orderings), and Captum's
  ``ShapleyValueSampling`` is complete too;
* a modality absent in the data gets exactly 0;
* Integrated Gradients over all features adds up to the model's output minus its output at
  the reference (measured from the model, not from Captum's delta), closer with more steps.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import polars as pl
import torch

from mmclin.registry import FUSIONS, load_builtin_components

EXAMPLE_MODALITIES = {"clinical": ("tabular", 5), "genes": ("genomics", 8), "labs": ("tabular", 3)}


def example_cohort(task: str = "survival", n: int = 24, seed: int = 0) -> Any:
    from mmclin.datasets import make_synthetic_cohort

    return make_synthetic_cohort(n_subjects=n, modalities=EXAMPLE_MODALITIES, task=task,
                                 missing={"genes": 0.3, "labs": 0.25}, seed=seed)


def untrained_model(cohort: Any, fusion: str, task: str | None = None, ensemble_size: int = 1,
                    fusion_options: dict | None = None, seed: int = 0, encoder_options: dict | None = None) -> Any:
    """A ``FittedModel`` with freshly initialised weights (featurizers and task fitted on ``cohort``)."""
    from mmclin.config import ComponentConfig, ModelConfig
    from mmclin.training.core import FittedModel, build_net, build_task
    from mmclin.training.data import featurize, fit_featurizers

    load_builtin_components()
    task_name = task or {"survival": "cox"}.get(cohort.task, cohort.task)
    task_cfg = ComponentConfig(name=task_name)
    task_obj = build_task(task_cfg)
    y = task_obj.check_targets(cohort.y)
    featurizers = fit_featurizers(cohort.frame, cohort.modalities)
    task_obj.fit_targets(y)
    options = FUSIONS.get(fusion).example_options() if fusion_options is None else fusion_options
    model_cfg = ModelConfig(fusion=ComponentConfig(name=fusion, **options), ensemble_size=ensemble_size,
                            encoders=encoder_options or {})
    encoder_kwargs = {m: f.encoder_kwargs() for m, f in featurizers.items()}
    torch.manual_seed(seed)
    net = build_net(cohort.modalities, encoder_kwargs, model_cfg, task_obj).eval()
    fitted = FittedModel(cohort.modalities, featurizers, net, task_obj, model_cfg, task_cfg, encoder_kwargs,
                         id_column=cohort.id_column)
    task_obj.calibrate(fitted.outputs_from_table(featurize(cohort.frame, featurizers)), y)
    return fitted


def _setup(name: str) -> tuple[Any, Any]:
    load_builtin_components()
    cohort = example_cohort()
    return cohort, untrained_model(cohort, name)


def check_full_coalition_is_the_prediction(name: str) -> None:
    """The coalition of every present modality, run through the cached-token path, is the prediction."""
    from mmclin.explain.api import _row_scalar
    from mmclin.explain.modality import CoalitionForward
    from mmclin.explain.targets import resolve_target

    cohort, fitted = _setup(name)
    table = fitted.table(cohort.frame)
    pred = fitted.outputs_from_table(table)
    rows = np.arange(len(table))
    b = table.batch(torch.as_tensor(rows))
    fwd = CoalitionForward(fitted.net, b.inputs, b.present, _row_scalar(resolve_target(fitted.task, pred), rows))
    assert fwd.cached, f"{name}: cached encoder tokens do not reproduce the network's forward"
    full = fwd(torch.ones(len(rows), len(fwd.names))).double().numpy()
    np.testing.assert_allclose(full, pred[:, 0], rtol=1e-4, atol=1e-5,
                               err_msg=f"{name}: the all-present coalition is not the model's prediction")


def check_modality_completeness(name: str) -> None:
    from mmclin.explain import explain

    cohort, fitted = _setup(name)
    for method in ("exact", "sampling"):
        expl = explain(fitted, cohort.frame, levels="modality", method=method, n_samples=5)
        empty = expl.outputs["all_absent"].to_numpy()
        assert np.isfinite(empty).all(), f"{name}: non-finite output when every modality is absent"
        err = expl.completeness()["modality_max_error"]
        assert err < 1e-5, f"{name} ({method}): Shapley values miss output - all_absent by {err:.2e}"


def check_absent_modality_is_null_player(name: str) -> None:
    from mmclin.explain import explain

    cohort, fitted = _setup(name)
    m = explain(fitted, cohort.frame, levels="modality").modality
    absent = m.filter(~m["present"])["attribution"].to_numpy()
    assert len(absent) and np.all(absent == 0.0), f"{name}: a modality absent in the data got a non-zero Shapley value"


def check_exact_equals_captum_shapley_values(name: str) -> None:
    from captum.attr import ShapleyValues

    from mmclin.explain.api import _row_scalar
    from mmclin.explain.modality import CoalitionForward, exact_shapley
    from mmclin.explain.targets import resolve_target

    cohort, fitted = _setup(name)
    table = fitted.table(cohort.frame)
    tgt = resolve_target(fitted.task, fitted.outputs_from_table(table))
    rows = np.arange(len(table))
    b = table.batch(torch.as_tensor(rows))
    fwd = CoalitionForward(fitted.net, b.inputs, b.present, _row_scalar(tgt, rows))
    phi, _, _ = exact_shapley(fwd)
    ones = torch.ones(len(rows), len(fwd.names))
    ref = ShapleyValues(fwd).attribute(ones, baselines=torch.zeros_like(ones),
                                       feature_mask=torch.arange(len(fwd.names)).unsqueeze(0))
    torch.testing.assert_close(phi, ref.double(), rtol=1e-4, atol=1e-5,
                               msg=f"{name}: exact Shapley values differ from Captum's ShapleyValues")


def _additivity_error(attribution_sums: np.ndarray, output: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Largest |sum of attributions - (output - reference)| and the largest |output - reference|.

    Both sides come from the model itself (its prediction and a forward pass at the reference),
    not from Captum's convergence delta, which is that same gap by definition."""
    span = np.asarray(output, dtype=float) - np.asarray(reference, dtype=float)
    return float(np.abs(np.asarray(attribution_sums, dtype=float) - span).max()), float(np.abs(span).max())


def check_feature_completeness(name: str) -> None:
    """Feature attributions (all modalities, ensemble members summed, absent rows dropped) add up
    to the model's output minus its output at the reference: within 5 % of the largest
    ``|output - reference|`` at explain's default 50 steps, within 1.5 % at 256, and closer with
    more steps. (A gradient that jumps near the reference, e.g. a LayerNorm over a zero token,
    fails this: the integral then needs thousands of steps.)"""
    from mmclin.explain import explain

    cohort, fitted = _setup(name)
    errors = []
    for n_steps, allowed in ((50, 0.05), (256, 0.015)):
        expl = explain(fitted, cohort.frame, levels="feature", n_steps=n_steps)
        sums = expl.feature.group_by("row").agg(pl.col("attribution").sum().alias("s"))
        o = expl.outputs.join(sums, on="row", how="left").fill_null(0.0)
        err, span = _additivity_error(o["s"].to_numpy(), o["output"].to_numpy(), o["reference"].to_numpy())
        assert span > 1e-3, f"{name}: the reference gives the same output as the subjects ({span:.3g}): nothing to check"
        assert err <= allowed * span + 1e-5, (
            f"{name}: at {n_steps} steps feature attributions miss output - reference by {err:.3g} "
            f"({err / span:.1%} of the largest |output - reference| {span:.3g}; at most {allowed:.1%})")
        errors.append(err)
    assert errors[1] <= errors[0] + 1e-6, (
        f"{name}: more steps do not bring attributions closer ({errors[0]:.3g} at 50, {errors[1]:.3g} at 256)")


def check_encoder_attributions(name: str) -> None:
    """An encoder's declared attributable inputs exist in its example input, attribute to the
    declared axes, and Integrated Gradients over them adds up."""
    from types import SimpleNamespace

    from mmclin.explain.attributable import attributable_inputs
    from mmclin.explain.features import integrated_gradients, reduce_attribution
    from mmclin.explain.targets import resolve_target
    from mmclin.fusion.concat import ConcatFusion
    from mmclin.registry import ENCODERS
    from mmclin.training.model import MultimodalNet

    load_builtin_components()
    torch.manual_seed(0)
    enc = ENCODERS.get(name).example().eval()
    decls = attributable_inputs(enc)
    assert decls, f"{name}: declares no attributable inputs"
    x = enc.example_input(3)
    for d in decls:
        for key in (d.key, d.missing_key, d.valid_key):
            assert key is None or key in x, f"{name}: declared input {key!r} is not among its inputs {sorted(x)}"
        if d.layer is not None:
            enc.get_submodule(d.layer)  # raises naming the missing submodule
    net = MultimodalNet({"m": enc}, ConcatFusion({"m": enc.output_dim}, d_model=8), torch.nn.Linear(8, 1)).eval()
    present = {"m": torch.ones(3, dtype=torch.bool)}
    out = net({"m": x}, present)[0].detach().numpy()
    tgt = resolve_target(SimpleNamespace(task_name="raw", output_dim=1, problem="regression"), out)
    parts, attrs, reference, _ = integrated_gradients(net, {"m": x}, present, tgt, np.arange(3), n_steps=50)
    total = np.zeros(3)
    for p, a in zip(parts, attrs):
        red = reduce_attribution(p, a)
        assert red.dim() == 1 + len(p.decl.axes), f"{name}: {p.decl.key!r} attributions {tuple(red.shape)} vs axes {p.decl.axes}"
        total += red.reshape(3, -1).sum(1).numpy()
    err, span = _additivity_error(total, out[:, 0], reference.numpy())
    assert err <= 0.03 * span + 1e-5, (f"{name}: at 50 steps attributions miss output - reference by {err:.3g} "
                                       f"({err / max(span, 1e-12):.1%} of {span:.3g}; at most 3%)")


EXPLAIN_FUSION_CHECKS: list[Callable[[str], None]] = [
    check_full_coalition_is_the_prediction, check_modality_completeness, check_absent_modality_is_null_player,
    check_exact_equals_captum_shapley_values, check_feature_completeness,
]
