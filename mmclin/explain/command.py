"""``mmclin explain MODEL --data D``: the CLI verb. Imports nothing heavy until it runs."""
from __future__ import annotations

import argparse
from typing import Any


def add_explain_parser(sub: Any) -> None:
    p = sub.add_parser("explain", help="which modality and feature drove each prediction (Shapley values, "
                                       "Integrated Gradients): frames, plots, an HTML report, logged to MLflow")
    p.add_argument("model", help="model directory (from fit), runs:/<run_id> or a run id")
    p.add_argument("--data", required=True, help="one-row-per-subject parquet/CSV file, or a built-in cohort name")
    p.add_argument("--output-dir", default="explanations",
                   help="where frames (parquet), plots (PNG) and report.html go (default: explanations/)")
    p.add_argument("--levels", default="modality,feature",
                   help="comma-separated: modality, feature (time, note, patch for encoders that declare them)")
    p.add_argument("--target", help="class / label to explain (classification; default: each subject's predicted "
                                    "one), or sub-task key (multitask; 'key:class' for a class of it)")
    p.add_argument("--horizon", type=float, help="survival: explain S(horizon | x) instead of the risk score")
    p.add_argument("--method", default="auto", choices=["auto", "exact", "sampling"],
                   help="modality Shapley values: exact (2^M coalitions), sampling (Captum), auto (exact up to 8)")
    p.add_argument("--n-samples", type=int, default=64, help="sampled orderings for --method sampling")
    p.add_argument("--n-steps", type=int, default=50, help="Integrated Gradients steps")
    p.add_argument("--batch-size", type=int, default=256, help="subjects per pass (memory: see docs/explanations.md)")
    p.add_argument("--top", type=int, default=20, help="features shown in the plots and report")
    p.add_argument("--id-column", help="id column copied into the frames (default: the model's)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (for runs:/ models and for logging)")
    p.add_argument("--run-id", help="log the explanation to this MLflow run (default: the model's run, when MODEL is one)")
    p.add_argument("--no-tracking", action="store_true", help="write files only; log nothing to MLflow")


def _run_id(model: str, explicit: str | None) -> str | None:
    if explicit:
        return explicit
    if model.startswith("runs:/"):
        return model[len("runs:/"):].split("/")[0]
    if len(model) == 32 and all(ch in "0123456789abcdef" for ch in model):
        return model
    return None


def cmd_explain(args: argparse.Namespace, print_table: Any) -> int:

    from mmclin.experiment import read_frame_or_cohort, resolve_model_path
    from mmclin.explain import explain
    from mmclin.training.core import FittedModel

    fitted = FittedModel.load(resolve_model_path(args.model, args.tracking_uri))
    frame, id_col = read_frame_or_cohort(args.data, args.id_column)
    target: Any = args.target
    if target is not None and fitted.task.task_name == "multitask" and ":" in target:
        target = tuple(target.split(":", 1))
    levels = tuple(lv.strip() for lv in args.levels.split(",") if lv.strip())
    expl = explain(fitted, frame, levels=levels, target=target, horizon=args.horizon, method=args.method,
                   n_samples=args.n_samples, n_steps=args.n_steps, batch_size=args.batch_size, id_column=id_col)
    print(f"explained {expl.info['target']} for {expl.info['n_subjects']} subjects in {expl.info['seconds']:.1f} s")
    if expl.modality is not None:
        print_table("modality contributions (mean |Shapley value|)", expl.summary("modality").select(
            "modality", "mean_abs", "share", "n_present").to_dicts())
    for level in ("feature", "gene_set"):
        if expl.frames().get(level) is not None:
            s = expl.summary(level)
            print_table(f"top {min(10, s.height)} by mean |attribution| ({level})",
                        s.drop([c for c in ("input",) if c in s.columns]).head(10).to_dicts())
    written = expl.save(args.output_dir, top=args.top)
    for key in ("report", "modality_png", "feature_png", "gene_set_png"):
        if key in written:
            print(f"{key}: {written[key]}")
    checks = expl.completeness()
    print("completeness: " + ", ".join(f"{k} {v:.2e}" for k, v in checks.items()))
    run_id = None if args.no_tracking else _run_id(args.model, args.run_id)
    if run_id is not None:
        import mlflow

        if args.tracking_uri:
            mlflow.set_tracking_uri(args.tracking_uri)
        expl.log_to_mlflow(run_id, directory=args.output_dir)
        print(f"logged to MLflow run {run_id} (artifacts under explanations/)")
    return 0
