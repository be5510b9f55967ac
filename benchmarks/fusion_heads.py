"""Every registered fusion head on the same folds in one run; before/after tables from two runs.

    python benchmarks/fusion_heads.py [--part synthetic|real|both] [--folds 5] [--quick] [--output PREFIX]
    python benchmarks/fusion_heads.py --compare BEFORE_PREFIX AFTER_PREFIX

1. **Synthetic** (binary, 4 modalities, planted signal in each): ``make_synthetic_cohort``
   drawn three times with one seed, so features and labels are identical and only absence
   differs: *complete* (nothing absent), *MCAR* (labs 30 %, genes 40 %, methylation 40 %
   absent at random) and *MNAR* (the same fractions, but sicker subjects, i.e. higher planted
   risk, lose them more often). Models train on the MCAR rows of each training fold and are
   scored (AUROC) on the test fold as complete, as MCAR (no shift) and as MNAR (a missingness
   shift); the paired per-fold difference to concat on the MNAR test says whether a head
   earns its place beside concat.
2. **Real** built-in survival cohorts with two modalities, Harrell's C: ``gse7390``
   (clinical + 76 genes) and ``pbcseq`` (baseline + irregular labs): with both modalities,
   and under an MNAR shift hiding the second modality from the half of the test patients
   whose events come first (events before censorings, earliest first); paired difference
   to concat.

Every head sees the same folds and, within a fold, the same seed; every head trains with the
same modality dropout (``--dropout``, 0.3: the setting in which all heads see every subset of
modalities). CPU, one torch thread. Mean ± SD over folds.

*Before/after*: run this script once at the old commit (``git worktree add /tmp/heads_before
<commit>``; ``PYTHONPATH=/tmp/heads_before python benchmarks/fusion_heads.py --output before``)
and once at the current one (``--output after``), then ``--compare before after`` prints one
table per part with both runs side by side. The script imports only what has been public
since before the head rework (estimators, ``make_synthetic_cohort``, ``load_cohort``,
``cv_splits``, the fusion registry).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import polars as pl
import torch

from mmclin import MultimodalClassifier, MultimodalSurvivalModel, make_synthetic_cohort
from mmclin.datasets import load_cohort
from mmclin.registry import FUSIONS, load_builtin_components
from mmclin.training.splits import cv_splits

SYN_MODALITIES = {"clinical": ("tabular", 8), "labs": ("tabular", 6), "genes": ("genomics", 32), "methylation": ("genomics", 24)}
SYN_SIGNAL = {"clinical": 0.8, "labs": 0.8, "genes": 1.0, "methylation": 0.8}
SYN_MISSING = {"labs": 0.3, "genes": 0.4, "methylation": 0.4}
REAL = {"gse7390": "genes", "pbcseq": "labs"}  # cohort: the modality the MNAR shift hides


def heads() -> list[str]:
    load_builtin_components()
    names = FUSIONS.names()
    return ["concat", *[n for n in names if n != "concat"]]  # concat first: the reference


def pm(values) -> str:
    arr = np.asarray(values, dtype=float)
    return f"{np.nanmean(arr):.3f} ± {np.nanstd(arr, ddof=1):.3f}" if len(arr) > 1 else f"{arr[0]:.3f}"


def head_variants() -> dict[str, tuple[str, dict]]:
    """Every registered head with its default options: name -> (fusion head, fusion options)."""
    return {h: (h, {}) for h in heads()}


def synthetic(args: argparse.Namespace, variants: dict[str, tuple[str, dict]] | None = None) -> pl.DataFrame:
    """Per-fold rows (head, fold, fit_s, complete, mcar, mnar); ``variants``: name -> (head, options), default every head."""
    variants = variants or head_variants()
    common = dict(n_subjects=args.n_subjects, modalities=SYN_MODALITIES, task="binary", signal=SYN_SIGNAL, seed=args.seed)
    complete = make_synthetic_cohort(**common)
    mcar = make_synthetic_cohort(**common, missing=SYN_MISSING, missing_mechanism="mcar")
    mnar = make_synthetic_cohort(**common, missing=SYN_MISSING, missing_mechanism="mnar")
    y = complete.y
    assert np.array_equal(y, mcar.y) and np.array_equal(y, mnar.y), "the three draws must share labels"
    rows = []
    for k, (tr, te) in enumerate(cv_splits(y, "binary", args.folds, args.seed)):
        for head, (fusion, options) in variants.items():
            t0 = time.perf_counter()
            est = MultimodalClassifier(
                modalities=complete.modalities, fusion=fusion, fusion_options={"d_model": 32, **options},
                encoder_options={m: {"d_model": 32} for m in SYN_MODALITIES}, modality_dropout=args.dropout,
                max_epochs=args.epochs, batch_size=64, weight_decay=0.01, patience=8, random_state=k,
            ).fit(mcar.frame[tr], y[tr])
            row = {"head": head, "fold": k, "fit_s": time.perf_counter() - t0}
            for split, c in (("complete", complete), ("mcar", mcar), ("mnar", mnar)):
                row[split] = est.metrics(c.frame[te], y[te])["auroc"]
            rows.append(row)
            print(f"  synthetic fold {k} {head:26s} complete {row['complete']:.3f} mcar {row['mcar']:.3f} "
                  f"mnar {row['mnar']:.3f} ({row['fit_s']:.1f} s)", flush=True)
    return pl.DataFrame(rows)


def hide_first_events(frame: pl.DataFrame, y: np.ndarray, columns: list[str], fraction: float = 0.5) -> pl.DataFrame:
    """The modality's columns set to null for the ``fraction`` of rows whose events come first."""
    event, time_ = (y[n] for n in y.dtype.names)  # scikit-survival layout: (event, time) fields
    order = np.lexsort((time_, ~event.astype(bool)))  # events before censorings, earliest first
    hide = np.zeros(len(y), dtype=bool)
    hide[order[: int(round(fraction * len(y)))]] = True
    mask = pl.Series("hide", hide)
    return frame.with_columns([pl.when(mask).then(None).otherwise(pl.col(c)).alias(c) for c in columns])


