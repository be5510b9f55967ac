"""mmclin's default model beside the classical baselines on every built-in cohort, same folds, one run.

    python benchmarks/cohorts_vs_baselines.py [--cohorts gse7390,gbsg2] [--fusions concat,late] [--seeds 0,1,2] [--folds 5]
                                              [--set key=value ...]

For each cohort, fusion head and fold seed: ``Experiment.evaluate(cv, baselines=True)`` with a
config that names only the cohort and the head (every other setting is mmclin's default), so the
table measures the defaults, not a config tuned per cohort. Prints one row per (cohort, head,
seed) and a summary per cohort and head: mmclin's mean primary metric, the best baseline's, the
paired difference with its bootstrap CI; then the mean difference over cohorts. Targets of the
baselines issue: difference >= -0.005 on every cohort and >= +0.01 on average.

Cohorts whose task or modalities have no baselines are reported as such (every built-in cohort has them now:
multilabel ``iu_reports`` through one model per label, ``pbcseq``'s labs through per-code summaries).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import polars as pl

from mmclin.config import apply_overrides, validate_config
from mmclin.datasets import list_cohorts
from mmclin.interfaces.experiment import Experiment


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cohorts", default=None, help="comma-separated (default: every built-in cohort)")
    ap.add_argument("--fusions", default="concat")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cohorts = args.cohorts.split(",") if args.cohorts else list_cohorts()["name"].to_list()
    rows = []
    for cohort in cohorts:
        for fusion in args.fusions.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                raw = {"name": f"{cohort}_{fusion}", "data": {"cohort": cohort, "split_seed": seed},
                       "model": {"fusion": {"name": fusion}},
                       "trainer": {"progress_bar": False}, "tracking": {"enabled": False}}
                exp = Experiment(validate_config(apply_overrides(raw, args.overrides)), args.overrides)
                t0 = time.perf_counter()
                try:
                    res = exp.evaluate(args.folds, baselines=True)
                except (ValueError, ModuleNotFoundError) as err:
                    print(f"{cohort} ({fusion}, seed {seed}): skipped: {err}")
                    break
                cmp = res.baselines
                table = {r["model"]: r["mean"] for r in cmp.table().to_dicts()}
                rows.append({"cohort": cohort, "fusion": fusion, "seed": seed, "metric": cmp.metric,
                             "mmclin": table["mmclin"], "best_baseline": cmp.best, "best": table[cmp.best],
                             "diff": cmp.difference, "ci_low": cmp.ci_low, "ci_high": cmp.ci_high,
                             "skipped_modalities": ",".join(cmp.skipped), "seconds": time.perf_counter() - t0})
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    if not rows:
        return
    frame = pl.DataFrame(rows)
    summary = frame.group_by("cohort", "fusion", maintain_order=True).agg(
        pl.col("mmclin").mean(), pl.col("best").mean(), pl.col("diff").mean(), pl.col("diff").min().alias("worst_seed"))
    with pl.Config(tbl_cols=-1, tbl_rows=-1, tbl_width_chars=200, float_precision=4):
        print(frame)
        print(summary)
    for fusion, part in summary.group_by("fusion"):
        diffs = part["diff"].to_numpy()
        print(f"{fusion[0]}: mean difference over {len(diffs)} cohorts {np.mean(diffs):+.4f} (target >= +0.01); "
              f"worst cohort {np.min(diffs):+.4f} (target >= -0.005)")


if __name__ == "__main__":
    main()
