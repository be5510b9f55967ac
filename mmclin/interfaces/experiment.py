"""Experiments from a config: load data, split by subject, fit, evaluate, track.

The CLI and the studies drive this module; it calls the same training core as the
estimators (``mmclin.training.fit_model``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import polars as pl

from mmclin.cohort import Cohort, check_column_roles, check_unique_ids
from mmclin.config import ComponentConfig, ExperimentConfig, load_config
from mmclin.persistence.outputs import new_run_directory, settled_on_failure, unfinished_run_directory, update_marker

log = logging.getLogger("mmclin")

DEFAULT_TASK = {"survival": "cox", "binary": "binary", "multiclass": "multiclass", "multilabel": "multilabel",
                "regression": "regression"}


TABLE_SUFFIXES = (".parquet", ".pq", ".csv", ".tsv")
OUTPUT_SUFFIXES = (".parquet", ".pq", ".csv")


NA_TOKENS = ("NA", "N/A", "NaN", "nan", "null", "NULL", "None", ".", "-", "?", "#N/A")


def read_table(path: str | Path, text_columns: list[str] | None = None,
               null_values: list[str] | None = None) -> pl.DataFrame:
    """A parquet/CSV/TSV file as a polars frame, refusing what would otherwise be coerced silently.

    ``text_columns`` (e.g. the id column) are read as text, so ``0001`` stays ``0001``; ``null_values``
    (e.g. ``["NA"]``, ``data.null_values``) are read as missing in CSV files. Without them, a column of
    numbers holding a few missing-value words (R's ``NA``) is an error naming the column, the word and its
    row, not a column of text; a header that names a column twice is an error too.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"data file {str(path)!r} is a directory; expected a .parquet or .csv/.tsv file")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq", ".csv", ".tsv") and path.stat().st_size == 0:
        raise ValueError(f"data file {str(path)!r} is empty (0 bytes); expected a {suffix} file with a header and rows")
    if suffix in (".parquet", ".pq"):
        try:
            frame = pl.read_parquet(path)
        except (pl.exceptions.ComputeError, OSError) as err:
            raise ValueError(f"data file {str(path)!r} is not a readable parquet file (truncated or damaged?: "
                             f"{str(err).splitlines()[0]})") from None
    elif suffix in (".csv", ".tsv"):
        sep = "\t" if suffix == ".tsv" else ","
        with open(path, "rb") as f:
            head = f.read(4096)
        if head[:4] == b"PAR1":
            raise ValueError(f"data file {str(path)!r} is a parquet file (it starts with PAR1), not {suffix}; "
                             "rename it .parquet")
        _check_text_encoding(path, head)
        _check_header(path, sep)
        frame = _read_csv(path, sep, text_columns, null_values)
        if frame.width == 1:  # one column holding separators: the file uses another one
            other = next((name for ch, name in (("\t", "tabs"), (";", "semicolons"), (",", "commas"), ("|", "pipes ('|')"))
                          if ch != sep and ch in frame.columns[0]), None)
            if other:
                fix = "name it .tsv" if other == "tabs" else "convert it to comma-separated CSV or parquet"
                raise ValueError(f"data file {str(path)!r} has one column {frame.columns[0][:60]!r}...: its fields seem "
                                 f"separated by {other}, not {'tabs' if sep == chr(9) else 'commas'}; {fix}")
        _check_number_columns(frame, path, set(text_columns or []))
    else:
        raise ValueError(f"data file {str(path)!r}: expected .parquet or .csv/.tsv, got {suffix!r}")
    if frame.height == 0:
        raise ValueError(f"data file {str(path)!r} has a header but no rows")
    return frame


def _check_text_encoding(path: Path, head: bytes) -> None:
    """UTF-16/UTF-32 text (a byte-order mark, or the NUL bytes of wide characters) would be read as garbled column
    names, not as an encoding error: refuse it, naming the encoding."""
    boms = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
            (b"\xfe\xff", "UTF-16"))
    found = next((name for bom, name in boms if head.startswith(bom)), None)
    if found is None and b"\x00" in head and not head.startswith(b"\x1f\x8b"):  # gzip: polars decompresses it
        found = "UTF-16 or binary (it holds NUL bytes)"
    if found is not None:
        raise ValueError(f"data file {str(path)!r} is {found}, not UTF-8 text; re-encode it as UTF-8 (e.g. iconv -f "
                         f"{found.split()[0].lower()} -t utf-8) or save it from your spreadsheet as 'CSV UTF-8'")


