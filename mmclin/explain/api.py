"""``explain(fitted, frame)``: modality Shapley values and feature attributions as tidy frames."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import polars as pl
import torch

from mmclin.cohort import to_polars
from mmclin.explain.attributable import LEVELS
from mmclin.explain.explanation import Explanation
from mmclin.explain.features import integrated_gradients, plan, reduce_attribution
from mmclin.explain.modality import MAX_EXACT, CoalitionForward, exact_shapley, members, sampled_shapley
from mmclin.explain.targets import ExplainTarget, resolve_target

ALL_LEVELS = ("modality", *LEVELS)
EXACT_UP_TO = 8  # method="auto": exact Shapley up to 8 modalities (256 coalitions), sampled beyond
METHODS = ("auto", "exact", "sampling")


def explain(
    fitted: Any,
    X: Any,
    levels: tuple[str, ...] | list[str] | str = ("modality", "feature"),
    target: Any = None,
    horizon: float | None = None,
    method: str = "auto",
    n_samples: int = 64,
    n_steps: int = 50,
    batch_size: int = 256,
    id_column: str | None = None,
    random_state: int = 0,
    num_threads: int | None = 1,
) -> Explanation:
    """Explain a fitted model's predictions for the subjects of ``X``.

    Args:
        fitted: a ``FittedModel`` (``estimator.model_``, ``FittedModel.load(dir)``).
        X: one-row-per-subject frame (polars or pandas) with the training columns.
        levels: ``"modality"`` (Shapley values, modalities as players), ``"feature"`` (Integrated
            Gradients on tabular / genomics inputs, with gene-set sums where gene groups exist);
            ``"time"``, ``"note"``, ``"patch"`` for encoders that declare such inputs.
        target: which scalar (see :mod:`mmclin.explain.targets`): a class or label for
            classification (default: each subject's predicted one), a sub-task key for multitask.
        horizon: survival tasks: explain ``S(horizon | x)`` instead of the risk score.
        method: modality Shapley values: ``"exact"`` (all ``2^M`` coalitions), ``"sampling"``
            (Captum ``ShapleyValueSampling``, ``n_samples`` orderings) or ``"auto"`` (exact up to
            8 modalities).
        n_steps: Integrated Gradients steps (Gauss-Legendre).
        batch_size: subjects per pass; peak memory is about that of a forward + backward pass
            over ``batch_size`` subjects (see docs/explanations.md).

    Returns an :class:`Explanation` (tidy polars frames, summaries, plots, HTML, MLflow logging).
    """
    levels = (levels,) if isinstance(levels, str) else tuple(levels)
    bad = [lv for lv in levels if lv not in ALL_LEVELS]
    if bad or not levels:
        raise ValueError(f"unknown explanation level(s) {bad or levels}; choose from {list(ALL_LEVELS)}")
    if method not in METHODS:
        raise ValueError(f"The 'method' parameter of explain must be one of {list(METHODS)}. Got {method!r} instead.")
    for name, value in (("n_samples", n_samples), ("n_steps", n_steps), ("batch_size", batch_size)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"'{name}' must be an int >= 1, got {value!r}")
    if num_threads:
        torch.set_num_threads(num_threads)

    frame = to_polars(X)
    table = fitted.table(frame)
    n = len(table)
    if n == 0:
        raise ValueError("the frame to explain has no rows")
    net = fitted.net.eval()
    device = next(net.parameters()).device
    names = sorted(table.present)
    outputs = fitted.outputs_from_table(table, batch_size)
    tgt = resolve_target(fitted.task, outputs, target, horizon)

    gradient_levels = tuple(lv for lv in levels if lv != "modality")
    decls, undeclared = plan(net, gradient_levels) if gradient_levels else ({}, [])
    if gradient_levels:
        have = {d.level for ds in decls.values() for d in ds}
        lacking = [lv for lv in gradient_levels if lv not in have]
        if lacking:
            encs = {m: type(e).__name__ for m, e in members(net)[0].encoders.items()}
            raise ValueError(f"level(s) {lacking}: no encoder of this model declares attributable inputs of that "
                             f"level (encoders: {encs}); docs/explanations.md lists which encoders declare which level")

    n_players = len(names)
    shapley = None
    if "modality" in levels:
        shapley = "exact" if method == "exact" or (method == "auto" and n_players <= EXACT_UP_TO) else "sampling"
        if shapley == "exact" and n_players > MAX_EXACT:
            raise ValueError(f"exact Shapley values over {n_players} modalities need 2^{n_players} coalitions; "
                             f"use method='sampling' (exact is allowed up to {MAX_EXACT})")

    id_column = id_column or fitted.id_column
    ids = frame[id_column] if id_column and id_column in frame.columns else None
    started = time.perf_counter()
    phi_all, empty_all, ref_all, delta_all = [], [], [], []
    gradient_rows: dict[str, list[pl.DataFrame]] = {}
    with torch.enable_grad():  # IG needs gradients even when called under no_grad
        for start in range(0, n, batch_size):
            rows = np.arange(start, min(start + batch_size, n))
            b = table.batch(torch.as_tensor(rows)).to(device)
            if shapley is not None:
                fwd = CoalitionForward(net, b.inputs, b.present, _row_scalar(tgt, rows))
                phi, _, empty = (exact_shapley(fwd) if shapley == "exact"
                                 else sampled_shapley(fwd, n_samples, seed=random_state + start))
                phi_all.append(phi.cpu())
                empty_all.append(empty.cpu())
            if gradient_levels:
                parts, attrs, reference, delta = integrated_gradients(net, b.inputs, b.present, tgt, rows, n_steps,
                                                                      levels=gradient_levels)
                ref_all.append(reference.cpu().double())
                delta_all.append(delta.cpu().double())
                for level, frames in _gradient_frames(fitted, b, rows, parts, attrs).items():
                    # one subject's rows together, in declaration order, whatever the batching
                    gradient_rows.setdefault(level, []).append(
                        pl.concat(frames, how="diagonal_relaxed").sort("row", maintain_order=True))
    seconds = time.perf_counter() - started

    row_ids = pl.Series("row", np.arange(n), dtype=pl.Int64)
    out_cols: dict[str, Any] = {"row": row_ids, "target": tgt.label_of_rows(),
                                "output": _explained(tgt, outputs)}
    modality_frame = None
    if shapley is not None:
        phi = torch.cat(phi_all).numpy()
        out_cols["all_absent"] = torch.cat(empty_all).numpy()
        present = np.stack([table.present[m].numpy() for m in names], 1)
        modality_frame = pl.DataFrame({
            "row": np.repeat(np.arange(n), n_players),
            "modality": np.tile(names, n),
            "present": present.reshape(-1),
            "attribution": phi.reshape(-1),
        }, schema_overrides={"row": pl.Int64}).with_columns(pl.col("modality").cast(pl.Categorical))
    if gradient_levels:
        out_cols["reference"] = torch.cat(ref_all).numpy()
        out_cols["ig_delta"] = torch.cat(delta_all).numpy()
    out_frame = pl.DataFrame(out_cols)

    frames = {lv: pl.concat(fs, how="diagonal_relaxed", rechunk=False) for lv, fs in gradient_rows.items()}
    if ids is not None:
        # rows are positions in the frame: gather the ids (a join would copy the whole frame)
        attach = lambda f: None if f is None else f.select(  # noqa: E731
            "row", ids.gather(f["row"]).alias(id_column), *[c for c in f.columns if c != "row"])
        out_frame, modality_frame = attach(out_frame), attach(modality_frame)
        frames = {k: attach(v) for k, v in frames.items()}

    info = {
        "target": tgt.description,
        "task": fitted.task.task_name,
        "horizon": horizon,
        "n_subjects": n,
        "modalities": names,
        "fusion": fitted.model_config.fusion.name,
        "ensemble_size": len(members(net)),
        "shapley_method": shapley,
        "n_samples": n_samples if shapley == "sampling" else None,
        "n_steps": n_steps if gradient_levels else None,
        "ig_method": "Integrated Gradients (Captum, Gauss-Legendre)" if gradient_levels else None,
        "baselines": {f"{m}/{d.key}": d.baseline_text for m, ds in decls.items() for d in ds},
        "not_attributable": undeclared,
        "batch_size": batch_size,
        "seconds": seconds,
        "id_column": id_column if ids is not None else None,
        "untrained_patterns": untrained_patterns(fitted, table.present) if "modality" in levels else None,
    }
    return Explanation(outputs=out_frame, modality=modality_frame, feature=frames.pop("feature", None),
                       gene_set=frames.pop("gene_set", None), other=frames, info=info)


def untrained_patterns(fitted: Any, present: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """Coalitions the modality Shapley values evaluate (the subsets of each subject's present modalities)
    that training never showed the network: their outputs, and so those values, are extrapolation.

    Returns ``{"patterns": ["clinical", ...], "n_subjects": k, "modality_dropout": p}``, ``{}`` when every
    coalition was seen (the empty one aside: dropout never removes every modality), or None when the model
    does not record its training patterns (saved before mmclin recorded them).
    """
    from mmclin.training.core import nonempty_subsets, pattern_modalities, presence_patterns

    seen = fitted.trained_patterns()
    if seen is None:
        return None
    missing: set[frozenset[str]] = set()
    affected = 0
    for pattern, rows in presence_patterns(present).items():
        unseen = nonempty_subsets(pattern_modalities(pattern)) - seen
        if unseen:
            missing |= unseen
            affected += rows
    if not missing:
        return {}
    return {"patterns": sorted("+".join(sorted(p)) for p in missing), "n_subjects": affected,
            "modality_dropout": fitted.model_config.modality_dropout}


def _explained(tgt: ExplainTarget, outputs: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        cols = tgt.columns(torch.as_tensor(outputs, dtype=torch.float32))
        return tgt.select(cols).double().numpy()


def _row_scalar(tgt: ExplainTarget, rows: np.ndarray):
    """The explained scalar for rows repeated ``k`` times (coalitions stacked along the batch)."""
    base = torch.as_tensor(tgt.index[rows], dtype=torch.long)

    def scalar(out: torch.Tensor) -> torch.Tensor:
        k = out.shape[0] // len(rows)
        idx = base.repeat(k).to(out.device).reshape(-1, 1)
        return tgt.columns(out).gather(1, idx).squeeze(1)

    return scalar


def _gradient_frames(fitted: Any, batch: Any, rows: np.ndarray, parts: list, attrs: list) -> dict[str, list[pl.DataFrame]]:
    """Tidy rows per level from one batch's IG attributions (members summed; absent subjects and
    padded positions dropped), plus gene-set and ``aggregate_by`` sums."""
    summed: dict[tuple[str, str], tuple[Any, torch.Tensor]] = {}
    for part, a in zip(parts, attrs):
        key = (part.modality, part.decl.key)
        red = reduce_attribution(part, a).cpu()
        summed[key] = (part.decl, red if key not in summed else summed[key][1] + red)
    out: dict[str, list[pl.DataFrame]] = {}
    inputs_cpu = {m: {k: t.cpu() for k, t in d.items()} for m, d in batch.inputs.items()}
    nets = members(fitted.net)
    for (m, key), (decl, a) in summed.items():
        present = batch.present[m].cpu().numpy()
        featurizer = fitted.featurizers[m]
        a = a.numpy()
        shape = a.shape[1:]
        per_row = int(np.prod(shape))
        cols: dict[str, Any] = {"row": np.repeat(rows, per_row)}
        grid = np.indices(shape).reshape(len(shape), -1)
        for ax, (axis, idx) in enumerate(zip(decl.axes, grid)):
            if ax == 0 and decl.names is not None:  # names as a categorical: millions of rows, few names
                names = pl.Series(axis, featurizer.feature_names()[decl.names], dtype=pl.Categorical)
                cols[axis] = names.gather(np.tile(idx, len(rows)))
            else:
                cols[axis] = np.tile(idx, len(rows))
        if decl.display is not None:
            shown = np.asarray(decl.display(featurizer, inputs_cpu[m])).reshape(-1)
            cols["value" if shown.dtype.kind == "f" else "category"] = shown
        if decl.missing_key is not None:
            cols["missing"] = inputs_cpu[m][decl.missing_key].numpy().reshape(-1)
        elif "category" in cols:
            cols["missing"] = np.array([v is None for v in cols["category"]])
        encoders = [net.encoders[m] for net in nets]
        for name, fn in decl.columns.items():
            cols[name] = np.asarray(fn(featurizer, encoders, inputs_cpu[m])).reshape(-1)
        cols["attribution"] = a.reshape(-1)
        keep = np.repeat(present, per_row)
        if decl.valid_key is not None:
            keep &= inputs_cpu[m][decl.valid_key].numpy().reshape(-1).astype(bool)
        dtypes = {"row": pl.Int64, "value": pl.Float64, "missing": pl.Boolean, "attribution": pl.Float64}
        data = {}
        for k, v in cols.items():
            if isinstance(v, pl.Series):
                data[k] = v.filter(pl.Series(keep))
            elif k == "category" or np.asarray(v).dtype == object:  # strings (None = missing) as categoricals
                data[k] = pl.Series(k, np.asarray(v)[keep].tolist(), dtype=pl.String, strict=False).cast(pl.Categorical)
            else:
                data[k] = pl.Series(k, np.asarray(v)[keep], dtype=dtypes.get(k), strict=False)
        df = pl.DataFrame(data).with_columns(pl.lit(m, dtype=pl.Categorical).alias("modality"),
                                             pl.lit(key, dtype=pl.Categorical).alias("input"))
        df = df.select("row", "modality", "input", *[c for c in df.columns if c not in ("row", "modality", "input")])
        if "value" in df.columns:
            df = df.with_columns(pl.col("value").fill_nan(None))
        out.setdefault(decl.level, []).append(df)
        if decl.aggregate_by is not None:
            by = decl.aggregate_by
            out.setdefault(f"{decl.level}_by_{by}", []).append(
                df.group_by("row", "modality", by, maintain_order=True).agg(
                    pl.col("attribution").sum(), pl.len().alias("n")))
        groups = decl.groups(featurizer) if decl.groups is not None else None
        if groups:
            names = list(groups)
            sums = np.stack([a[:, idx].sum(1) for idx in groups.values()], 1)  # [B, G]
            keep_g = np.repeat(present, len(names))
            out.setdefault("gene_set", []).append(pl.DataFrame({
                "row": np.repeat(rows, len(names))[keep_g],
                "gene_set": np.tile(names, len(rows))[keep_g],
                "n_genes": np.tile([len(v) for v in groups.values()], len(rows))[keep_g],
                "attribution": sums.reshape(-1)[keep_g],
            }, schema_overrides={"row": pl.Int64}).with_columns(pl.lit(m, dtype=pl.Categorical).alias("modality")).select(
                "row", "modality", "gene_set", "n_genes", "attribution"))
    return out
