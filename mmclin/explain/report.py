"""Matplotlib plots and the HTML report of an :class:`~mmclin.explain.explanation.Explanation`.

The report is written for a clinical reader: **findings** first (what drove the predictions,
in words, with the direction of each effect), then a **cohort summary**, **individual
patients**, and the **methods** (how it was computed and checked) last.
"""
from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

# a feature "raises" / "lowers" the prediction when corr(value, contribution) is at least this far from 0
DIRECTION_MIN_CORR = 0.2

# modalities: no orange or blue, which mean "raises" / "lowers" in the other plots
_COLOURS = ["#009e73", "#cc79a7", "#8c564b", "#9467bd", "#bcbd22", "#e6ab02", "#17becf", "#7f7f7f", "#d62728", "#2ca02c"]
# direction of effect (colour-blind safe, Okabe-Ito): raises the output, lowers it, neither / categories
RAISES, LOWERS, NEUTRAL = "#d55e00", "#0072b2", "#9a9a9a"
KIND_WORDS = {"genomics": "gene expression", "irregular_series": "time series", "notes": "clinical notes",
              "slide": "slides", "image": "images"}
# Affymetrix probe set ids (205225_at, 209500_x_at, AFFX-...), with R's "X" prefix of a column name
_PROBE = re.compile(r"^(X?\d+(_[a-z])?_at|AFFX-.+)$")
N_FINDINGS = 5  # features named in the findings
N_PATIENT_FEATURES = 6  # features shown per patient
IG_GAP_WARNING = 0.1  # the feature contributions miss more than 10 % of the largest output change: say so


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _colour(expl: Any, modality: str) -> str:
    """One colour per modality, the same in every plot of the explanation."""
    names = list(expl.info.get("modalities") or [modality])
    return _COLOURS[(names.index(modality) if modality in names else 0) % len(_COLOURS)]


# --- words ---------------------------------------------------------------------------------------
def _split_key(info: dict) -> tuple[str, str]:
    """A multitask description's sub-task key and the rest (``"death: log-odds ..."``)."""
    desc = str(info.get("target") or "")
    if info.get("task") == "multitask" and ": " in desc:
        key, rest = desc.split(": ", 1)
        return key, rest
    return "", desc


def quantity(info: dict) -> str:
    """What the explained output is, in plain words: "the predicted survival probability at
    1825 days (5.0 years)", "the predicted risk score (higher = earlier event)"."""
    from mmclin.explain.targets import horizon_text

    key, desc = _split_key(info)
    unit = info.get("time_unit")
    if desc.startswith("S(") and info.get("horizon") is not None:
        words = f"the predicted survival probability at {horizon_text(float(info['horizon']), unit)}"
    elif desc.startswith("log-risk"):
        words = "the predicted risk score (log relative hazard; higher = earlier event)"
    elif desc.startswith("risk = -RMST"):
        m = re.search(r"up to (.+?) \(", desc)
        words = ("the predicted risk (minus the expected event-free time" + (f" up to {m[1]}" if m else "")
                 + "; higher = earlier event)")
    elif desc.startswith("log-odds of class"):
        m = re.search(r"class '(.*)'", desc)
        words = f"the predicted log-odds of {m[1]!r}" if m else "the predicted log-odds"
    elif desc.startswith("log-probability of a class"):
        words = "the predicted log-probability of each patient's class (column 'target')"
    elif desc.startswith("logit of a label"):
        words = "the predicted logit of each patient's label (column 'target')"
    elif desc.startswith("prediction (regression"):
        words = "the predicted value"
    else:
        words = desc or "the model's output"
    return f"{words} for {key!r}" if key else words


def brief_quantity(info: dict) -> str:
    """The explained output in a few words, for sentences after the first: "the predicted survival
    probability", "the predicted risk", "the prediction"."""
    _, desc = _split_key(info)
    if desc.startswith("S(") and info.get("horizon") is not None:
        return "the predicted survival probability"
    if desc.startswith(("log-risk", "risk = -RMST")):
        return "the predicted risk"
    if desc.startswith("log-odds of class"):
        m = re.search(r"class '(.*)'", desc)
        return f"the predicted log-odds of '{m[1]}'" if m else "the predicted log-odds"
    if desc.startswith(("log-probability", "logit")):
        return "the predicted " + desc.split(" of")[0]
    return "the prediction"


