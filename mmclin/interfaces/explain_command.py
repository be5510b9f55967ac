"""``mmclin explain MODEL --data D``: the CLI verb. Imports nothing heavy until it runs."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# what each saved file is, for the CLI's list of written files
FILE_WORDS = {
    "report": "report (open in a browser): findings, cohort summary, individual patients, methods",
    "modality_png": "plot: how much each modality moved the predictions",
    "feature_png": "plot: the features that moved the predictions most, coloured by direction of effect",
    "gene_set_png": "plot: gene sets",
    "time_by_variable_png": "plot: time-series variables",
    "patients_png": "plot: individual patients' contributions",
    "outputs": "table: one row per patient: the explained prediction and its reference values",
    "modality": "table: per patient and modality: its contribution (Shapley value)",
    "feature": "table: per patient and feature: its value and contribution (Integrated Gradients)",
    "gene_set": "table: per patient and gene set: the sum of its genes' contributions",
    "info": "what was explained and how (JSON)",
}
# facts about a built-in cohort's feature names that the report states (never a made-up mapping)
COHORT_NOTES = {
    "gse7390": "The gene columns of the built-in gse7390 cohort are Affymetrix HG-U133A probe set ids (GEO platform "
               "GPL96) with an X prefix; the cohort has no gene symbols, so the report shows the probe ids.",
}


def add_explain_parser(sub: Any) -> None:
    from mmclin.interfaces.arguments import count_at_least as _count  # counts below 1 are refused, never used as they are

    p = sub.add_parser("explain", help="which modality and feature drove each prediction (Shapley values, "
                                       "Integrated Gradients): frames, plots, an HTML report, logged to MLflow")
    p.add_argument("model", help="model directory, run directory of fit (outputs/<name>/<run>), a config's output directory (outputs/<name>: its newest finished run) or MLflow runs:/<run_id> (default store: sqlite:///mlruns.db), or a run id")
    p.add_argument("--data", required=True, help="one-row-per-subject parquet/CSV file, or a built-in cohort name")
    p.add_argument("--output-dir", default="explanations",
                   help="where frames (parquet), plots (PNG) and report.html go (default: explanations/); it then "
                        "holds this run's files only: an earlier explanation there is replaced, files of yours "
                        "make explain refuse")
    p.add_argument("--levels", default="modality,feature",
                   help="comma-separated: modality, feature (time, note, patch for encoders that declare them)")
    p.add_argument("--target", help="class / label to explain (classification; default: each subject's predicted "
                                    "one), or sub-task key (multitask; 'key:class' for a class of it)")
    p.add_argument("--horizon", type=float, help="survival: explain S(horizon | x) instead of the risk score")
    p.add_argument("--method", default="auto", choices=["auto", "exact", "sampling"],
                   help="modality Shapley values: exact (2^M coalitions), sampling (Captum), auto (exact up to 8)")
    p.add_argument("--n-samples", type=_count(1), default=64, help="sampled orderings for --method sampling")
    p.add_argument("--n-steps", type=_count(1), default=50, help="Integrated Gradients steps")
    p.add_argument("--batch-size", type=_count(1), default=256, help="subjects per pass (memory: see docs/explanations.md)")
    p.add_argument("--top", type=_count(1), default=20, help="features shown in the plots and report")
    p.add_argument("--patients", metavar="ID,...",
                   help="patients for the report's per-patient view (values of the id column; default: the two "
                        "highest and two lowest predictions)")
    p.add_argument("--labels", metavar="FILE",
                   help="display labels for feature columns (e.g. gene symbols for probe ids): a JSON object "
                        "{column: label} or a CSV/TSV/parquet file whose first two columns are column, label")
    p.add_argument("--time-unit", metavar="UNIT",
                   help="unit of the survival times, e.g. days (default: the built-in cohort's; otherwise 'time units')")
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


def _read_data(data: str, id_column: str | None) -> tuple[Any, str | None, Any]:
    """The frame to explain, its id column and, for a built-in cohort's name, the cohort."""
    from mmclin.datasets import COHORTS, load_cohort
    from mmclin.interfaces.experiment import read_frame_or_cohort

    if not Path(data).exists() and data in COHORTS.names():
        cohort = load_cohort(data)
        return cohort.frame, id_column or cohort.id_column, cohort
    frame, id_col = read_frame_or_cohort(data, id_column)
    return frame, id_col, None


def read_labels(path: str) -> dict[str, str]:
    """``{column: label}`` from a JSON object or a table file (first two columns: column, label)."""
    import json

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"labels file {path!r} does not exist")
    if p.suffix.lower() == ".json":
        try:
            mapping = json.loads(p.read_text())
        except ValueError as err:
            raise ValueError(f"labels file {path!r} is not valid JSON: {err}") from None
        if not isinstance(mapping, dict):
            raise ValueError(f"labels file {path!r} must hold a JSON object {{column: label}}")
        return {str(k): str(v) for k, v in mapping.items() if v is not None}
    from mmclin.interfaces.experiment import read_table

    table = read_table(path)
    if table.width < 2:
        raise ValueError(f"labels file {path!r} needs two columns (column, label); it has {table.columns}")
    return {str(k): str(v) for k, v in zip(table[:, 0], table[:, 1]) if k is not None and v is not None}


