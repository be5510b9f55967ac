"""mmclin vs scikit-survival on GSE7390, same 5 patient-level folds, one run.

    python benchmarks/gse7390_cv.py [--config experiments/gse7390_survival.yaml] [--set key=value ...]

What the quick start prints (``mmclin evaluate CONFIG --cv 5 --baselines``), without tracking:
the cross-validated Harrell's C of mmclin (the quick-start config) beside the classical baselines
of :mod:`mmclin.evaluation.baselines` (Coxnet with its penalty chosen by inner CV, Cox, random
survival forest, gradient-boosted survival) fitted on the same folds and columns, and mmclin's
paired difference to the best one. Target of issue 2: mmclin mean >= best baseline - 0.02.
"""
from __future__ import annotations

import argparse

import polars as pl

from mmclin.interfaces.experiment import Experiment


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="experiments/gse7390_survival.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--folds", type=int, default=5)
    args = ap.parse_args()
    exp = Experiment.from_yaml(args.config, ["tracking.enabled=false", "trainer.progress_bar=false", *args.overrides])
    cmp = exp.evaluate(cv=args.folds, baselines=True).baselines
    with pl.Config(tbl_cols=-1, tbl_width_chars=200, float_precision=3):
        print(cmp.table())
    print(cmp.summary_line())
    best = cmp.table().filter(pl.col("model") == cmp.best)["mean"][0]
    mine = cmp.table().filter(pl.col("model") == "mmclin")["mean"][0]
    print(f"mmclin mean - best baseline = {mine - best:+.3f} (target >= -0.02): {'MET' if mine - best >= -0.02 else 'NOT MET'}")


if __name__ == "__main__":
    main()