def short_quantity(info: dict) -> str:
    """A label for axes and titles: "S(1825 days)", "risk score", "log-odds of 'yes'"."""
    from mmclin.explain.targets import time_text

    key, desc = _split_key(info)
    if desc.startswith("S(") and info.get("horizon") is not None:
        out = f"S({time_text(float(info['horizon']), info.get('time_unit'))})"
    elif desc.startswith(("log-risk", "risk = -RMST")):
        out = "risk score"
    elif desc.startswith("log-odds of class"):
        m = re.search(r"class '(.*)'", desc)
        out = f"log-odds of '{m[1]}'" if m else "log-odds"
    elif desc.startswith("prediction"):
        out = "prediction"
    else:
        out = "output"
    return f"{key}: {out}" if key else out


def modality_words(info: dict, modality: str) -> str:
    """``gene expression (genes)`` when the kind is known and says more than the name."""
    kind = (info.get("modality_kinds") or {}).get(modality)
    words = KIND_WORDS.get(kind or "")
    return f"{words} ({modality})" if words and words != modality else modality


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if isinstance(v, (float, np.floating)):
        return f"{v:.{digits}g}"
    return str(v)


def _signed(v: float, digits: int = 2) -> str:
    return ("+" if v > 0 else "−" if v < 0 else "") + f"{abs(v):.{digits}g}"


def _within(v: float) -> str:
    """ "exactly" for 0, else "within 2.4e-03"."""
    return "exactly" if v == 0 else f"within {v:.1e}"


def _e(text: Any) -> str:
    return html.escape(str(text))


# --- plots -------------------------------------------------------------------------------------
def _direction_colour(direction: str | None) -> str:
    if direction == "higher raises":
        return RAISES
    if direction == "higher lowers":
        return LOWERS
    return NEUTRAL


