"""Every fusion head, with and without modality dropout, on the same folds in one run.

    python benchmarks/fusion_heads.py [--part synthetic|gse7390|both] [--folds 5] [--quick]

1. **Synthetic** (binary, 4 modalities, planted signal in each): ``make_synthetic_cohort``
   drawn three times with one seed, so features and labels are identical and only absence
   differs: *complete* (nothing absent), *MCAR* (labs 30 %, genes 40 %, methylation 40 %
   absent at random) and *MNAR* (the same fractions, but sicker subjects, i.e. higher planted
   risk, lose them more often). Models train on the MCAR rows of each training fold and are
   scored (AUROC) on the test fold as complete, as MCAR (no shift) and as MNAR (a missingness
   shift), and, on the complete test fold, with only k of the 4 modalities given (mean over
   the subsets of that size, from ``missing_report``).
2. **GSE7390** (real: clinical + 76 genes, survival): the quick-start config with each head,
   5 subject-level folds; Harrell's C with both modalities, clinical only, genes only, and
   under an MNAR shift hiding genes from half of the test patients (early events first);
   the paired per-fold difference to concat (same dropout) says whether a head is worse
   than concat by more than noise.

Every model of one fold has the same seed; CPU, one torch thread. Mean +- SD over folds.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import polars as pl
import torch

from mmclin import MultimodalClassifier, make_synthetic_cohort
from mmclin.interfaces.experiment import Experiment
from mmclin.training.splits import cv_splits

HEADS = ("concat", "late", "cascaded_transformer", "sequential_modular")
DROPOUTS = (0.0, 0.3)
SYN_MODALITIES = {"clinical": ("tabular", 8), "labs": ("tabular", 6), "genes": ("genomics", 32), "methylation": ("genomics", 24)}
SYN_SIGNAL = {"clinical": 0.8, "labs": 0.8, "genes": 1.0, "methylation": 0.8}
SYN_MISSING = {"labs": 0.3, "genes": 0.4, "methylation": 0.4}


def pm(values: list[float]) -> str:
    arr = np.asarray(values, dtype=float)
    return f"{np.nanmean(arr):.3f} ± {np.nanstd(arr, ddof=1):.3f}" if len(arr) > 1 else f"{arr[0]:.3f}"


def synthetic(args: argparse.Namespace) -> pl.DataFrame:
    from sklearn.metrics import roc_auc_score

    n = args.n_subjects
    common = dict(n_subjects=n, modalities=SYN_MODALITIES, task="binary", signal=SYN_SIGNAL, seed=args.seed)
    complete = make_synthetic_cohort(**common)
    mcar = make_synthetic_cohort(**common, missing=SYN_MISSING, missing_mechanism="mcar")
    mnar = make_synthetic_cohort(**common, missing=SYN_MISSING, missing_mechanism="mnar")
    y = complete.y
    assert np.array_equal(y, mcar.y) and np.array_equal(y, mnar.y), "the three draws must share labels"
    eta = complete.extra["linear_predictor"][:, 0]
    for name, c in (("MCAR", mcar), ("MNAR", mnar)):
        absent = {m: ~c.extra["present"][m] for m in SYN_MISSING}
        print(f"{name}: planted risk of subjects lacking " + ", ".join(
            f"{m} {eta[a].mean():+.2f}" for m, a in absent.items()) + f" (cohort mean {eta.mean():+.2f})")
    folds = list(cv_splits(y, "binary", args.folds, args.seed))
    oracle = [roc_auc_score(y[te], eta[te]) for _, te in folds]
    print(f"synthetic: {n} subjects, positives {y.mean():.2f}; AUROC of the planted risk itself {pm(oracle)}")
    specs = complete.modalities
    rows = []
    for head in HEADS:
        for p in DROPOUTS:
            for k, (tr, te) in enumerate(folds):
                t0 = time.perf_counter()
                est = MultimodalClassifier(
                    modalities=specs, fusion=head, fusion_options={"d_model": 32, "dropout": 0.1},
                    encoder_options={m: {"d_model": 32} for m in SYN_MODALITIES}, modality_dropout=p,
                    max_epochs=args.epochs, batch_size=128, weight_decay=0.01, patience=10, random_state=k,
                ).fit(mcar.frame[tr], y[tr])
                seconds = time.perf_counter() - t0
                row = {"head": head, "dropout": p, "fold": k, "fit_s": seconds}
                for name, c in (("complete", complete), ("mcar", mcar), ("mnar", mnar)):
                    row[name] = est.metrics(c.frame[te], y[te])["auroc"]
                report = est.missing_report(complete.frame[te], y[te], mechanisms=())
                by_k = report.subsets.group_by("n_modalities").agg(pl.col("auroc").mean())
                row.update({f"given_{r['n_modalities']}": r["auroc"] for r in by_k.to_dicts()})
                rows.append(row)
                print(f"  {head:22s} dropout {p:.1f} fold {k}: complete {row['complete']:.3f} mcar {row['mcar']:.3f} "
                      f"mnar {row['mnar']:.3f} 1-of-4 {row['given_1']:.3f} ({seconds:.1f} s)", flush=True)
    return pl.DataFrame(rows)


def synthetic_table(per_fold: pl.DataFrame) -> pl.DataFrame:
    out = []
    for (head, p), g in per_fold.group_by(["head", "dropout"], maintain_order=True):
        out.append({
            "head": head, "mod. dropout": p,
            "complete": pm(g["complete"]), "MCAR test": pm(g["mcar"]), "MNAR test": pm(g["mnar"]),
            "MNAR - MCAR": pm((g["mnar"] - g["mcar"]).to_list()),
            "3 of 4 given": pm(g["given_3"]), "2 of 4": pm(g["given_2"]), "1 of 4": pm(g["given_1"]),
            "fit s": f"{g['fit_s'].median():.1f}",
        })
    return pl.DataFrame(out)


def gse7390(args: argparse.Namespace) -> pl.DataFrame:
    rows = []
    for head in HEADS:
        for p in DROPOUTS:
            exp = Experiment.from_yaml(args.config, [
                f"model.fusion.name={head}", f"model.modality_dropout={p}", f"model.ensemble_size={args.ensemble}",
                f"trainer.max_epochs={args.gse_epochs}", "tracking.enabled=false", "trainer.progress_bar=false"])
            t0 = time.perf_counter()
            res = exp.evaluate(cv=args.folds, missing_report={"mechanisms": ("mnar",), "n_repeats": 5, "seed": 0})
            seconds = (time.perf_counter() - t0) / args.folds
            sub = res.missing_report.subsets
            shift = res.missing_report.shift.filter((pl.col("mechanism") == "mnar") & (pl.col("hidden") == "genes"))
            mnar_genes = shift.group_by("fold").agg(pl.col("c_index").mean()).sort("fold")["c_index"]
            for k in range(args.folds):
                fold = sub.filter(pl.col("fold") == k)
                rows.append({
                    "head": head, "dropout": p, "fold": k, "fit_s": seconds,
                    "both": res.folds["c_index"][k],
                    "uno_c": res.folds["uno_c"][k],
                    "clinical": fold.filter(pl.col("subset") == "clinical")["c_index"][0],
                    "genes": fold.filter(pl.col("subset") == "genes")["c_index"][0],
                    "mnar_genes": mnar_genes[k],
                })
            print(f"  {head:22s} dropout {p:.1f}: C {res.folds['c_index'].mean():.3f}", flush=True)
    return pl.DataFrame(rows)


def gse_table(per_fold: pl.DataFrame) -> pl.DataFrame:
    out = []
    for (head, p), g in per_fold.group_by(["head", "dropout"], maintain_order=True):
        ref = per_fold.filter((pl.col("head") == "concat") & (pl.col("dropout") == p)).sort("fold")
        diff = (g.sort("fold")["both"] - ref["both"]).to_list()
        out.append({
            "head": head, "mod. dropout": p, "C (both)": pm(g["both"]), "Uno C": pm(g["uno_c"]),
            "C clinical only": pm(g["clinical"]), "C genes only": pm(g["genes"]),
            "C, MNAR hide genes 50%": pm(g["mnar_genes"]),
            "C - concat (paired)": "–" if head == "concat" else pm(diff),
            "fit s / fold": f"{g['fit_s'].median():.1f}",
        })
    return pl.DataFrame(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("synthetic", "gse7390", "both"), default="both")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--n-subjects", type=int, default=1500)
    ap.add_argument("--epochs", type=int, default=60, help="synthetic: max epochs (early stopping, patience 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default="experiments/gse7390_survival.yaml")
    ap.add_argument("--ensemble", type=int, default=1, help="GSE7390: ensemble size (the quick start uses 5)")
    ap.add_argument("--gse-epochs", type=int, default=60)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 folds, 400 subjects, 3 epochs")
    ap.add_argument("--output", help="write the per-fold rows to this parquet prefix (<prefix>_synthetic.parquet, ...)")
    args = ap.parse_args()
    if args.quick:
        args.folds, args.n_subjects, args.epochs, args.gse_epochs = 2, 400, 3, 3
    torch.set_num_threads(1)
    cfg = pl.Config(tbl_cols=-1, tbl_width_chars=250, tbl_hide_column_data_types=True, tbl_hide_dataframe_shape=True,
                    fmt_str_lengths=40, tbl_formatting="MARKDOWN", tbl_rows=-1)
    tables = {}
    if args.part in ("synthetic", "both"):
        per_fold = synthetic(args)
        tables["synthetic"] = synthetic_table(per_fold)
        if args.output:
            per_fold.write_parquet(f"{args.output}_synthetic.parquet")
    if args.part in ("gse7390", "both"):
        per_fold = gse7390(args)
        tables["gse7390"] = gse_table(per_fold)
        if args.output:
            per_fold.write_parquet(f"{args.output}_gse7390.parquet")
    with cfg:
        for name, table in tables.items():
            title = ("synthetic, AUROC (train MCAR, test as noted)" if name == "synthetic"
                     else f"GSE7390, Harrell's C, {args.folds}-fold CV, ensemble {args.ensemble}")
            print(f"\n{title}, mean ± SD over {args.folds} folds")
            print(table)


if __name__ == "__main__":
    main()