def _read_csv(path: Path, sep: str, text_columns: list[str] | None, null_values: list[str] | None) -> pl.DataFrame:
    """polars' CSV reader, its errors turned into one line naming the file and the line."""
    from mmclin.datasets.events import readable_text

    try:
        with readable_text([(f"data file {str(path)!r}", path)]):
            return pl.read_csv(path, separator=sep, infer_schema_length=10000, null_values=null_values,
                               schema_overrides={c: pl.String for c in text_columns or []})
    except pl.exceptions.NoDataError:
        raise ValueError(f"data file {str(path)!r} is empty") from None
    except pl.exceptions.ComputeError as err:
        ragged = _ragged_line(path, sep)
        if ragged is not None:
            line, n, width = ragged
            raise ValueError(f"data file {str(path)!r}, line {line}: {n} fields, but the header has {width}; a value "
                             "holding the separator must be quoted (or the row fixed)") from None
        raise ValueError(f"data file {str(path)!r} cannot be read as {'TSV' if sep == chr(9) else 'CSV'} "
                         f"({str(err).splitlines()[0]})") from None


def _ragged_line(path: Path, sep: str) -> tuple[int, int, int] | None:
    """``(line, fields, header fields)`` of the first row with more fields than the header."""
    import csv

    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        rows = csv.reader(f, delimiter=sep)
        header = next(rows, [])
        for row in rows:
            if len(row) > len(header):
                return rows.line_num, len(row), len(header)
    return None


def _check_header(path: Path, sep: str) -> None:
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f, delimiter=sep), [])
    except UnicodeDecodeError:
        return  # reported by the reader, with the byte offset
    seen: set[str] = set()
    for i, name in enumerate(header):
        if name in seen:
            raise ValueError(f"data file {str(path)!r}: the header names column {name!r} twice (the second time as "
                             f"field {i + 1}); column names must be unique")
        seen.add(name)


def _check_number_columns(frame: pl.DataFrame, path: Path, text: set[str]) -> None:
    """A text column whose values are numbers but for missing-value words: refuse, saying how to read it."""
    for name, dtype in frame.schema.items():
        if dtype != pl.String or name in text:
            continue
        col = frame[name]
        numbers = col.cast(pl.Float64, strict=False)
        words = col.is_not_null() & numbers.is_null()
        n_words, n_values = int(words.sum()), int(col.is_not_null().sum())
        comma = col.filter(words).str.contains(r"^\s*[+-]?(\d{1,3}(,\d{3})+(\.\d+)?|\d+,\d+)\s*$")
        if n_words and comma.all():  # every cell that is not a number is one written with a comma
            row = int(words.arg_max())
            raise ValueError(
                f"data file {str(path)!r}, column {name!r}: numbers written with a comma ({n_words} cell(s), e.g. "
                f"{col[row]!r} at row {row}), which would be read as text (a categorical column); write them with "
                "no thousands separator and a '.' as the decimal point (e.g. 2250 or 2.25)")
        if 0 < n_words and n_words <= 0.2 * n_values and col.filter(words).is_in(list(NA_TOKENS)).all():
            row = int(words.arg_max())
            raise ValueError(
                f"data file {str(path)!r}, column {name!r}: numbers, but {n_words} cell(s) hold the word "
                f"{col[row]!r} (first at row {row}), so the column would be read as text; if it marks a missing "
                f"value, set data.null_values: [{col[row]!r}] (or write empty cells)")


def read_frame_or_cohort(data: str, id_column: str | None = None) -> tuple[pl.DataFrame, str | None]:
    """A one-row-per-subject file, or a built-in cohort's frame (with its id column) when no such file exists."""
    if Path(data).exists() or Path(data).suffix.lower() in TABLE_SUFFIXES or "/" in data:
        # a file name: a missing one is reported as such; the id column stays text (0001 is not 1)
        return read_table(data, [id_column] if id_column else None), id_column
    from mmclin.datasets import load_cohort

    cohort = load_cohort(data)
    return cohort.frame, id_column or cohort.id_column