def plot_level(expl: Any, level: str, path: str | Path | None, top: int) -> Any:
    """Global importance of ``level`` as a figure; saved as PNG when ``path`` is given."""
    summary = expl.summary(level)
    info = expl.info
    q = short_quantity(info)
    plt = _pyplot()
    if level == "modality":
        names = summary["modality"].to_list()[::-1]
        fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 1.6 + 0.55 * len(names)), sharey=True, layout="constrained")
        means = summary["mean_abs"].to_numpy()[::-1]
        shares = summary["share"].to_numpy()[::-1]
        colours = [_colour(expl, m) for m in names]
        ax0.barh(names, means, color=colours)
        for y, (v, s) in enumerate(zip(means, shares)):
            ax0.text(v, y, f" {s:.0%}", va="center", fontsize=9)
        ax0.set_xlabel(f"average size of the contribution to {q}\n(mean |Shapley value|; % = share)")
        ax0.set_xlim(0, max(float(means.max()), 1e-12) * 1.25)
        frame = expl.modality
        rng = np.random.default_rng(0)
        for y, m in enumerate(names):
            vals = frame.filter(frame["modality"] == m)
            phi = vals.filter(vals["present"])["attribution"].to_numpy()
            ax1.scatter(phi, y + rng.uniform(-0.25, 0.25, len(phi)), s=6, alpha=0.5, color=colours[y])
        ax1.axvline(0, color="grey", lw=0.8)
        ax1.set_xlabel(f"contribution per patient (patients with the data)\n← lowers {q}   ·   raises {q} →")
        fig.suptitle(f"How much each modality moved {q}  (n = {info.get('n_subjects')} patients)", fontsize=10)
    else:
        head = summary.head(top)
        if level == "feature":
            labels = [f"{m}: {expl.label(f)}" for m, f in zip(head["modality"], head["feature"])]
        elif level == "time_by_variable":
            labels = [f"{m}: {v}" for m, v in zip(head["modality"], head["variable"])]
        elif level == "gene_set":
            labels = [f"{m}: {g} ({k} genes)" for m, g, k in zip(head["modality"], head["gene_set"],
                                                                   _n_genes(expl, head))]
        else:
            keys = [c for c in head.columns if c not in ("mean_abs", "mean", "n", "rank", "corr", "direction")]
            labels = [": ".join(str(v) for v in row) for row in head.select(keys).iter_rows()]
        fig, ax = plt.subplots(figsize=(8.5, 2.2 + 0.3 * len(labels)), layout="constrained")
        if "direction" in head.columns:  # coloured by the direction of effect
            colours = [_direction_colour(d) for d in head["direction"].to_list()]
            handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in (RAISES, LOWERS, NEUTRAL)]
            names = [f"higher value raises {q}", f"higher value lowers {q}", "no clear direction / categories"]
        else:  # sums over genes or observations have no value to compare: coloured by modality
            colours = [_colour(expl, m) for m in head["modality"].to_list()]
            names = sorted(set(head["modality"].to_list()))
            handles = [plt.Rectangle((0, 0), 1, 1, color=_colour(expl, m)) for m in names]
        ax.barh(labels[::-1], head["mean_abs"].to_numpy()[::-1], color=colours[::-1])
        ax.set_xlabel(f"average size of the contribution to {q} (mean |attribution|, patients with the data)")
        ax.tick_params(axis="y", labelsize=8)
        fig.legend(handles, names, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
        what = {"feature": "Features", "gene_set": "Gene sets", "time_by_variable": "Time-series variables"}.get(level, level)
        ax.set_title(f"{what} that moved {q} most: top {len(labels)} of {summary.height}", fontsize=10)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _patient_id(expl: Any, row: int) -> str:
    id_col = expl.info.get("id_column")
    o = expl.outputs
    if id_col and id_col in o.columns:
        value = str(o.filter(pl.col("row") == row)[id_col][0])
        return f"{id_col} {value}" if value.isdigit() else value  # a bare number says little
    return f"row {row}"


def _patient_features(expl: Any, row: int, k: int) -> pl.DataFrame:
    """One subject's ``k`` features with the largest |attribution|: label, shown value, attribution."""
    f = expl.feature.filter(pl.col("row") == row)
    f = f.with_columns(pl.col("attribution").abs().alias("_abs")).sort("_abs", descending=True).head(k)
    shown = []
    for r in f.iter_rows(named=True):
        if r.get("missing"):
            shown.append("missing")
        elif r.get("value") is not None:
            shown.append(f"{r['value']:.3g}")
        else:
            shown.append(str(r.get("category")))
    return pl.DataFrame({"modality": f["modality"].cast(pl.String), "feature": [expl.label(x) for x in f["feature"].cast(pl.String)],
                         "value": shown, "attribution": f["attribution"]})


def plot_patients(expl: Any, rows: list[tuple[int, str]], path: str | Path | None, k: int = 8) -> Any:
    """Per patient (one row of panels each): signed modality contributions and the ``k`` features
    with the largest contributions; orange raises the output, blue lowers it."""
    plt = _pyplot()
    panels = [p for p in ("modality", "feature") if expl.frames().get(p) is not None]
    q = short_quantity(expl.info)
    fig, axes = plt.subplots(len(rows), len(panels), figsize=(6 * len(panels), 0.6 + 2.4 * len(rows)),
                             squeeze=False, layout="constrained")
    out = expl.outputs
    for i, (row, why) in enumerate(rows):
        o = out.filter(pl.col("row") == row).row(0, named=True)
        for j, panel in enumerate(panels):
            ax = axes[i][j]
            if panel == "modality":
                m = expl.modality.filter(pl.col("row") == row).sort("modality")
                labels = [f"{n}" + ("" if p else " (no data)") for n, p in zip(m["modality"].cast(pl.String), m["present"])]
                vals = m["attribution"].to_numpy()
                start, what = o.get("all_absent"), "with no data"
            else:
                f = _patient_features(expl, row, k)
                labels = [f"{lab} = {v}" for lab, v in zip(f["feature"], f["value"])]
                vals = f["attribution"].to_numpy()
                start, what = o.get("reference"), "for the reference patient"
            y = np.arange(len(vals))[::-1]
            ax.barh(y, vals, color=[RAISES if v > 0 else LOWERS for v in vals])
            ax.set_yticks(y, labels, fontsize=8)
            ax.axvline(0, color="grey", lw=0.8)
            lim = max(float(np.abs(vals).max()) if len(vals) else 0.0, 1e-12) * 1.15
            ax.set_xlim(-lim, lim)
            ax.set_title(f"{_patient_id(expl, row)} ({why}): {q} = {o['output']:.3g}"
                         + (f"\n{panel} contributions; {start:.3g} {what}" if start is not None else ""), fontsize=9)
            if i == len(rows) - 1:
                ax.set_xlabel(f"← lowers {q}   ·   raises {q} →", fontsize=8)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def _n_genes(expl: Any, head: Any) -> list[int]:
    sizes = expl.gene_set.group_by(["modality", "gene_set"]).agg(pl.col("n_genes").first())
    lookup = {(m, g): k for m, g, k in sizes.iter_rows()}
    return [lookup[(m, g)] for m, g in zip(head["modality"], head["gene_set"])]


# --- HTML ------------------------------------------------------------------------------------------
def _table(frame: Any, digits: int = 3, headers: dict[str, str] | None = None) -> str:
    headers = headers or {}
    cells = ["<tr>" + "".join(f"<th>{_e(headers.get(c, c))}</th>" for c in frame.columns) + "</tr>"]
    for row in frame.iter_rows():
        cells.append("<tr>" + "".join(f"<td>{_e(_fmt(v, digits))}</td>" for v in row) + "</tr>")
    return "<table>" + "".join(cells) + "</table>"


def _img(data: bytes, alt: str) -> str:
    return f"<img alt='{_e(alt)}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>"


def _png(image: Any) -> bytes:
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    plt = _pyplot()
    buf = io.BytesIO()
    image.savefig(buf, format="png", dpi=110)
    plt.close(image)
    return buf.getvalue()


def _effect_sentence(expl: Any, r: dict, q: str) -> str:
    name = f"<b>{_e(expl.label(r['feature']))}</b>"
    d = r.get("direction")
    if d in ("higher raises", "higher lowers"):
        verb = "raises" if d == "higher raises" else "lowers"
        return f"Higher {name} {verb} {_e(q)} (r = {_signed(r['corr'])} between its value and its contribution)."
    if r.get("corr") is not None or d == "no clear direction":
        return (f"{name} matters in both directions: its contribution does not follow its value consistently"
                + (f" (r = {_signed(r['corr'])})." if r.get("corr") is not None else "."))
    if d:
        parts = []
        for verb in ("raises", "lowers"):
            m = re.search(rf"'([^']*)' {verb}", d)
            if m:
                parts.append(f"{name} = '{_e(m[1])}' {verb} {_e(q)}" if not parts else f"'{_e(m[1])}' {verb} it")
        return ("; ".join(parts) + ".") if parts else f"{name}."
    return f"{name}."


def untrained_warning(info: dict[str, Any]) -> str | None:
    """One sentence when modality values rest on presence patterns training never showed the network."""
    u = info.get("untrained_patterns")
    if not u:
        return None
    shown = ", ".join(u["patterns"][:6]) + (", ..." if len(u["patterns"]) > 6 else "")
    return (f"Caution: the modality contributions of {u['n_subjects']} subject(s) rest on combinations of modalities "
            f"that training never showed the model ({shown}): the model was trained with modality dropout "
            f"{u['modality_dropout']:g}, so its outputs with those modalities alone are extrapolation. Train with "
            "modality dropout (e.g. model.modality_dropout: 0.2) for contributions that mean what they say.")


def _findings(expl: Any, q: str) -> list[str]:
    info = expl.info
    brief = brief_quantity(info)
    items = []
    caution = untrained_warning(info)
    if caution:
        items.append(f"<b>{_e(caution)}</b>")
    if expl.modality is not None:
        s = expl.summary("modality")
        shares = [(r["modality"], r["share"]) for r in s.iter_rows(named=True) if r["share"] is not None]
        if len(shares) == 1:
            items.append(f"All of the explained effect comes from {_e(modality_words(info, shares[0][0]))}, the only modality.")
        elif shares:
            first, rest = shares[0], shares[1:]
            items.append(f"<b>{_e(_cap(modality_words(info, first[0])))}</b> accounts for <b>{first[1]:.0%}</b> of the "
                         f"explained effect on {_e(brief)}; " + ", ".join(f"{_e(modality_words(info, m))} {v:.0%}" for m, v in rest)
                         + ". (Share of the average size of each modality's contribution.)")
            means = [(r["modality"], r["mean"]) for r in s.iter_rows(named=True)]
            pushes = [f"{_e(m)} {'raises' if v > 0 else 'lowers'} it on average ({_signed(v)})" for m, v in means
                      if v is not None and abs(v) > 0.25 * (s.filter(pl.col("modality") == m)["mean_abs"][0] or 0)]
            if pushes:
                items.append("Compared with the prediction with no data: " + "; ".join(pushes) + ".")
    if expl.feature is not None:
        s = expl.summary("feature")
        f = s.head(N_FINDINGS)
        names = ", ".join(_e(expl.label(x)) for x in f["feature"])
        items.append(f"The features that moved {_e(brief)} most: {names}.")
        items.extend(_effect_sentence(expl, r, brief) for r in f.iter_rows(named=True))
        # each other modality's most influential feature, so no modality goes unmentioned
        for m in [m for m in dict.fromkeys(s["modality"]) if m not in set(f["modality"])]:
            r = s.filter(pl.col("modality") == m).row(0, named=True)
            effect = _effect_sentence(expl, r, brief)
            effect = "h" + effect[1:] if effect.startswith("Higher ") else effect
            items.append(f"Of the {_e(modality_words(info, m))} features, {_e(expl.label(r['feature']))} matters most "
                         f"(rank {r['rank']}): " + effect)
        gap = expl.completeness().get("ig_max_relative_delta", 0.0)
        if gap > IG_GAP_WARNING:
            items.append(f"<b>Caution:</b> the feature contributions are approximate here (they miss up to {gap:.0%} of "
                         "the change they explain; see Methods): rerun with more steps (<code>--n-steps</code>).")
    if expl.gene_set is not None:
        g = expl.summary("gene_set").head(3)
        items.append("Gene sets that moved it most: " + ", ".join(_e(x) for x in g["gene_set"]) + ".")
    if "time_by_variable" in expl.other:
        t = expl.summary("time_by_variable").head(3)
        items.append("Time-series variables that moved it most: " + ", ".join(_e(x) for x in t["variable"]) + ".")
    return items


def _patient_section(expl: Any, rows: list[tuple[int, str]], q: str, images: dict) -> list[str]:
    info = expl.info
    o = expl.outputs
    median = float(np.median(o["output"].to_numpy()))
    parts = ["<section id='patients'><h2>Individual patients</h2>",
             f"<p>Why the model predicted what it did for {len(rows)} patients "
             + ("(the ones asked for)" if all(w == "requested" for _, w in rows) else "(the highest and the lowest predictions)")
             + f", {_e(q)}; the cohort median is {median:.3g}. Contributions are signed: "
             f"<span style='color:{RAISES}'>+ raises</span>, <span style='color:{LOWERS}'>− lowers</span> the prediction. "
             "Modality contributions start from the prediction with no data; feature contributions from the prediction "
             "for a <i>reference patient</i> with average values (see Methods).</p>"]
    if "patients" not in images:
        images["patients"] = plot_patients(expl, rows, None)
    parts.append(_img(_png(images["patients"]), "per-patient contributions"))
    if expl.modality is not None:
        names = list(info.get("modalities") or sorted(set(expl.modality["modality"].cast(pl.String))))
        table = []
        for row, why in rows:
            orow = o.filter(pl.col("row") == row).row(0, named=True)
            m = {r["modality"]: (r["attribution"] if r["present"] else None)
                 for r in expl.modality.filter(pl.col("row") == row).with_columns(pl.col("modality").cast(pl.String)).iter_rows(named=True)}
            table.append({"patient": _patient_id(expl, row), "why shown": why, "prediction": orow["output"],
                          "with no data": orow.get("all_absent"),
                          **{n: (_signed(m[n], 3) if m.get(n) is not None else "no data") for n in names}})
        parts.append("<p>Modality contributions: they add up to the prediction minus the prediction with no data.</p>"
                     + _table(pl.DataFrame(table)))
    if expl.feature is not None:
        for row, why in rows:
            orow = o.filter(pl.col("row") == row).row(0, named=True)
            f = _patient_features(expl, row, N_PATIENT_FEATURES)
            words = "; ".join(f"{_e(lab)} = {_e(v)} ({_signed(a)})" for lab, v, a in zip(f["feature"], f["value"], f["attribution"]))
            parts.append(f"<h3>{_e(_patient_id(expl, row))} <small>({_e(why)})</small></h3>"
                         f"<p>{_e(_cap(q))}: <b>{orow['output']:.3g}</b> (reference patient: {orow.get('reference', float('nan')):.3g}). "
                         f"Largest contributions: {words}.</p>")
            shown = f.with_columns(pl.when(pl.col("attribution") > 0).then(pl.lit("raises")).otherwise(pl.lit("lowers")).alias("effect"),
                                   pl.Series("attribution", [_signed(a, 3) for a in f["attribution"]]))
            parts.append(_table(shown.select("modality", "feature", "value", "attribution", "effect"),
                                headers={"attribution": "contribution"}))
    parts.append("</section>")
    return parts


def _feature_notes(expl: Any) -> list[str]:
    notes = list(expl.info.get("notes") or [])
    if expl.feature is None:
        return notes
    labels = expl.info.get("feature_labels") or {}
    names = expl.feature["feature"].cast(pl.String).unique().to_list()
    if labels:
        shown = sum(1 for n in names if n in labels)
        notes.append(f"{shown} of {len(names)} features are shown with the label given for them (e.g. a gene symbol), "
                     "the data column in parentheses.")
    probes = [n for n in names if _PROBE.match(n) and n not in labels]
    if probes and not any("probe" in n.lower() for n in notes):
        ex = sorted(probes)[0]
        notes.append(f"{len(probes)} feature names look like Affymetrix probe set ids (e.g. {ex}"
                     + (f": probe {ex[1:]}; a leading X makes a number a valid column name" if ex.startswith("X") else "")
                     + "); no gene symbols were given for them (pass labels to show them).")
    elif probes:
        notes.append(f"{len(probes)} feature names are probe set ids without a gene symbol (e.g. {sorted(probes)[0]}).")
    return notes


def _methods(expl: Any, q: str) -> list[str]:
    info = expl.info
    checks = expl.completeness()
    parts = ["<section id='methods'><h2>Methods</h2>",
             f"<p><b>What is explained.</b> {_e(_cap(q))}, for {info.get('n_subjects')} patients "
             f"(technically: {_e(info.get('target'))}); model: task <code>{_e(info.get('task'))}</code>, fusion "
             f"<code>{_e(info.get('fusion'))}</code>, {info.get('ensemble_size')} network(s). These attributions describe "
             "how the model uses the data, not causal effects.</p>"]
    if info.get("horizon") is not None and not info.get("time_unit"):
        parts.append("<p>Times are in the units of the training data's follow-up times (the unit was not given; "
                     "<code>--time-unit</code> names it).</p>")
    if expl.modality is not None:
        method = info.get("shapley_method")
        n_mod = len(info.get("modalities") or [])
        how = (f"averaged over {info.get('n_samples')} random orders of adding the modalities" if method == "sampling"
               else f"computed exactly over all {2 ** n_mod} combinations of the {n_mod} modalities")
        parts.append(
            "<p><b>Modality contributions</b> are Shapley values: the change in the prediction when a modality is "
            f"added, averaged fairly over the other modalities ({how}). A modality is left out exactly as when it is "
            "missing for a patient. <i>Check:</i> for every patient the modality contributions add up to the "
            f"prediction minus the prediction with no data at all {_within(checks.get('modality_max_error', float('nan')))}"
            + ("" if checks.get("modality_max_error") == 0 else " (largest error)") + ". The prediction with no data is a "
            "state the model never saw in training, so a modality whose contribution hardly varies between patients "
            "mostly carries that constant gap.</p>")
    if info.get("n_steps"):
        parts.append(
            "<p><b>Feature contributions</b> measure how much the prediction changes as each input moves from a "
            "reference value (below) to the patient's own value (Integrated Gradients, computed with Captum, "
            f"{info.get('n_steps')}-point Gauss-Legendre integration); each patient keeps the modalities they have. "
            "<i>Check:</i> for every patient the feature contributions add up to the prediction minus the reference "
            f"patient's prediction {_within(checks.get('ig_max_delta', float('nan')))} (largest gap, "
            f"{checks.get('ig_max_relative_delta', float('nan')):.1%} of the largest such difference); more steps "
            "(<code>--n-steps</code>) make it smaller"
            + (" and <b>should be used here</b>" if checks.get("ig_max_relative_delta", 0.0) > IG_GAP_WARNING else "")
            + ". Reference values (the reference patient has all of them):</p><ul>" + "".join(
                f"<li><code>{_e(k)}</code>: {_e(v)}</li>" for k, v in info.get("baselines", {}).items()) + "</ul>")
        parts.append(
            "<p><b>Direction of effect.</b> For a number: the correlation (Pearson r), across the patients with a "
            f"value, between the value and its contribution; r &ge; {DIRECTION_MIN_CORR:g}: higher values raise "
            f"{_e(q)}, r &le; −{DIRECTION_MIN_CORR:g}: they lower it, otherwise no clear direction. For a "
            "category: the category with the highest (lowest) average contribution.</p>")
    if info.get("not_attributable"):
        parts.append(f"<p>No feature contributions for {_e(info['not_attributable'])}: their encoders do not support "
                     "them; these modalities have modality contributions only.</p>")
    if expl.gene_set is not None:
        parts.append("<p><b>Gene sets:</b> the sum of the contributions of each set's genes.</p>")
    if "time_by_variable" in expl.other:
        parts.append("<p><b>Time-series variables:</b> per patient, the sum of the contributions of the variable's "
                     "observations (often measured variables accumulate more).</p>")
    notes = _feature_notes(expl)
    if notes:
        parts.append("<p><b>Feature names.</b> " + " ".join(_e(n) for n in notes) + "</p>")
    parts.append(f"<p style='color:#777'>Computed in {info.get('seconds', float('nan')):.1f} s, "
                 f"{info.get('batch_size')} patients per pass.</p></section>")
    return parts


_SUMMARY_HEADERS = {"mean_abs": "average size", "mean": "average (signed)", "std": "spread (SD)", "share": "share",
                    "n_present": "patients with data", "n": "patients", "corr": "r (value vs contribution)",
                    "direction": "direction of effect", "rank": "rank"}


def html_report(expl: Any, path: Path, top: int, images: dict[str, Any] | None, rows: list[tuple[int, str]] | None = None) -> Path:
    """Write a self-contained HTML page: findings, cohort summary, individual patients, methods."""
    info = expl.info
    q = quantity(info)
    images = dict(images or {})
    rows = rows if rows is not None else expl.patient_rows()
    o = expl.outputs["output"].to_numpy()
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>What drove the predictions</title><style>"
        "body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222;line-height:1.4}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px;"
        "text-align:right}th{background:#f3f3f3}img{max-width:100%}li{margin:0.2em 0}</style></head><body>",
        "<h1>What drove the model's predictions</h1>",
        f"<p>Explained: <b>{_e(q)}</b>, for {info.get('n_subjects')} patients.</p>",
        "<section id='findings'><h2>Findings</h2><ul>" + "".join(f"<li>{s}</li>" for s in _findings(expl, q)) + "</ul>"
        "<p style='color:#555'>Contributions show how the model uses each input for these patients; they are not "
        "causal effects. Details: <a href='#methods'>Methods</a>.</p></section>",
        "<section id='cohort'><h2>Cohort summary</h2>",
        f"<p>{len(o)} patients; {_e(q)}: median {np.median(o):.3g} (range {o.min():.3g} to {o.max():.3g}).</p>",
    ]
    if expl.modality is not None:
        pres = expl.modality.group_by("modality").agg(pl.col("present").sum()).sort("modality")
        parts.append("<p>Data available: " + ", ".join(f"{_e(modality_words(info, str(m)))} {int(k)} of {len(o)}"
                                                      for m, k in pres.iter_rows()) + ".</p>")
    titles = {"modality": "Modalities", "feature": "Features", "gene_set": "Gene sets", "time_by_variable": "Time-series variables"}
    for level, title in titles.items():
        if expl.frames().get(level) is None:
            continue
        parts.append(f"<h3>{title}</h3>")
        if level == "modality":
            parts.append("<p>Bars: the average size of each modality's contribution (its share in %); dots: each "
                         "patient's signed contribution.</p>")
        elif level == "feature":
            parts.append("<p>Bars: the average size of each feature's contribution over the patients with its "
                         f"modality; colour: the direction of its effect (orange: higher values raise {_e(q)}, "
                         "blue: they lower it).</p>")
        if level not in images:
            images[level] = plot_level(expl, level, None, top)
        parts.append(_img(_png(images[level]), f"{level} importance"))
        s = expl.summary(level).head(top)
        if level == "feature":
            s = s.with_columns(pl.Series("feature", [expl.label(f) for f in s["feature"]])).drop("input")
            s = s.select("rank", *[c for c in s.columns if c != "rank"])
        parts.append(_table(s, headers=_SUMMARY_HEADERS))
    parts.append("</section>")
    if rows and (expl.modality is not None or expl.feature is not None):
        parts.extend(_patient_section(expl, rows, q, images))
    parts.extend(_methods(expl, q))
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