def cmd_explain(args: argparse.Namespace, print_table: Any) -> int:

    from mmclin.persistence.atomic import check_owned_directory
    from mmclin.interfaces.experiment import resolve_model_path
    from mmclin.explain import explain
    from mmclin.explain.explanation import MARKER, earlier_explanation
    from mmclin.training.core import FittedModel

    out_dir = Path(args.output_dir)
    check_owned_directory(out_dir, MARKER, "mmclin explain", earlier_explanation)  # before the work, not after it
    labels = read_labels(args.labels) if args.labels else {}
    print(f"loading the model {args.model} and the data {args.data}")
    fitted = FittedModel.load(resolve_model_path(args.model, args.tracking_uri))
    frame, id_col, cohort = _read_data(args.data, args.id_column)
    if args.id_column is not None and args.id_column not in frame.columns:  # not frames without ids, unasked
        import difflib

        close = difflib.get_close_matches(args.id_column, frame.columns, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; columns are {frame.columns[:10]}"
        raise ValueError(f"--id-column {args.id_column!r} is not in the data{hint}")
    extra = cohort.extra if cohort is not None else {}
    time_unit = args.time_unit or extra.get("time_unit")
    spec_labels = {k: v for s in fitted.specs for k, v in (s.options.get("feature_labels") or {}).items()}
    labels = {**spec_labels, **(extra.get("feature_labels") or {}), **labels}
    notes = [n for n in (COHORT_NOTES.get(args.data) if cohort is not None else None, extra.get("feature_note")) if n]
    target: Any = args.target
    if target is not None and fitted.task.task_name == "multitask" and ":" in target:
        target = tuple(target.split(":", 1))
    levels = tuple(lv.strip() for lv in args.levels.split(",") if lv.strip())
    patients = [p.strip() for p in args.patients.split(",") if p.strip()] if args.patients is not None else None
    if patients == []:  # not the default view in place of the patients asked for
        raise ValueError(f"--patients names no patient (got {args.patients!r}); give ids of the id column, "
                         "comma-separated, or leave --patients out for the default view")
    what = {"modality": "modality contributions (Shapley values)", "feature": "feature contributions (Integrated "
            f"Gradients, {args.n_steps} steps)"}
    print(f"explaining the {fitted.task.task_name} model's predictions for {frame.height} subjects: "
          + ", ".join(what.get(lv, f"{lv} contributions") for lv in levels))
    expl = explain(fitted, frame, levels=levels, target=target, horizon=args.horizon, method=args.method,
                   n_samples=args.n_samples, n_steps=args.n_steps, batch_size=args.batch_size, id_column=id_col)
    expl = expl.with_display(labels=labels, time_unit=time_unit, notes=notes,
                             modality_kinds={s.name: s.kind for s in fitted.specs})
    expl.patient_rows(patients)  # unknown patient ids: an error now, before anything is written
    print(f"explained {expl.info['target']} for {expl.info['n_subjects']} subjects in {expl.info['seconds']:.1f} s")
    from mmclin.explain.report import untrained_warning

    caution = untrained_warning(expl.info)
    if caution:
        print(f"WARNING {caution}", file=sys.stderr)
    if time_unit is None and args.horizon is not None:
        print("note: the unit of the survival times is not known; pass --time-unit (e.g. days) to name it")
    if expl.modality is not None:
        print_table("modality contributions (mean |Shapley value|, share of their sum)", expl.summary("modality").select(
            "modality", "mean_abs", "share", "n_present").to_dicts())
    for level in ("feature", "gene_set"):
        if expl.frames().get(level) is not None:
            s = expl.summary(level)
            if "feature" in s.columns:
                s = s.with_columns(_labelled(expl, s))
            print_table(f"top {min(10, s.height)} by mean |attribution| ({level}; direction: of a higher value)",
                        s.drop([c for c in ("input", "corr") if c in s.columns]).head(10).to_dicts())
    written = expl.save(out_dir, top=args.top, patients=patients)
    print(f"wrote {len(written)} files to {out_dir}/ (replacing any earlier explanation there):")
    order = list(FILE_WORDS)  # the report first, then plots, tables, info
    for key, path in sorted(written.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
        print(f"  {path}  {FILE_WORDS.get(key, 'table: per patient, the ' + key + ' level')}")
    checks = expl.completeness()
    print("completeness: " + ", ".join(f"{k} {v:.2e}" for k, v in checks.items())
          + " (modality contributions add up to the prediction minus the prediction with no data, feature "
            "contributions to the prediction minus the reference patient's, up to these errors)")
    run_id = None if args.no_tracking else _run_id(args.model, args.run_id)
    if run_id is not None:
        import mlflow

        if args.tracking_uri:
            mlflow.set_tracking_uri(args.tracking_uri)
        expl.log_to_mlflow(run_id, directory=out_dir)
        print(f"logged to MLflow run {run_id} (artifacts under explanations/)")
    return 0


def _labelled(expl: Any, summary: Any) -> Any:
    """The ``feature`` column of a summary with display labels ("ESR1 (X205225_at)")."""
    import polars as pl

    return pl.Series("feature", [expl.label(f) for f in summary["feature"]])
