"""Per-trial overhead of mmclin's study machinery: SQLite vs Optuna journal file vs PostgreSQL.

    python benchmarks/study_overhead.py [--trials 50] [--repeats 3] [--epochs 3] [--no-postgres]
                                        [--postgres postgresql://user@host:port/db]

Each storage runs fresh studies of ``--trials`` trivial trials (GSE7390 clinical + genes,
a 1-member width-8 network, ``--epochs`` epochs, one 20 % hold-out, median pruner reporting
every epoch), once with MLflow tracking (nested runs in a SQLite store) and once without;
no refit. Per trial, mmclin records
the wall time from "lock, reap, ask" to "tell, close the MLflow run" and the time spent
training (``fit_model`` and scoring) and evaluating the per-epoch pruning metric; overhead =
total - training - pruning evaluation, i.e. storage (ask/report/should_prune/tell, the
study lock, liveness checks, heartbeat thread), the search space / config validation and
the nested MLflow run. A bare Optuna ask/report/tell loop on the same storage (no mmclin,
no MLflow) is the floor. PostgreSQL runs on a throwaway local server (Debian's
``postgresql`` package) unless ``--postgres`` names one. Medians over ``--repeats``.
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import optuna
import polars as pl

from mmclin.config import validate_config
from mmclin.interfaces.studies import StudyRunner, open_storage


def config(tmp: Path, epochs: int, mlflow: bool = True) -> dict:
    return {
        "name": "overhead", "output_dir": str(tmp / "out"), "data": {"cohort": "gse7390"},
        "model": {"task": {"name": "cox"}, "fusion": {"name": "concat", "d_model": 8},
                  "encoders": {"clinical": {"d_model": 8, "n_layers": 0}, "genes": {"d_model": 8, "n_layers": 1}}},
        "trainer": {"max_epochs": epochs, "batch_size": 256, "patience": None, "progress_bar": False},
        "tracking": {"enabled": mlflow, "uri": f"sqlite:///{tmp / 'mlruns.db'}", "experiment": "overhead", "log_model": False},
        "tune": {"cv": None, "holdout": 0.2, "enqueue_config": False,
                 "pruner": {"name": "median", "n_startup_trials": 5, "n_warmup_epochs": 0},
                 "space": {"model.fusion.name": {"type": "categorical", "choices": ["concat", "late"]},
                           "trainer.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}},
    }


def bare_optuna(storage_url: str, name: str, trials: int, epochs: int) -> float:
    """Seconds per trial of a plain ask / suggest x2 / report x epochs / tell loop."""
    study = optuna.create_study(storage=open_storage(storage_url), study_name=name, direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=5))
    t0 = time.perf_counter()
    for _ in range(trials):
        t = study.ask()
        x = t.suggest_float("x", 1e-4, 1e-2, log=True)
        t.suggest_categorical("head", ["concat", "late"])
        for e in range(epochs):
            t.report(x * e, e)
            t.should_prune()
        study.tell(t, x)
    return (time.perf_counter() - t0) / trials


def one_run(name: str, storage: str, tmp: Path, trials: int, epochs: int, tag: str, mlflow: bool = True) -> dict:
    cfg = validate_config(config(tmp, epochs, mlflow))
    t0 = time.perf_counter()
    res = StudyRunner(cfg, n_trials=trials, storage=storage, study_name=f"overhead-{tag}", refit=False, echo=None).run()
    wall = time.perf_counter() - t0
    t = pl.DataFrame(res.timings)
    assert res.n_complete + res.n_pruned == trials and res.n_failed == 0
    return {"storage": name, "mlflow": mlflow, "trials": trials, "pruned": res.n_pruned, "wall_s": wall,
            "trial_s_median": t["seconds"].median(), "training_s_median": t["model_seconds"].median(),
            "pruning_eval_s_median": t["pruning_eval_seconds"].median(),
            "overhead_s_median": t["overhead_seconds"].median(), "overhead_s_mean": t["overhead_seconds"].mean(),
            "overhead_s_p90": t["overhead_seconds"].quantile(0.9),
            "bare_optuna_s": bare_optuna(storage, f"bare-{tag}", trials, epochs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--postgres", help="an existing database instead of a throwaway server: postgresql://user[:pw]@host:port/db")
    ap.add_argument("--no-postgres", action="store_true")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    with contextlib.ExitStack() as stack:
        pg = args.postgres
        if pg is None and not args.no_postgres:
            from mmclin.testing.postgres import local_postgres

            pg = f"{stack.enter_context(local_postgres(['bench']))}/bench"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        # warm-up: one-time costs (imports, MLflow schema) land here, not on the first storage measured
        warm = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mmclin-overhead-warm-")))
        one_run("warm-up", f"sqlite:///{warm / 'optuna.db'}", warm, 3, args.epochs, f"warm-{stamp}")
        for r in range(args.repeats):
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mmclin-overhead-")))
            import mlflow

            mlflow.MlflowClient(f"sqlite:///{tmp / 'mlruns.db'}").search_experiments()  # schema made before the clock runs
            storages = {"sqlite": f"sqlite:///{tmp / 'optuna.db'}", "journal": f"journal:///{tmp / 'optuna.journal'}"}
            if pg:
                storages["postgresql"] = pg
            for name, url in storages.items():
                for with_mlflow in (True, False):
                    tag = f"{name}-{stamp}-{r}-{'mlflow' if with_mlflow else 'bare'}"
                    row = one_run(name, url, tmp, args.trials, args.epochs, tag, with_mlflow)
                    row["repeat"] = r
                    rows.append(row)
                    print(f"repeat {r} {name:<10} mlflow={with_mlflow!s:<5} overhead median "
                          f"{row['overhead_s_median'] * 1000:7.1f} ms/trial (training {row['training_s_median'] * 1000:6.1f} ms, "
                          f"wall {row['wall_s']:.1f} s)", flush=True)
    table = pl.DataFrame(rows)
    cols = [c for c in table.columns if c.endswith("_s") or "_s_" in c]
    summary = table.group_by("storage", "mlflow", maintain_order=True).agg(
        pl.col("trials").first(), pl.col("pruned").median(), *[pl.col(c).median() for c in cols])
    with pl.Config(tbl_cols=-1, tbl_width_chars=220, float_precision=4):
        print(summary)
    print("overhead = per-trial wall - training - pruning evaluation (medians over trials, then over repeats)")
    print("per-trial study overhead, ms:", ", ".join(
        f"{r['storage']}{'' if r['mlflow'] else ' (no MLflow)'} {r['overhead_s_median'] * 1000:.0f}" for r in summary.to_dicts()))


if __name__ == "__main__":
    main()
