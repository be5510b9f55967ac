"""``mmclin fit | evaluate | predict | cohorts``. Heavy imports happen inside commands so
``mmclin --help`` stays fast."""
from __future__ import annotations

import argparse
import sys
from typing import Any


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML file (see experiments/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.fusion.name=late (repeatable)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's, sqlite:///mlruns.db)")
    p.add_argument("--no-tracking", action="store_true", help="do not record the run in MLflow")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmclin", description="Multimodal clinical prediction.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="train on the training subjects and score the held-out ones")
    _config_args(p)
    p.add_argument("--output-dir", help="where the model and test predictions go (default: the config's)")

    p = sub.add_parser("evaluate", help="cross-validated (--cv K) or hold-out metrics")
    _config_args(p)
    p.add_argument("--cv", type=int, default=None, help="number of subject-level folds")

    p = sub.add_parser("predict", help="predict with a trained model and write a parquet/CSV file")
    p.add_argument("model", help="model directory (from fit) or MLflow runs:/<run_id>")
    p.add_argument("--data", required=True, help="one-row-per-subject parquet/CSV file, or a built-in cohort name")
    p.add_argument("--output", required=True, help="predictions file (.parquet or .csv)")
    p.add_argument("--id-column", help="copy this id column into the predictions")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for runs:/ models")

    sub.add_parser("cohorts", help="list the built-in cohorts")
    return parser


def _experiment(args: argparse.Namespace):
    from mmclin.experiment import Experiment

    overrides = list(args.overrides)
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    if args.no_tracking:
        overrides.append("tracking.enabled=false")
    return Experiment.from_yaml(args.config, overrides)


def _print_table(title: str, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in rows[0]:
        table.add_column(str(col), justify="right" if col not in ("metric", "name") else "left")
    for r in rows:
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()])
    Console().print(table)


def cmd_fit(args: argparse.Namespace) -> int:
    exp = _experiment(args)
    c = exp.cohort
    print(f"cohort {c.name}: {c.frame.height} subjects; modalities "
          + ", ".join(f"{m.name} ({m.kind}, {len(m.columns)} columns)" for m in c.modalities))
    from mmclin.training.core import resolve_accelerator

    accelerator, precision = resolve_accelerator(exp.config.trainer)
    print(f"training on {accelerator} ({precision}); {exp.config.model.ensemble_size} ensemble member(s)")
    res = exp.fit(args.output_dir)
    _print_table(f"{exp.config.name}: held-out test metrics ({res.predictions.height} subjects)",
                 [{"metric": k, "value": v} for k, v in res.metrics.items()])
    print(f"model: {res.model_dir}")
    if res.run_id:
        print(f"MLflow run {res.run_id} in {exp.config.tracking.uri} (experiment {exp.config.tracking.experiment!r})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    exp = _experiment(args)
    res = exp.evaluate(args.cv)
    _print_table(f"{exp.config.name}: per-fold test metrics", res.folds.to_dicts())
    _print_table(f"{exp.config.name}: mean over {res.folds.height} fold(s)", res.summary.to_dicts())
    if res.run_id:
        print(f"MLflow run {res.run_id} in {exp.config.tracking.uri}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mmclin.experiment import read_table, resolve_model_path, write_atomic
    from mmclin.predictions import prediction_frame
    from mmclin.training.core import FittedModel

    fitted = FittedModel.load(resolve_model_path(args.model, args.tracking_uri))
    if Path(args.data).exists():
        frame, id_col = read_table(args.data), args.id_column
    else:
        from mmclin.datasets import load_cohort

        cohort = load_cohort(args.data)
        frame, id_col = cohort.frame, args.id_column or cohort.id_column
    preds = prediction_frame(fitted, frame, id_col)
    write_atomic(preds, args.output)
    print(f"wrote {preds.height} predictions to {args.output}")
    return 0


def cmd_cohorts(args: argparse.Namespace) -> int:
    from mmclin.datasets import list_cohorts

    cols = ["name", "task", "n_subjects", "n_events", "modalities"]  # sources and licences: docs/cohorts.md
    _print_table("built-in cohorts", list_cohorts().select(cols).to_dicts())
    return 0


def _terminate_cleanly(signum: int, frame: Any) -> None:
    # SIGTERM (e.g. a scheduler's kill) unwinds like an exception, so MLflow runs end as FAILED, not RUNNING
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate_cleanly)
    args = build_parser().parse_args(argv)
    handler = {"fit": cmd_fit, "evaluate": cmd_evaluate, "predict": cmd_predict, "cohorts": cmd_cohorts}[args.command]
    try:
        return handler(args)
    except (ValueError, KeyError, FileNotFoundError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"mmclin {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
