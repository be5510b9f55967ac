"""The result of ``explain``: tidy frames, global summaries, plots, an HTML report, MLflow logging."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import polars as pl
from mmclin.explain.report import DIRECTION_MIN_CORR

PLOT_FILES = {"modality": "modality_importance.png", "feature": "feature_importance.png",
              "gene_set": "gene_set_importance.png", "time_by_variable": "variable_importance.png"}
PATIENT_PLOT = "patients.png"
# written into every saved explanation directory: proves that mmclin wrote (and may replace) it
MARKER = ".mmclin-explanation.json"
# direction of effect of a numeric feature: |Pearson r| of value vs attribution across subjects at least this
# what a global summary groups by; levels without an entry (note, patch) are per subject: see top()
SUMMARY_KEYS = {"feature": ["modality", "input", "feature"], "gene_set": ["modality", "gene_set"],
                "time": ["modality", "variable"], "time_by_variable": ["modality", "variable"]}


def earlier_explanation(directory: Path) -> bool:
    """A directory an mmclin before the marker file wrote: only the names ``save`` writes, and an
    ``info.json`` with an explanation's keys."""
    frames = ("outputs", "modality", "feature", "gene_set", "time", "time_by_variable", "note", "patch")
    known = {"report.html", "info.json", PATIENT_PLOT, *PLOT_FILES.values(), *(f"{f}.parquet" for f in frames)}
    files = [p for p in directory.rglob("*") if not p.is_dir()]
    if not all(p.parent == directory and p.name in known for p in files):
        return False
    try:
        import json

        info = json.loads((directory / "info.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and {"target", "completeness", "n_subjects"} <= set(info)


@dataclass
class Explanation:
    """Attributions for the explained subjects, one tidy frame per level.

    * ``outputs``: one row per subject: ``row`` (position in the explained frame), the id
      column when known, ``target`` (class / label / scalar explained), ``output`` (the
      explained scalar), ``all_absent`` (the same with every modality absent; modality level),
      ``reference`` (at the IG reference; feature level) and ``ig_delta`` (IG convergence delta).
    * ``modality``: one row per subject and modality: ``present`` (in the data), ``attribution``
      (Shapley value; 0 where absent). Per subject they add up to ``output - all_absent``.
    * ``feature``: one row per subject, present modality and feature: ``input`` (encoder input),
      ``feature``, ``value`` (numeric, in the column's units) or ``category``, ``missing``,
      ``attribution``. Per subject, all of them add up to ``output - reference - ig_delta``.
    * ``gene_set``: per subject, genomics modality and gene group: the sum over its genes.

    Name columns (``modality``, ``input``, ``feature``, ...) of these per-subject frames are
    ``pl.Categorical`` (they can hold millions of rows); summaries return plain strings.
    * ``other``: frames of the ``time`` (one row per observation: ``step``, ``variable``, ``time``,
      ``value``), ``time_by_variable`` (per subject and variable: the sum over its observations),
      ``note`` (per note: ``note``, ``time``) and ``patch`` (per patch: ``patch``, ``x``, ``y``,
      ``attention``) levels, when an encoder declares them.
    * ``info``: what was explained and how (target, methods, baselines, timing); for display
      (see :meth:`with_display`): ``time_unit``, ``feature_labels``, ``modality_kinds``, ``notes``.
    """

    outputs: pl.DataFrame
    modality: pl.DataFrame | None = None
    feature: pl.DataFrame | None = None
    gene_set: pl.DataFrame | None = None
    other: dict[str, pl.DataFrame] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    # --- frames and summaries --------------------------------------------------------------
    def frames(self) -> dict[str, pl.DataFrame]:
        """Every non-empty frame by name (``outputs``, ``modality``, ``feature``, ``gene_set``, ...)."""
        out = {"outputs": self.outputs, "modality": self.modality, "feature": self.feature, "gene_set": self.gene_set,
               **self.other}
        return {k: v for k, v in out.items() if v is not None}

    def summary(self, level: str = "modality") -> pl.DataFrame:
        """Global importance, sorted by ``mean_abs`` (mean |attribution|) descending.

        ``modality``: over all subjects (an absent modality counts 0 for that subject), with
        ``mean``, ``std``, ``share`` = its part of the summed ``mean_abs`` and ``n_present``.
        ``time``: per observation of each variable; ``time_by_variable``: per subject's sum over
        a variable's observations (frequently measured variables accumulate more). ``feature`` /
        ``gene_set``: over the subjects whose modality is present, with ``rank`` (1 = most important).
        Levels with values (``feature``, ``time``) also get ``corr`` and ``direction``, the direction
        of effect (:meth:`direction`).
        """
        frame = self.frames().get(level)
        if frame is None:
            raise ValueError(f"this explanation has no {level!r} level; it has {sorted(self.frames())}")
        if level == "modality":
            out = frame.group_by("modality").agg(
                pl.col("attribution").abs().mean().alias("mean_abs"), pl.col("attribution").mean().alias("mean"),
                pl.col("attribution").std().alias("std"), pl.col("present").sum().alias("n_present"))
            return out.with_columns((pl.col("mean_abs") / pl.col("mean_abs").sum()).alias("share"),
                                    pl.col("modality").cast(pl.String)).sort(["mean_abs", "modality"], descending=[True, False])
        keys = SUMMARY_KEYS.get(level)
        if keys is None:
            raise ValueError(f"level {level!r} has no global summary (its rows are per subject: use "
                             f"top({level!r}, k)); summaries exist for 'modality', {sorted(SUMMARY_KEYS)}")
        out = frame.group_by(keys).agg(
            pl.col("attribution").abs().mean().alias("mean_abs"), pl.col("attribution").mean().alias("mean"),
            pl.len().alias("n"))
        # summaries are small: plain strings, so they join with users' own String columns
        out = out.with_columns([pl.col(k).cast(pl.String) for k in keys if out.schema[k] == pl.Categorical])
        out = out.sort(["mean_abs", *keys], descending=[True, *[False] * len(keys)])
        out = out.with_columns(pl.int_range(1, pl.len() + 1).alias("rank"))
        if "value" in frame.columns or "category" in frame.columns:
            out = out.join(self.direction(level).select(*keys, "corr", "direction"), on=keys, how="left",
                           maintain_order="left")
        return out

    def direction(self, level: str = "feature") -> pl.DataFrame:
        """Direction of effect per feature (or variable): does a higher value raise or lower the
        explained output?

        Numeric values: ``corr`` = Pearson correlation, across the subjects whose value is not
        missing, between the value and its attribution; ``higher`` = ``"raises"`` when
        ``corr >= 0.2`` (:data:`DIRECTION_MIN_CORR`), ``"lowers"`` when ``corr <= -0.2``, else
        ``"no clear direction"``. Categories: ``raises`` / ``lowers`` = the category with the
        highest positive / lowest negative mean attribution. ``direction``: all of it in words
        (``"higher raises"``, ``"'positive' raises, 'negative' lowers"``).
        """
        frame = self.frames().get(level)
        keys = SUMMARY_KEYS.get(level)
        if frame is None or keys is None:
            raise ValueError(f"level {level!r} has no direction of effect; levels with values: "
                             f"{[lv for lv in ('feature', 'time') if lv in self.frames()]}")
        str_keys = [pl.col(k).cast(pl.String) for k in keys]
        parts = []
        if "value" in frame.columns:
            num = frame.filter(pl.col("value").is_not_null() & (~pl.col("missing") if "missing" in frame.columns else True))
            num = num.group_by(keys).agg(pl.corr("value", "attribution").alias("corr")).with_columns(
                *str_keys, pl.col("corr").fill_nan(None))
            parts.append(num.with_columns(
                pl.when(pl.col("corr") >= DIRECTION_MIN_CORR).then(pl.lit("raises"))
                .when(pl.col("corr") <= -DIRECTION_MIN_CORR).then(pl.lit("lowers"))
                .otherwise(pl.lit("no clear direction")).alias("higher"),
                pl.lit(None, pl.String).alias("raises"), pl.lit(None, pl.String).alias("lowers")))
        if "category" in frame.columns:
            cat = (frame.filter(pl.col("category").is_not_null())
                   .group_by([*keys, "category"]).agg(pl.col("attribution").mean().alias("m"))
                   .with_columns(*str_keys, pl.col("category").cast(pl.String)))
            cat = cat.group_by(keys).agg(
                pl.col("category").sort_by("m", descending=True).first().alias("top"), pl.col("m").max().alias("top_m"),
                pl.col("category").sort_by("m").first().alias("bottom"), pl.col("m").min().alias("bottom_m"))
            parts.append(cat.select(
                *keys, pl.lit(None, pl.Float64).alias("corr"), pl.lit(None, pl.String).alias("higher"),
                pl.when(pl.col("top_m") > 0).then(pl.col("top")).alias("raises"),
                pl.when(pl.col("bottom_m") < 0).then(pl.col("bottom")).alias("lowers")))
        if not parts:
            return pl.DataFrame(schema={**{k: pl.String for k in keys}, "corr": pl.Float64, "higher": pl.String,
                                        "raises": pl.String, "lowers": pl.String, "direction": pl.String})
        out = pl.concat(parts, how="vertical_relaxed")
        # a column is numeric or categorical: where a feature has both rows, its numeric one wins
        out = out.sort(pl.col("higher").is_null()).unique(keys, keep="first", maintain_order=True).sort(keys)
        words = (pl.when(pl.col("higher").is_in(["raises", "lowers"])).then(pl.lit("higher ") + pl.col("higher"))
                 .when(pl.col("higher").is_not_null()).then(pl.col("higher"))
                 .otherwise(pl.concat_str([
                     pl.when(pl.col("raises").is_not_null()).then(pl.lit("'") + pl.col("raises") + pl.lit("' raises")),
                     pl.when(pl.col("lowers").is_not_null()).then(pl.lit("'") + pl.col("lowers") + pl.lit("' lowers"))],
                     separator=", ", ignore_nulls=True)))
        return out.with_columns(words.alias("direction"))

    def with_display(self, labels: dict[str, str] | None = None, time_unit: str | None = None,
                     notes: Sequence[str] = (), modality_kinds: dict[str, str] | None = None) -> "Explanation":
        """The same explanation (frames shared) with what reports and plots need to speak plainly:

        * ``labels``: ``{column: display label}``, e.g. gene symbols for probe ids; shown as
          ``"ESR1 (X205225_at)"``. Only mappings the data owner gives: none is made up.
        * ``time_unit``: the unit of the training times (``"days"``), so a horizon reads
          ``S(1825 days)`` / ``5.0 years``; without it, times are in "time units".
        * ``notes``: sentences about the data for the report's methods (e.g. what the ids are).
        * ``modality_kinds``: ``{modality: kind}`` (``genes``: ``genomics`` reads "gene expression").
        """
        from mmclin.explain.targets import with_time_unit

        info = dict(self.info)
        if labels:
            info["feature_labels"] = {**info.get("feature_labels", {}), **{str(k): str(v) for k, v in labels.items()}}
        if time_unit:
            info["time_unit"] = str(time_unit)
            info["target"] = with_time_unit(str(info.get("target", "")), str(time_unit))
        if notes:
            info["notes"] = [*info.get("notes", []), *[str(n) for n in notes if str(n) not in info.get("notes", [])]]
        if modality_kinds:
            info["modality_kinds"] = {**info.get("modality_kinds", {}), **modality_kinds}
        return replace(self, info=info)

    def label(self, feature: str) -> str:
        """How ``feature`` is shown: ``"ESR1 (X205225_at)"`` when a label is known, else the name."""
        shown = self.info.get("feature_labels", {}).get(str(feature))
        return f"{shown} ({feature})" if shown and shown != str(feature) else str(feature)

    def patient_rows(self, patients: Sequence[Any] | None = None, n_extreme: int = 2) -> list[tuple[int, str]]:
        """Subjects for the per-patient view as ``(row, why)``: the given ``patients`` (values of
        the id column, else row numbers), or the ``n_extreme`` highest and lowest outputs."""
        o = self.outputs
        id_col = self.info.get("id_column")
        if patients:
            keys = o[id_col].cast(pl.String).to_list() if id_col and id_col in o.columns else [str(r) for r in o["row"]]
            where = {k: r for k, r in zip(keys, o["row"].to_list())}
            wanted = [str(p).strip() for p in patients if str(p).strip()]
            unknown = [p for p in wanted if p not in where]
            if unknown:
                raise ValueError(f"patient(s) {unknown[:5]} are not among the explained subjects "
                                 f"({'column ' + repr(id_col) if id_col else 'row numbers'}, e.g. {keys[:3]})")
            return [(where[p], "requested") for p in dict.fromkeys(wanted)]
        ranked = o.sort("output", descending=True)["row"].to_list()
        k = max(0, min(n_extreme, len(ranked) // 2))
        high = [(r, "highest prediction") for r in ranked[:k]]
        low = [(r, "lowest prediction") for r in ranked[::-1][:k]]
        return high + low if k else [(r, "explained") for r in ranked[:1]]

    def top(self, level: str, k: int = 3) -> pl.DataFrame:
        """Per subject, the ``k`` rows of ``level`` with the largest |attribution| (which notes,
        observations or patches mattered most), with their ``rank`` within the subject."""
        frame = self.frames().get(level)
        if frame is None:
            raise ValueError(f"this explanation has no {level!r} level; it has {sorted(self.frames())}")
        ranked = frame.with_columns(pl.col("attribution").abs().rank("ordinal", descending=True).over("row").alias("rank"))
        return ranked.filter(pl.col("rank") <= k).sort("row", "rank")

    def completeness(self) -> dict[str, float]:
        """Largest errors of the additivity identities (should be ~0):
        ``modality``: max |sum of Shapley values - (output - all_absent)|;
        ``ig``: max |IG convergence delta| and the same relative to max |output - reference| (all
        gradient levels together: feature, time, note, patch)."""
        out: dict[str, float] = {}
        if self.modality is not None:
            sums = self.modality.group_by("row").agg(pl.col("attribution").sum().alias("s")).sort("row")["s"].to_numpy()
            o = self.outputs.sort("row")
            out["modality_max_error"] = float(np.max(np.abs(sums - (o["output"] - o["all_absent"]).to_numpy())))
        if "ig_delta" in self.outputs.columns:
            d = np.abs(self.outputs["ig_delta"].to_numpy())
            span = np.abs((self.outputs["output"] - self.outputs["reference"]).to_numpy())
            out["ig_max_delta"] = float(d.max())
            out["ig_max_relative_delta"] = float(d.max() / max(span.max(), 1e-12))
        return out

    # --- plots, report, persistence ------------------------------------------------------
    def plot(self, level: str = "modality", path: str | Path | None = None, top: int = 20) -> Any:
        """A matplotlib figure of the global summary of ``level`` (saved as PNG when ``path``);
        ``level="patients"``: the per-patient view of :meth:`patient_rows`."""
        from mmclin.explain.report import plot_level, plot_patients

        if level == "patients":
            return plot_patients(self, self.patient_rows(), path)
        return plot_level(self, level, path, top)

    def to_html(self, path: str | Path, top: int = 30, images: dict[str, Path] | None = None,
                patients: Sequence[Any] | None = None) -> Path:
        """A self-contained HTML report (plots inlined): findings, cohort summary, individual
        patients (``patients``: ids; default the highest and lowest predictions), methods."""
        from mmclin.explain.report import html_report

        return html_report(self, Path(path), top, images, self.patient_rows(patients))

    def save(self, directory: str | Path, top: int = 20, patients: Sequence[Any] | None = None,
             labels: dict[str, str] | None = None, time_unit: str | None = None) -> dict[str, Path]:
        """Write every frame as parquet, one PNG per summarised level, ``patients.png``,
        ``report.html`` and ``info.json`` into ``directory``, which then holds this explanation's
        files only: they are written into a temporary directory beside it, swapped in at the end.

        A ``directory`` that exists must be empty or an earlier saved explanation (its
        ``.mmclin-explanation.json`` lists every file in it); otherwise nothing is written or
        deleted and :class:`mmclin.persistence.atomic.ForeignFilesError` (a ``ValueError``) names it. Files
        get the modes the umask gives. ``labels``, ``time_unit``: see :meth:`with_display`.
        """
        from mmclin.persistence.atomic import replace_owned_directory

        expl = self.with_display(labels=labels, time_unit=time_unit)
        rows = expl.patient_rows(patients)  # unknown ids fail before anything is written
        directory = Path(directory)
        names: dict[str, str] = {}
        with replace_owned_directory(directory, MARKER, "mmclin explain", recognise=earlier_explanation,
                                     info={"written_by": "mmclin explain", "n_subjects": expl.info.get("n_subjects"),
                                           "target": expl.info.get("target")}) as tmp:
            for name, frame in expl.frames().items():
                frame.write_parquet(tmp / f"{name}.parquet")
                names[name] = f"{name}.parquet"
            images = {}
            import matplotlib.pyplot as plt

            for level, fname in PLOT_FILES.items():
                if expl.frames().get(level) is not None:
                    plt.close(expl.plot(level, tmp / fname, top))
                    images[level] = tmp / fname
                    names[f"{level}_png"] = fname
            if expl.modality is not None or expl.feature is not None:
                from mmclin.explain.report import plot_patients

                plt.close(plot_patients(expl, rows, tmp / PATIENT_PLOT))
                images["patients"] = tmp / PATIENT_PLOT
                names["patients_png"] = PATIENT_PLOT
            from mmclin.explain.report import html_report

            html_report(expl, tmp / "report.html", top, images, rows)
            names["report"] = "report.html"
            import json

            (tmp / "info.json").write_text(json.dumps({**expl.info, "completeness": expl.completeness()}, indent=1,
                                                      default=str))
            names["info"] = "info.json"
        return {k: directory / v for k, v in names.items()}

    def log_to_mlflow(self, run_id: str | None = None, artifact_path: str = "explanations", top: int = 20,
                      directory: str | Path | None = None) -> None:
        """Log the saved files (``directory`` from :meth:`save`, else a fresh temporary save) as
        artifacts of ``run_id`` (default: the active run), and the modality shares as metrics
        ``explain_share_<modality>``."""
        import math
        import tempfile

        import mlflow

        rid = run_id or (mlflow.active_run().info.run_id if mlflow.active_run() else None)
        if rid is None:
            raise ValueError("no MLflow run to log to: pass run_id=... or call inside mlflow.start_run()")
        client = mlflow.MlflowClient()
        with tempfile.TemporaryDirectory() as tmp:
            if directory is None:
                self.save(tmp, top)
            client.log_artifacts(rid, str(directory or tmp), artifact_path=artifact_path)
        if self.modality is not None:
            for r in self.summary("modality").iter_rows(named=True):
                if r["share"] is not None and not math.isnan(r["share"]):
                    client.log_metric(rid, f"explain_share_{r['modality']}", float(r["share"]))