def targets_from_frame(frame: pl.DataFrame, columns: list[str], problem: str) -> Any:
    """``y`` from target columns: ``[event, time]`` for survival (scikit-survival layout), one label column otherwise."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"target column(s) {missing} are not in the data (columns: {frame.columns[:12]}...)")
    if problem == "survival":
        if len(columns) != 2:
            raise ValueError(f"data.target for survival must be [event_column, time_column], got {columns}")
        if isinstance(frame.schema[columns[1]], pl.Duration):
            raise ValueError(f"target time column {columns[1]!r} holds durations ({frame.schema[columns[1]]}), not "
                             f"numbers; store them as numbers in one unit, e.g. days: pl.col({columns[1]!r})"
                             ".dt.total_days()")
        if frame.schema[columns[1]].is_temporal():
            raise ValueError(f"target time column {columns[1]!r} holds dates ({frame.schema[columns[1]]}); expected the "
                             "time from the start of follow-up to the event or censoring (e.g. days: end - start)")
        if not frame.schema[columns[1]].is_numeric():
            col = frame[columns[1]]
            first = col.drop_nulls().head(1).to_list()
            swapped = (f" (data.target {columns} lists the event first, then the time: swap them?)"
                       if col.dtype == pl.Boolean and frame.schema[columns[0]].is_numeric() else "")
            raise ValueError(f"target time column {columns[1]!r} holds {col.dtype} values (e.g. "
                             f"{first[0] if first else None!r}), not numbers; store the time from the start of "
                             f"follow-up as numbers (e.g. days){swapped}")
        event, time = (frame[c].to_numpy() for c in columns)
        return np.rec.fromarrays([event, time.astype(float)], names=["event", "time"]).view(np.ndarray)
    if problem == "multilabel":
        return frame.select(columns).to_numpy()
    if problem != "multitask" and len(columns) != 1:
        raise ValueError(f"data.target for a {problem} task must be one label column, got {columns} (a survival target "
                         "[event, time] needs model.task cox or discrete_time)")
    if problem == "multitask":  # one column per sub-task, named like the sub-task
        return {c: frame[c].to_numpy() for c in columns}
    return frame[columns[0]].to_numpy()


def check_output_name(path: str | Path) -> Path:
    """A predictions file name mmclin can write (checked before any work is done)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"output {str(path)!r} is a directory; expected a .parquet or .csv file name (e.g. "
                                f"{str(path / 'predictions.parquet')!r})")
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"output {str(path)!r}: expected a .parquet or .csv file name")
    return path


def write_atomic(frame: pl.DataFrame, path: str | Path) -> Path:
    """Write parquet/CSV to a temp file beside ``path``, then rename: never a half-written file."""
    from mmclin.persistence.atomic import write_file_atomic

    path = check_output_name(path)
    suffix = path.suffix.lower()
    return write_file_atomic(path, frame.write_csv if suffix == ".csv" else frame.write_parquet)


@dataclass
class FitResult:
    metrics: dict[str, float]
    predictions: pl.DataFrame
    model_dir: Path
    run_id: str | None
    fitted: Any = None
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class CVResult:
    folds: pl.DataFrame  # one row per fold, one column per metric
    summary: pl.DataFrame  # metric, mean, std
    run_id: str | None
    predictions: pl.DataFrame | None = None  # out-of-fold test predictions with their fold
    missing_report: Any = None  # mmclin.evaluation.robustness.MissingReport over the folds' test sets, when asked for
    baselines: Any = None  # mmclin.evaluation.baselines.BaselineComparison on the same folds, when asked for


