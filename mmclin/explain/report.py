"""Matplotlib plots and the HTML report of an :class:`~mmclin.explain.explanation.Explanation`."""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _colour(expl: Any, modality: str) -> str:
    """One colour per modality, the same in every plot of the explanation."""
    names = list(expl.info.get("modalities") or [modality])
    return _COLOURS[(names.index(modality) if modality in names else 0) % len(_COLOURS)]


def plot_level(expl: Any, level: str, path: str | Path | None, top: int) -> Any:
    """Global importance of ``level`` as a figure; saved as PNG when ``path`` is given."""
    summary = expl.summary(level)
    target = expl.info.get("target", "")
    if level == "modality":
        plt = _pyplot()
        names = summary["modality"].to_list()[::-1]
        fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 1.2 + 0.55 * len(names)), sharey=True)
        means = summary["mean_abs"].to_numpy()[::-1]
        shares = summary["share"].to_numpy()[::-1]
        colours = [_colour(expl, m) for m in names]
        ax0.barh(names, means, color=colours)
        for y, (v, s) in enumerate(zip(means, shares)):
            ax0.text(v, y, f" {s:.0%}", va="center", fontsize=9)
        ax0.set_xlabel("mean |Shapley value|")
        ax0.set_xlim(0, max(float(means.max()), 1e-12) * 1.25)
        frame = expl.modality
        rng = np.random.default_rng(0)
        for y, m in enumerate(names):
            vals = frame.filter(frame["modality"] == m)
            phi = vals.filter(vals["present"])["attribution"].to_numpy()
            ax1.scatter(phi, y + rng.uniform(-0.25, 0.25, len(phi)), s=6, alpha=0.5, color=colours[y])
        ax1.axvline(0, color="grey", lw=0.8)
        ax1.set_xlabel("Shapley value per subject (present only)")
        fig.suptitle(f"Modality contributions to {target}\n(n = {expl.info.get('n_subjects')}, "
                     f"{expl.info.get('shapley_method')} Shapley values)", fontsize=10)
    else:
        plt = _pyplot()
        head = summary.head(top)
        if level == "feature":
            labels = [f"{m}: {f}" for m, f in zip(head["modality"], head["feature"])]
        elif level == "time_by_variable":
            labels = [f"{m}: {v}" for m, v in zip(head["modality"], head["variable"])]
        elif level == "gene_set":
            labels = [f"{m}: {g} ({k})" for m, g, k in zip(head["modality"], head["gene_set"],
                                                             _n_genes(expl, head))]
        else:
            keys = [c for c in head.columns if c not in ("mean_abs", "mean", "n", "rank")]
            labels = [": ".join(str(v) for v in row) for row in head.select(keys).iter_rows()]
        mods = sorted(set(head["modality"].to_list()))
        colour = {m: _colour(expl, m) for m in mods}
        fig, ax = plt.subplots(figsize=(8, 1.2 + 0.3 * len(labels)))
        ax.barh(labels[::-1], head["mean_abs"].to_numpy()[::-1], color=[colour[m] for m in head["modality"].to_list()[::-1]])
        ax.set_xlabel("mean |attribution| (subjects with the modality present)")
        handles = [plt.Rectangle((0, 0), 1, 1, color=colour[m]) for m in mods]
        ax.legend(handles, mods, loc="lower right", fontsize=8)
        what = {"feature": "Features", "gene_set": "Gene sets", "time_by_variable": "Time-series variables"}.get(level, level)
        ax.set_title(f"{what}: top {len(labels)} by mean |attribution| to {target}\n(Integrated Gradients, "
                     f"{expl.info.get('n_steps')} steps)", fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _n_genes(expl: Any, head: Any) -> list[int]:
    sizes = expl.gene_set.group_by(["modality", "gene_set"]).agg(pl.col("n_genes").first())
    lookup = {(m, g): k for m, g, k in sizes.iter_rows()}
    return [lookup[(m, g)] for m, g in zip(head["modality"], head["gene_set"])]


def _table(frame: Any, digits: int = 4) -> str:
    cells = ["<tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns) + "</tr>"]
    for row in frame.iter_rows():
        cells.append("<tr>" + "".join(
            f"<td>{v:.{digits}g}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>")
    return "<table>" + "".join(cells) + "</table>"


def html_report(expl: Any, path: Path, top: int, images: dict[str, Path] | None) -> Path:
    """Write a self-contained HTML page: what was explained and how, summaries, inlined plots."""
    import matplotlib.pyplot as plt

    info = expl.info
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>mmclin explanation</title><style>"
        "body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px;"
        "text-align:right}th{background:#f3f3f3}img{max-width:100%}</style></head><body>",
        "<h1>Explanation report</h1>",
        f"<p><b>Explained:</b> {html.escape(str(info.get('target')))} for {info.get('n_subjects')} subjects; "
        f"task <code>{html.escape(str(info.get('task')))}</code>, fusion <code>{html.escape(str(info.get('fusion')))}"
        f"</code>, {info.get('ensemble_size')} network(s).</p>",
    ]
    checks = expl.completeness()
    if info.get("n_steps"):
        parts.append(
            f"<h2>How gradient attributions were computed</h2><p>Integrated Gradients ({info.get('n_steps')} "
            "Gauss-Legendre steps, Captum) on the encoders' inputs, each subject's modality presence unchanged; "
            f"largest convergence delta {checks.get('ig_max_delta', float('nan')):.2e} "
            f"({checks.get('ig_max_relative_delta', float('nan')):.1%} of the largest |output - reference|). "
            "Baselines (the reference each attribution is measured from):</p><ul>" + "".join(
                f"<li><code>{html.escape(k)}</code>: {html.escape(v)}</li>" for k, v in info.get("baselines", {}).items())
            + "</ul>")
    images = dict(images or {})
    for level, title in (("modality", "Modalities"), ("feature", "Features"), ("gene_set", "Gene sets"),
                         ("time_by_variable", "Time-series variables")):
        if expl.frames().get(level) is None:
            continue
        parts.append(f"<h2>{title}</h2>")
        if level == "modality":
            method = info.get("shapley_method")
            parts.append(
                f"<p>Shapley values with the modalities as players ({html.escape(str(method))}"
                + (f", {info.get('n_samples')} sampled orderings" if method == "sampling" else ", all coalitions")
                + "). A modality is removed through the presence mask, exactly as a missing one; per subject the "
                "values add up to the output minus the output with every modality absent (largest error "
                f"{checks.get('modality_max_error', float('nan')):.2e}). A modality whose values barely vary "
                "(small <code>std</code>, |<code>mean</code>| close to <code>mean_abs</code>) mostly carries the constant "
                "gap between the model's output without it and its output with nothing at all.</p>")
        elif level == "feature" and info.get("not_attributable"):
            parts.append(f"<p>No feature-level attributions for {html.escape(str(info['not_attributable']))} "
                         "(their encoders declare no attributable inputs).</p>")
        elif level == "gene_set":
            parts.append("<p>Sum of the Integrated Gradients attributions of each gene set's genes.</p>")
        elif level == "time_by_variable":
            parts.append("<p>Per subject, the sum of the Integrated Gradients attributions of each variable's "
                         "observations; the summary is the mean |sum| over the subjects with that variable.</p>")
        if level not in images:
            fig = plot_level(expl, level, None, top)
            images[level] = fig
        img = images[level]
        if isinstance(img, Path):
            data = img.read_bytes()
        else:
            import io

            buf = io.BytesIO()
            img.savefig(buf, format="png", dpi=110)
            plt.close(img)
            data = buf.getvalue()
        parts.append(f"<img alt='{level} importance' src='data:image/png;base64,{base64.b64encode(data).decode()}'>")
        parts.append(_table(expl.summary(level).head(top)))
    parts.append(f"<p style='color:#777'>Computed in {info.get('seconds', float('nan')):.1f} s, "
                 f"{info.get('batch_size')} subjects per pass.</p></body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
