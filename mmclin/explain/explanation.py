"""The result of ``explain``: tidy frames, global summaries, plots, an HTML report, MLflow logging."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

PLOT_FILES = {"modality": "modality_importance.png", "feature": "feature_importance.png",
              "gene_set": "gene_set_importance.png", "time_by_variable": "variable_importance.png"}
# what a global summary groups by; levels without an entry (note, patch) are per subject: see top()
SUMMARY_KEYS = {"feature": ["modality", "input", "feature"], "gene_set": ["modality", "gene_set"],
                "time": ["modality", "variable"], "time_by_variable": ["modality", "variable"]}


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
    * ``info``: what was explained and how (target, methods, baselines, timing).
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
        return out.with_columns(pl.int_range(1, pl.len() + 1).alias("rank"))

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
        """A matplotlib figure of the global summary of ``level`` (saved as PNG when ``path``)."""
        from mmclin.explain.report import plot_level

        return plot_level(self, level, path, top)

    def to_html(self, path: str | Path, top: int = 30, images: dict[str, Path] | None = None) -> Path:
        """A self-contained HTML report (plots inlined) of the global summaries."""
        from mmclin.explain.report import html_report

        return html_report(self, Path(path), top, images)

    def save(self, directory: str | Path, top: int = 20) -> dict[str, Path]:
        """Write every frame as parquet, one PNG per summarised level, ``report.html`` and ``info.json``
        (each file atomically)."""
        from mmclin.atomic import write_file_atomic, write_json_atomic

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written: dict[str, Path] = {}
        for name, frame in self.frames().items():
            written[name] = write_file_atomic(directory / f"{name}.parquet", frame.write_parquet)
        images = {}
        for level, fname in PLOT_FILES.items():
            if self.frames().get(level) is not None:
                import matplotlib.pyplot as plt

                path = write_file_atomic(directory / fname, lambda tmp: plt.close(self.plot(level, tmp, top)))
                images[level] = written[f"{level}_png"] = path
        written["report"] = write_file_atomic(directory / "report.html", lambda tmp: self.to_html(tmp, images=images))
        written["info"] = write_json_atomic(directory / "info.json", {**self.info, "completeness": self.completeness()},
                                            default=str)
        return written

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