class Experiment:
    """One experiment config, run through the shared core.

        >>> exp = Experiment.from_yaml("experiments/gse7390_survival.yaml", ["trainer.max_epochs=5"])  # doctest: +SKIP
        >>> exp.fit().metrics["c_index"]  # doctest: +SKIP
    """

    def __init__(self, config: ExperimentConfig, overrides: list[str] | None = None) -> None:
        self.config = config
        self.overrides = list(overrides or [])  # the --set values: they name the MLflow runs
        self._cohort: Cohort | None = None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> "Experiment":
        return cls(load_config(path, overrides), overrides)

    # --- data ---------------------------------------------------------------------------
    @property
    def cohort(self) -> Cohort:
        if self._cohort is None:
            self._cohort = self._load_cohort()
        return self._cohort

    def _load_cohort(self) -> Cohort:
        from mmclin.persistence.paths import PATH_KINDS, apply_data_root

        cohort = self._read_cohort()
        root = self.config.data.root
        if root is not None and not any(s.kind in PATH_KINDS for s in cohort.modalities):
            log.warning("data.root %r is ignored: it applies to modalities that read files (kinds %s), and this "
                        "config has none", root, ", ".join(sorted(PATH_KINDS)))
        # file paths of image/slide modalities stay under data.root when one is set
        cohort.modalities = apply_data_root(cohort.modalities, self.config.data.root)
        self._check_targets(cohort)
        self._check_columns(cohort)
        return cohort

    def _check_targets(self, cohort: Cohort) -> None:
        """Bad targets fail before any split or training, naming the row of the whole data: what the task
        refuses in any row, and what it could not learn from even all of them (no event, one class)."""
        task = _build_task(self._task_config_of(cohort))
        try:
            task.fit_targets(task.check_targets(cohort.y))
        except ValueError as err:
            where = f" in {cohort.source!r}" if cohort.source else ""
            raise ValueError(f"target column(s) {cohort.target_columns}{where}: {err}") from None

    def _check_columns(self, cohort: Cohort) -> None:
        """The group column exists, and the id column cannot collide with a column the predictions add
        (found before training, not when the trained model's predictions are written)."""
        import difflib

        where = f"{cohort.source!r}" if cohort.source else f"cohort {cohort.name!r}"
        group = self.config.data.group_column
        if group is not None and group not in cohort.frame.columns:
            close = difflib.get_close_matches(group, cohort.frame.columns, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; columns are {cohort.frame.columns[:10]}..."
            raise ValueError(f"data.group_column {group!r} is not a column of {where}{hint}")
        if group is not None and cohort.frame[group].null_count():
            col = cohort.frame[group]
            raise ValueError(f"data.group_column {group!r} in {where} is null in {col.null_count()} row(s), the first "
                             f"at row {int(col.is_null().arg_max())}: every row needs its group")
        id_col = cohort.id_column
        check_column_roles(cohort.modalities, id_col or None, cohort.target_columns)
        if id_col:
            # the task from this cohort: self.task_config() would load the cohort again, and land here
            clash = _output_column_clash(id_col, _build_task(self._task_config_of(cohort)).problem)
            if clash:
                raise ValueError(f"id column {id_col!r} of {where} has the name of {clash}; rename it (e.g. "
                                 f"{id_col + '_id'!r}) before training")

    def _read_cohort(self) -> Cohort:
        d = self.config.data
        if d.cohort is not None:
            from mmclin.datasets import load_cohort

            c = load_cohort(d.cohort)
            if d.modalities is not None:  # the config may pick or reshape modalities
                c.modalities = list(d.modalities)
            return c
        frame = read_table(d.path, [d.id_column] if d.id_column else None, d.null_values)
        task_cfg = self.config.model.task
        if task_cfg is None:
            raise ValueError("data.path needs model.task (e.g. {name: cox} or {name: binary})")
        problem = _build_task(task_cfg).problem
        y = targets_from_frame(frame, d.target, problem)
        id_col = d.id_column
        check_unique_ids(frame, id_col)
        return Cohort(Path(d.path).stem, frame, list(d.modalities), y, problem, id_col or "", list(d.target),
                      source=str(d.path))

    def task_config(self) -> ComponentConfig:
        return self._task_config_of(None if self.config.model.task is not None else self.cohort)

    def _task_config_of(self, cohort: Cohort | None) -> ComponentConfig:
        """model.task, else the default task of ``cohort``'s kind (survival -> cox)."""
        if self.config.model.task is not None:
            return self.config.model.task
        return ComponentConfig(name=DEFAULT_TASK[cohort.task])

    def _groups(self) -> np.ndarray | None:
        g = self.config.data.group_column
        return None if g is None else self.cohort.frame[g].to_numpy()

    # --- core ---------------------------------------------------------------------------
    def _fit(self, frame: pl.DataFrame, y: Any, epoch_sink=None, checkpoints=None, progress_label: str | None = None):
        from mmclin.training.core import fit_model

        c = self.cohort
        return fit_model(frame, y, c.modalities, self.config.model, self.config.trainer, self.task_config(),
                         id_column=c.id_column or None, epoch_sink=epoch_sink, checkpoints=checkpoints,
                         progress_label=progress_label)

    def _task(self):
        return _build_task(self.task_config())

    def _problem(self) -> str:
        return self._task().problem

    def fit(self, output_dir: str | Path | None = None, resume: bool = False,
            follow_checkpoints_of: str | Path | None = None) -> FitResult:
        """Hold-out fit: train (with a validation carve-out for early stopping) and score on the test subjects.

        Training checkpoints go to ``<output>/checkpoints`` every ``trainer.checkpoint_every`` epochs
        and are removed once the model is saved; ``resume`` continues an interrupted run from them
        (same MLflow run), ending exactly as the uninterrupted run on CPU. ``follow_checkpoints_of``:
        the output directory of DDP rank 0, whose checkpoints a rank > 0 resumes from without writing.
        """
        from mmclin.persistence import tracking
        from mmclin.training.predictions import check_finite_outputs, prediction_frame
        from mmclin.training.core import checkpoint_store
        from mmclin.training.splits import holdout_split

        cfg, c = self.config, self.cohort
        if resume and not cfg.trainer.checkpoint_every:
            raise ValueError("--resume needs checkpoints, but trainer.checkpoint_every is 0 (checkpointing is off)")
        _check_enough_rows(c, test_size=cfg.data.test_size)
        tr, te = holdout_split(c.y, self._problem(), cfg.data.test_size, cfg.data.split_seed, self._groups())
        out, made_here = self._run_directory(Path(output_dir or cfg.output_dir) / cfg.name, resume)
        with settled_on_failure(out, made_here):
            store = None
            if cfg.trainer.checkpoint_every:
                follow = follow_checkpoints_of is not None and resume
                where = unfinished_run_directory(Path(follow_checkpoints_of) / cfg.name) if follow else out
                if where is None:
                    raise ValueError(f"--resume: no unfinished run under {str(Path(follow_checkpoints_of) / cfg.name)!r}")
                try:
                    store = checkpoint_store(where / "checkpoints", c.frame[tr], _take(c.y, tr), c.modalities, cfg.model,
                                             cfg.trainer, self.task_config(), resume, read_only=follow)
                except json.JSONDecodeError as err:  # the index of the checkpoints, damaged (a disk or a hand)
                    raise ValueError(f"--resume: the checkpoint index {str(where / 'checkpoints' / 'store.json')!r} is "
                                     f"damaged (not valid JSON: {err}); nothing was deleted: move {str(where)!r} away to "
                                     "train from the start") from None
            tracking.quiet_mlflow()
            resume_run_id = (store.run_id if store is not None else None) if resume else None
            with tracking.tracked_run(cfg.tracking, self.run_name("fit"), tags=self._run_tags("fit", out),
                                      resume_run_id=resume_run_id) as run:
                if run is not None:
                    if store is not None:
                        store.run_id = run.info.run_id
                    update_marker(out, mlflow_run_id=run.info.run_id)
                    tracking.log_config(cfg, c.frame)
                    tracking.log_metrics({"n_train": len(tr), "n_test": len(te)})
                with rows_of_data(tr):
                    fitted = self._fit(c.frame[tr], _take(c.y, tr), tracking.epoch_logger() if run else None, store)
                test_frame = c.frame[te]
                with rows_of_data(te):
                    outputs = check_finite_outputs(fitted.predict_outputs(test_frame), "the test subjects")
                    metrics = fitted.task.reported_metrics(_take(c.y, te), outputs, y_train=_take(c.y, tr))
                preds = prediction_frame(fitted, test_frame, c.id_column or None)
                model_dir = fitted.save(out / "model")
                write_atomic(preds, out / "test_predictions.parquet")
                if run is not None:
                    tracking.log_metrics(metrics, prefix="test_")
                    tracking.log_metrics({"best_epoch": fitted.best_epoch})
                    tracking.log_frame(preds, "test_predictions.parquet")
                    if cfg.tracking.log_model:
                        # no input example: MLflow would store raw patient rows with the model
                        log_fitted_model(fitted, model_dir)
            if store is not None:  # the model and predictions are saved: nothing left to resume
                store.clear()
            update_marker(out, status="finished")
        return FitResult(metrics, preds, model_dir, run.info.run_id if run else None, fitted, fitted.history)

    def _run_directory(self, parent: Path, resume: bool) -> tuple[Path, bool]:
        """A new run directory under ``parent`` (``outputs/<name>``); with ``resume``, the newest unfinished one;
        and whether it was made now."""
        if resume:
            found = unfinished_run_directory(parent)
            if found is not None:
                _remove_stale_temporaries(found, ["model", "test_predictions.parquet"])
                return found, False
            log.warning("--resume: no unfinished run under %s; training from the start", parent)
        return new_run_directory(parent, "fit", self.config.name), True

    def run_name(self, verb: str) -> str:
        """The MLflow run name: the config's ``tracking.run_name``, else its name, the verb and the
        ``--set`` overrides, so that runs of one config with other settings can be told apart."""
        if self.config.tracking.run_name:
            return self.config.tracking.run_name
        changed = [o for o in self.overrides if not o.startswith(("tracking.", "trainer.progress_bar"))]
        return f"{self.config.name} {verb}" + (f" [{', '.join(changed)}]" if changed else "")

    def _run_tags(self, verb: str, out: Path | None = None) -> dict[str, str]:
        tags = {"mmclin.verb": verb}
        if self.overrides:
            tags["mmclin.overrides"] = " ".join(self.overrides)[:5000]
        if out is not None:
            tags["mmclin.output_dir"] = str(out.resolve())
        return tags

    def evaluate(self, cv: int | None = None, missing_report: bool | dict[str, Any] = False,
                 baselines: bool | list[str] = False) -> CVResult:
        """Cross-validated metrics with subject-level folds (``cv`` folds), or the hold-out split when ``cv`` is None.

        ``baselines``: True (or a list of names) also fits the classical baselines of
        :mod:`mmclin.evaluation.baselines` on the same folds and columns, and compares mmclin to the
        best of them (paired, with a bootstrap confidence interval); logged under ``baselines/``.

        ``missing_report``: True (or a dict of :func:`mmclin.evaluation.robustness.missing_report` options)
        also evaluates each fold's model on its test subjects under every modality subset and
        under missingness shifts; tables and plot go to MLflow under ``missing_report/``.
        """
        from mmclin.persistence import tracking
        from mmclin.training.predictions import check_finite_outputs, prediction_columns
        from mmclin.training.splits import cv_splits, holdout_split

        cfg, c = self.config, self.cohort
        task = self._task()
        problem = task.problem
        if baselines:
            from mmclin.evaluation.baselines import check_baselines

            check_baselines(c.modalities, problem, None if baselines is True else list(baselines))
        if cv is None:
            _check_enough_rows(c, test_size=cfg.data.test_size)
            splits = [holdout_split(c.y, problem, cfg.data.test_size, cfg.data.split_seed, self._groups())]
        else:
            if cv < 2:
                raise ValueError(f"--cv must be at least 2, got {cv}")
            _check_enough_rows(c, cv=cv)
            splits = list(cv_splits(c.y, problem, cv, cfg.data.split_seed, self._groups()))
            _say_fold_support(task, c.y, splits, lambda k: list(cv_splits(c.y, problem, k, cfg.data.split_seed,
                                                                         self._groups())))
        tracking.quiet_mlflow()
        rows, oof, reports, fold_scores = [], [], [], []
        with tracking.tracked_run(cfg.tracking, self.run_name(f"evaluate cv{cv}" if cv else "evaluate"),
                                  tags=self._run_tags("evaluate")) as run:
            if run is not None:
                tracking.log_config(cfg, c.frame)
            for k, (tr, te) in enumerate(splits):
                with tracking.tracked_run(cfg.tracking, f"fold-{k}", nested=True) as fold_run:
                    with rows_of_data(tr):
                        fitted = self._fit(c.frame[tr], _take(c.y, tr), tracking.epoch_logger() if fold_run else None,
                                           progress_label=f"fold {k + 1}/{len(splits)}" if cv else None)
                    with rows_of_data(te):
                        outputs = check_finite_outputs(fitted.predict_outputs(c.frame[te]), "the test subjects")
                        metrics = fitted.task.reported_metrics(_take(c.y, te), outputs, y_train=_take(c.y, tr))
                    if baselines:
                        from mmclin.evaluation.baselines import task_scores

                        fold_scores.append(task_scores(fitted.task, outputs))
                    preds = pl.DataFrame({k: np.asarray(v) for k, v in prediction_columns(fitted.task, outputs).items()})
                    oof.append(preds.insert_column(0, pl.Series("fold", [k] * len(te))).insert_column(
                        0, c.frame[c.id_column][te] if c.id_column else pl.Series("row", te)))
                    if fold_run is not None:
                        tracking.log_metrics(metrics, prefix="test_")
                    if missing_report:
                        from mmclin.evaluation.robustness import missing_report as _report

                        options = {"seed": cfg.data.split_seed, **(missing_report if isinstance(missing_report, dict) else {})}
                        reports.append(_report(fitted, c.frame[te], _take(c.y, te), y_train=_take(c.y, tr), **options))
                rows.append({"fold": k, "n_train": len(tr), "n_test": len(te), **metrics})
            folds = pl.DataFrame(rows)
            metric_names = [k for k in rows[0] if k not in ("fold", "n_train", "n_test")]
            summary = pl.DataFrame({
                "metric": metric_names,
                "mean": [_nan_stat(folds[m], np.nanmean) for m in metric_names],
                "std": [_nan_stat(folds[m], lambda a: np.nanstd(a, ddof=1) if np.isfinite(a).sum() > 1 else np.nan)
                        for m in metric_names],  # the sample sd over folds, as in the baselines' table
                # the folds each mean rests on: a metric undefined in a fold (too few subjects or events) is left out
                "folds": [int(np.isfinite(folds[m].cast(pl.Float64).to_numpy()).sum()) for m in metric_names],
            })
            if run is not None:
                tracking.log_metrics({f"cv_mean_{r['metric']}": r["mean"] for r in summary.to_dicts()})
                tracking.log_metrics({f"cv_std_{r['metric']}": r["std"] for r in summary.to_dicts()})
                tracking.log_frame(folds, "cv_folds.parquet")
                tracking.log_frame(pl.concat(oof), "cv_predictions.parquet")
            report = None
            if reports:
                from mmclin.evaluation.robustness import MissingReport

                report = MissingReport.concat(reports)
                if run is not None:
                    report.log_to_mlflow()
            comparison = None
            if baselines:
                from mmclin.evaluation.baselines import compare, fit_baselines

                log.info("fitting the classical baselines on the same %d fold(s)", len(splits))
                fitted_baselines = fit_baselines(c.frame, c.y, c.modalities, problem, splits, cfg.trainer.seed,
                                                 None if baselines is True else list(baselines))
                comparison = compare(problem, task.primary_metric, c.y, splits, fold_scores, fitted_baselines,
                                     seed=cfg.data.split_seed)
                if run is not None:
                    comparison.log_to_mlflow()
        return CVResult(folds, summary, run.info.run_id if run else None, pl.concat(oof), report, comparison)


def _build_task(cfg: ComponentConfig):
    """The task of ``model.task``; a bad option is an error naming that key."""
    from mmclin.training.core import build_task

    try:
        return build_task(cfg)
    except (TypeError, ValueError) as err:
        raise ValueError(f"model.task ({cfg.name}): {err}") from None


def _say_fold_support(task: Any, y: Any, splits: list[tuple[np.ndarray, np.ndarray]],
                      splits_of: Any) -> None:
    """Before any fold is trained: say how many test folds are too small for the primary metric (too few subjects
    or events; the thresholds of ``Task.undefined_metrics``), and the largest fold count that is not."""
    task.fit_targets(task.check_targets(y))  # the classes, so that the support of a fold can be counted

    def thin(folds: list[tuple[np.ndarray, np.ndarray]]) -> list[str]:
        reasons = (task.undefined_metrics(_take(y, te)).get(task.primary_metric) for _, te in folds)
        return [r for r in reasons if r]

    found = thin(splits)
    if not found:
        return
    fewer = next((k for k in range(len(splits) - 1, 1, -1) if not thin(splits_of(k))), None)
    fix = f"use --cv {fewer} or fewer" if fewer else "no fold count of 2 or more gives every fold enough of them"
    log.warning("--cv %d: %d of %d test folds are too small for %s, which is undefined (NaN) there and left out of "
                "its mean (the first: %s); %s", len(splits), len(found), len(splits), task.primary_metric, found[0], fix)


def _output_column_clash(id_column: str, problem: str) -> str:
    """What ``id_column`` would collide with in the predictions (``risk``, ``prediction``, ``proba_<class>``) or
    in evaluate's out-of-fold frame (``fold``); '' when nothing."""
    fixed = {"survival": ["risk"], "regression": ["prediction"]}.get(problem, ["prediction"])
    if id_column in fixed or id_column == "fold":
        return f"a prediction column ({[*fixed, 'fold']})"
    prefixes = {"binary": ("proba_",), "multiclass": ("proba_",), "multilabel": ("proba_", "label_")}.get(problem, ())
    if id_column.startswith(prefixes) or (problem == "multitask" and "/" in id_column):
        return f"a prediction column (they are named {', '.join(p + '<class>' for p in prefixes) or '<task>/<column>'})"
    return ""


def _check_enough_rows(cohort: Cohort, test_size: float | None = None, cv: int | None = None) -> None:
    """Enough rows for the split before anything is trained: a test row and 2 training rows (hold-out), or
    ``cv`` folds that each leave 2 training rows."""
    n = cohort.frame.height
    where = f"data file {cohort.source!r}" if cohort.source else f"cohort {cohort.name!r}"
    if cv is not None:
        need = next(m for m in range(max(cv, 3), 10_000) if m - math.ceil(m / cv) >= 2)
        if n < need:
            raise ValueError(f"{where} has {n} row(s): too few for {cv}-fold cross-validation; at least {need} rows "
                             f"are needed (or a smaller --cv)")
        return
    assert test_size is not None
    need = next(m for m in range(3, 10_000) if m - math.ceil(m * test_size) >= 2)
    if n < need:
        n_test = math.ceil(n * test_size)
        raise ValueError(f"{where} has {n} row(s): too few for a hold-out fit with data.test_size {test_size:g} "
                         f"({n_test} test, {n - n_test} training row(s)); at least {need} rows are needed")


@contextlib.contextmanager
def rows_of_data(rows: np.ndarray) -> Iterator[None]:
    """Errors that name ``row N`` of a split's frame (training or test subjects) name the row of the
    whole data instead, so the row can be found in the user's file."""
    try:
        yield
    except ValueError as err:
        message = str(err.args[0]) if len(err.args) == 1 else None
        if message is None:
            raise
        renamed = re.sub(r"\brow (\d+)\b", lambda m: f"row {rows[int(m.group(1))]}" if int(m.group(1)) < len(rows)
                         else m.group(0), message)
        if renamed == message:
            raise
        try:
            clearer = type(err)(renamed)
        except Exception:  # an error type with another constructor
            clearer = ValueError(renamed)
        raise clearer.with_traceback(err.__traceback__) from None


def _remove_stale_temporaries(directory: Path, names: list[str]) -> None:
    """Temporary files and directories of writes that a kill interrupted (``.<name>.*``; see
    :func:`write_atomic`, ``FittedModel.save``): never valid output, removed before writing anew."""
    import shutil

    stale = [p for name in names for p in directory.glob(f".{name}.*")] if directory.is_dir() else []
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    if stale:
        import logging

        logging.getLogger("mmclin").info("removed %d unfinished temporary file(s) in %s", len(stale), directory)


def _nan_stat(series: pl.Series, fn) -> float:
    arr = series.cast(pl.Float64).to_numpy()
    return float("nan") if np.isnan(arr).all() else float(fn(arr))


def _take(y: Any, idx: np.ndarray) -> Any:
    if isinstance(y, dict):
        return {k: _take(v, idx) for k, v in y.items()}
    return y[idx]


def resolve_model_path(model: str, tracking_uri: str | None = None) -> Path:
    """A model directory, a run directory of ``fit`` (``outputs/<name>/<run>``), a config's output
    directory (``outputs/<name>``: its newest finished run, said at INFO), or an MLflow
    ``runs:/<run_id>`` / run id whose ``model`` artifact is downloaded from ``tracking_uri``
    (default: the store ``fit`` writes, ``sqlite:///mlruns.db``)."""
    from mmclin.persistence.outputs import newest_finished_model, newest_run, read_marker, unfinished_run_message

    p = Path(model)
    if p.is_dir():
        marker = read_marker(p)
        if marker is not None and not (p / "mmclin.json").exists():  # a run directory of fit
            if not (p / "model" / "mmclin.json").exists():
                raise FileNotFoundError(unfinished_run_message(p, marker))
            return p / "model"
        newest = newest_run(p)
        if (p / "mmclin.json").exists() or newest is None:
            return p  # a model directory (FittedModel.load reports what is wrong with anything else)
        found = newest_finished_model(p)
        if found is None:
            raise FileNotFoundError(f"{model!r} holds no finished run with a model; its newest run: "
                                    + unfinished_run_message(*newest))
        log.info("using the newest finished run's model: %s", found)
        return found
    if model.startswith("runs:/") or (len(model) == 32 and all(ch in "0123456789abcdef" for ch in model)):
        from mmclin.persistence.tracking import open_store

        run_id = model[len("runs:/"):].split("/")[0] if model.startswith("runs:/") else model
        uri = open_store(tracking_uri)
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model"))
        except MlflowException as err:
            raise FileNotFoundError(f"model {model!r}: no model of MLflow run {run_id} in {uri!r} "
                                    f"({err.message.splitlines()[0]}); pass --tracking-uri where the run was logged") from None
    raise FileNotFoundError(f"model {model!r} is neither a model directory nor an MLflow run (runs:/<run_id>)")


def format_metrics(metrics: dict[str, float]) -> dict[str, str]:
    return {k: ("nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}") for k, v in metrics.items()}


def log_fitted_model(fitted: Any, model_dir: str | Path, input_example: Any = None) -> None:
    """Log the saved model directory (safetensors + JSON) and an MLflow pyfunc model around it."""
    import mlflow

    mlflow.log_artifacts(str(model_dir), artifact_path="model")
    mlflow.pyfunc.log_model(
        name="pyfunc_model",
        python_model=str(Path(__file__).with_name("pyfunc.py")),  # models from code: nothing pickled
        artifacts={"model_dir": str(model_dir)},
        input_example=input_example,
    )