def real(args: argparse.Namespace, variants: dict[str, tuple[str, dict]] | None = None) -> pl.DataFrame:
    """Per-fold rows (cohort, head, fold, fit_s, both, mnar); ``variants`` as in :func:`synthetic`."""
    variants = variants or head_variants()
    rows = []
    for cohort_name, hidden in REAL.items():
        c = load_cohort(cohort_name)
        spec = next(s for s in c.modalities if s.name == hidden)
        for k, (tr, te) in enumerate(cv_splits(c.y, "survival", args.folds, args.seed)):
            shifted = hide_first_events(c.frame[te], c.y[te], list(spec.columns))
            for head, (fusion, options) in variants.items():
                t0 = time.perf_counter()
                est = MultimodalSurvivalModel(
                    modalities=c.modalities, fusion=fusion, fusion_options={"d_model": 32, **options},
                    modality_dropout=args.dropout,
                    max_epochs=args.real_epochs, batch_size=32, patience=10, random_state=k,
                ).fit(c.frame[tr], c.y[tr])
                row = {"cohort": cohort_name, "head": head, "fold": k, "fit_s": time.perf_counter() - t0,
                       "both": est.metrics(c.frame[te], c.y[te], y_train=c.y[tr])["c_index"],
                       "mnar": est.metrics(shifted, c.y[te], y_train=c.y[tr])["c_index"]}
                rows.append(row)
                print(f"  {cohort_name} fold {k} {head:26s} C {row['both']:.3f} MNAR-hide-{hidden} {row['mnar']:.3f} "
                      f"({row['fit_s']:.1f} s)", flush=True)
    return pl.DataFrame(rows)


