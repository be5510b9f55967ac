"""Fusion heads side by side, hetero_graph included, with a missing-modality report.

Synthetic cohort (``make_synthetic_cohort``: planted signal in each modality), three
modalities with 30% / 30% absence (MCAR) in two of them, binary outcome; K-fold CV (same
folds for every head); AUROC on the test folds as observed, and, from
``mmclin.evaluation.robustness.missing_report`` where that module is installed, AUROC when only one
modality (or a leave-one-out subset) is given to everyone.

Run: ``python benchmarks/hetero_graph_heads.py [--n 600] [--folds 3] [--heads concat late hetero_graph]``.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import polars as pl
import torch

from mmclin.config import ComponentConfig, ModelConfig, TrainerConfig
from mmclin.datasets import make_synthetic_cohort
from mmclin.registry import FUSIONS, load_builtin_components
from mmclin.training.core import fit_model
from mmclin.training.splits import cv_splits


def main() -> None:
    load_builtin_components()
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--heads", nargs="*", default=FUSIONS.names())
    args = ap.parse_args()
    torch.set_num_threads(1)
    from sklearn.metrics import roc_auc_score

    c = make_synthetic_cohort(n_subjects=args.n, seed=0, task="binary",
                              modalities={"clinical": ("tabular", 8), "genes": ("genomics", 32), "prot": ("genomics", 16)},
                              missing={"genes": 0.3, "prot": 0.3})
    trainer = TrainerConfig(max_epochs=args.epochs, batch_size=64, patience=8, progress_bar=False, num_threads=1, seed=0)
    try:
        from mmclin.evaluation.robustness import missing_report
    except ImportError:  # the robustness report lives in another issue's module
        missing_report = None
    rows = []
    for head in args.heads:
        aucs, subset_tables, t0 = [], [], time.perf_counter()
        for k, (tr, te) in enumerate(cv_splits(c.y, "binary", args.folds, seed=0)):
            model = ModelConfig(fusion=ComponentConfig(name=head, d_model=32))
            fitted = fit_model(c.frame[tr], c.y[tr], c.modalities, model, trainer, ComponentConfig(name="binary"))
            proba = fitted.task.predict_proba(fitted.predict_outputs(c.frame[te]))[:, 1]
            aucs.append(roc_auc_score(c.y[te], proba))
            if missing_report is not None:
                rep = missing_report(fitted, c.frame[te], c.y[te], mechanisms=[])
                subset_tables.append(rep.subsets.select("subset", "auroc"))
        row = {"head": head, "auroc": float(np.mean(aucs)), "auroc_sd": float(np.std(aucs)),
               "seconds": round(time.perf_counter() - t0, 1)}
        if subset_tables:
            sub = pl.concat(subset_tables).group_by("subset", maintain_order=True).agg(pl.col("auroc").mean())
            row.update({f"only {s}" if "," not in s and "+" not in s else s: round(v, 4) for s, v in sub.iter_rows()})
        rows.append(row)
        print(row, flush=True)
    with pl.Config(tbl_cols=-1, tbl_width_chars=200):
        print(pl.DataFrame(rows))


if __name__ == "__main__":
    main()