PARTS = {  # part: (title, group keys, {column: label}, the column the paired difference to concat is taken on)
    "synthetic": ("synthetic 4-modality, AUROC (train MCAR, test as noted)", ["head"],
                  {"complete": "complete", "mcar": "MCAR test", "mnar": "MNAR test"}, "mnar"),
    "real": ("real cohorts, Harrell's C", ["cohort", "head"],
             {"both": "C (all modalities)", "mnar": "C, MNAR: 2nd modality hidden from first-event half"}, "both"),
}


def table(per_fold: pl.DataFrame, part: str) -> pl.DataFrame:
    _, keys, metrics, paired = PARTS[part]
    out = []
    for key, g in per_fold.group_by(keys, maintain_order=True):
        ids = dict(zip(keys, key))
        ref = per_fold.filter(pl.all_horizontal([pl.col(k) == v for k, v in {**ids, "head": "concat"}.items()])).sort("fold")
        diff = (g.sort("fold")[paired] - ref[paired]).to_list()
        out.append({**ids, **{label: pm(g[col]) for col, label in metrics.items()},
                    f"{metrics[paired]} - concat (paired)": "–" if ids["head"] == "concat" else pm(diff),
                    "fit s": f"{g['fit_s'].median():.1f}"})
    return pl.DataFrame(out)


def compare(before: pl.DataFrame, after: pl.DataFrame, part: str) -> pl.DataFrame:
    """One row per head (and cohort): each metric before -> after."""
    _, keys, metrics, _ = PARTS[part]
    tb, ta = table(before, part), table(after, part)
    joined = tb.join(ta, on=keys, how="full", suffix=" after", coalesce=True, maintain_order="right")
    cols = [c for c in tb.columns if c not in keys]
    return joined.select(*keys, *[pl.concat_str([pl.col(c).fill_null("–"), pl.col(f"{c} after").fill_null("–")],
                                                separator="  →  ").alias(c) for c in cols])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("synthetic", "real", "both"), default="both")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--n-subjects", type=int, default=1200)
    ap.add_argument("--epochs", type=int, default=30, help="synthetic: max epochs (early stopping, patience 8)")
    ap.add_argument("--real-epochs", type=int, default=30, help="real cohorts: max epochs (patience 10)")
    ap.add_argument("--dropout", type=float, default=0.3, help="modality dropout, the same for every head")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 folds, 300 subjects, 2 epochs")
    ap.add_argument("--output", help="write the per-fold rows to <prefix>_synthetic.parquet and <prefix>_real.parquet")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="print before -> after tables from two --output prefixes")
    args = ap.parse_args()
    if args.quick:
        args.folds, args.n_subjects, args.epochs, args.real_epochs = 2, 300, 2, 2
    cfg = pl.Config(tbl_cols=-1, tbl_width_chars=300, tbl_hide_column_data_types=True, tbl_hide_dataframe_shape=True,
                    fmt_str_lengths=60, tbl_formatting="MARKDOWN", tbl_rows=-1)
    parts = ("synthetic", "real") if args.part == "both" else (args.part,)
    tables = {}
    if args.compare:
        from pathlib import Path

        for part in parts:
            paths = [Path(f"{prefix}_{part}.parquet") for prefix in args.compare]
            if all(p.exists() for p in paths):
                tables[part] = compare(*(pl.read_parquet(p) for p in paths), part)
    else:
        torch.set_num_threads(1)
        for part in parts:
            per_fold = synthetic(args) if part == "synthetic" else real(args)
            if args.output:
                per_fold.write_parquet(f"{args.output}_{part}.parquet")
            tables[part] = table(per_fold, part)
    with cfg:
        for part, t in tables.items():
            n = args.folds if not args.compare else "the"
            print(f"\n{PARTS[part][0]}, mean ± SD over {n} folds" + (" (before  →  after)" if args.compare else ""))
            print(t)


if __name__ == "__main__":
    main()
