"""A catalogue of bad inputs, each run against the CLI or the Python API and its outcome classified.

    python benchmarks/bad_inputs_catalogue.py [--only SUBSTRING] [--verbose]
    PYTHONPATH=/tmp/base python benchmarks/bad_inputs_catalogue.py   # the same cases on another checkout

Every case damages something real (a copy of the built-in ``gse7390`` cohort written to parquet or CSV,
a saved model directory, a config, the output disk, the MLflow store) and says which words a clear
answer must hold: the file / column / row / key / modality it is about and what was expected.
Outcomes:

* ``clear``: exit status 2 and one error line (the CLI) or one user-facing error (the API) holding those
  words; for a case whose right answer is a warning (a metric on too few subjects), a warning holding them;
* ``unclear``: an error, but without those words (or another exit status);
* ``silent``: the call succeeded without a word (exit 0 and no warning);
* ``loss``: a file of the user's was deleted or replaced, or a leftover of mmclin's stayed where a later
  run could mistake it;
* ``crash``: a traceback (an error the CLI does not recognise as the user's).

``tests/test_bad_inputs_catalogue.py`` runs every case and asserts it is ``clear``; this script prints
the counts (for the closing note of issue 17) and, with ``--verbose``, each case's message.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest import mock

KINDS = ("clear", "unclear", "silent", "loss", "crash")
FAST = ["--set", "trainer.max_epochs=1", "--set", "trainer.progress_bar=false", "--no-tracking"]


@dataclass
class Run:
    """What one attempt did: the CLI's exit status (None for an API call), the error message, whether it
    was a traceback, the warnings (Python warnings and mmclin's WARNING lines) and what was lost."""

    rc: int | None = None
    error: str = ""
    crashed: bool = False
    warnings: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    value: Any = None
    verdict: str | None = None  # set by a case whose outcome is not read from the message (a leftover file)


@dataclass
class Case:
    name: str
    group: str
    run: Callable[["Env", Path], Run]
    expect: tuple[str, ...]  # regular expressions (case-insensitive) a clear answer holds, all of them
    warn: bool = False  # the right answer is a warning while the call goes on, not an error
    slow: bool = False  # over ~15 s (an MLflow lock timeout, a training run)


def classify(case: Case, run: Run) -> str:
    if run.verdict is not None:
        return run.verdict
    if run.lost:
        return "loss"
    if run.crashed:
        return "crash"
    if run.error:
        text = run.error
    elif run.warnings:
        text = " | ".join(run.warnings)
    else:
        return "silent"
    named = all(re.search(p, text, re.IGNORECASE | re.DOTALL) for p in case.expect)
    if run.error:
        good_exit = run.rc in (None, 2)
        return "clear" if named and good_exit else "unclear"
    return "clear" if named and case.warn else "unclear"


# ----------------------------------------------------------------------------------- running
class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _recorded() -> Iterator[list[str]]:
    """Python warnings and mmclin's WARNING log records of the block, as text."""
    found: list[str] = []
    handler = _Warnings()
    logger = logging.getLogger("mmclin")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
    finally:
        logger.removeHandler(handler)
    found += handler.messages
    found += [str(w.message) for w in caught if not _noise(w)]


def _noise(w: warnings.WarningMessage) -> bool:
    """Third-party chatter that says nothing about the input (deprecations, Lightning's tips)."""
    return issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)) or \
        "lightning" in (w.filename or "") or "does not have many workers" in str(w.message)


def cli(argv: list[str]) -> Run:
    """``mmclin ARGV`` in this process: exit status, the error line(s), the warnings."""
    from mmclin.interfaces.cli import main

    out, err = io.StringIO(), io.StringIO()
    with _recorded() as found, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse
            rc = exit_.code if isinstance(exit_.code, int) else 1
        except Exception as exc:  # noqa: BLE001 - what the CLI let through is a traceback for the user
            return Run(None, f"{type(exc).__name__}: {exc}", crashed=True)
    text = err.getvalue()
    lines = text.splitlines()
    error = ""
    for i, line in enumerate(lines):
        if re.match(r"^mmclin( \w+)?: error: ", line):
            rest = [x for x in lines[i + 1:] if x.startswith("  ")]  # a config error's keys, one per line
            error = "\n".join([line, *rest])
            break
    found += [line[len("WARNING "):] for line in lines if line.startswith("WARNING ")]
    return Run(rc, error or (text.strip() if rc not in (0, None) else ""), crashed="Traceback" in text,
               warnings=list(dict.fromkeys(found)))


def api(fn: Callable[[], Any]) -> Run:
    """``fn()``: its user-facing error (as the CLI would print it) or its warnings and value."""
    from mmclin.interfaces.cli import user_error_message

    with _recorded() as found:
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001
            message = user_error_message(exc)
            return Run(None, message if message is not None else f"{type(exc).__name__}: {exc}",
                       crashed=message is None, warnings=list(found))
    return Run(None, warnings=list(dict.fromkeys(found)), value=value)


def snapshot(paths: list[Path]) -> dict[Path, bytes | None]:
    return {p: (p.read_bytes() if p.is_file() else None) for p in paths}


def lost_since(before: dict[Path, bytes | None]) -> list[str]:
    return [str(p) for p, data in before.items() if data is not None and (not p.is_file() or p.read_bytes() != data)]


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """``directory`` made read-only (chmod 555). Where that does not stop writes (root), creating files and
    directories under it is refused as the kernel would refuse it (EACCES from ``os.open`` / ``os.mkdir``)."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o555)
    patches: list[Any] = []
    if os.access(directory, os.W_OK):
        real_open, real_mkdir, root = os.open, os.mkdir, str(directory.resolve())

        def under(path: Any) -> bool:
            return os.path.abspath(os.fspath(path)).startswith(root)

        def guarded_open(path, flags, *args, **kwargs):
            if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR) and under(path) and not os.path.exists(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
            return real_open(path, flags, *args, **kwargs)

        def guarded_mkdir(path, *args, **kwargs):
            if under(path) and not os.path.exists(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
            return real_mkdir(path, *args, **kwargs)

        patches = [mock.patch("os.open", guarded_open), mock.patch("os.mkdir", guarded_mkdir)]
    try:
        with contextlib.ExitStack() as stack:
            for p in patches:
                stack.enter_context(p)
            yield
    finally:
        os.chmod(directory, 0o755)


def _disk_full(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ------------------------------------------------------------------------------ environment
class Env:
    """Shared inputs: the gse7390 cohort as a parquet file, configs over it, one model fitted from it."""

    def __init__(self, root: Path) -> None:
        import polars as pl

        from mmclin.datasets import load_cohort

        self.root = root
        cohort = load_cohort("gse7390")
        self.frame: pl.DataFrame = cohort.frame
        self.data = root / "gse7390.parquet"
        self.frame.write_parquet(self.data)
        self._model: Path | None = None

    def config(self, where: Path, data: Path | str | None = None, *, extra: str = "", data_extra: str = "",
               model: str = "{task: {name: cox}}", modalities: str | None = None, target: str = "[event, time]",
               id_column: str | None = "patient_id", name: str = "c") -> Path:
        """A config over ``data`` (default: the intact parquet), 1 epoch, no tracking, no checkpoints."""
        mods = modalities or ("    - {name: clinical, kind: tabular, columns: [age, er, grade, size]}\n"
                              "    - {name: genes, kind: genomics, columns: [X200726_at, X200965_s_at, X201068_s_at]}")
        cfg = where / f"{name}.yaml"
        cfg.write_text(f"""name: {name}
data:
  path: {data or self.data}
{f'  id_column: {id_column}' if id_column else ''}
  target: {target}
  modalities:
{mods}
{data_extra}
model: {model}
trainer: {{max_epochs: 1, batch_size: 256, progress_bar: false, checkpoint_every: 0}}
tracking: {{enabled: false}}
output_dir: {where / 'outputs'}
{extra}
""")
        return cfg

    @property
    def model(self) -> Path:
        """A model fitted (once) on the intact cohort."""
        if self._model is None:
            where = self.root / "fitted"
            where.mkdir(exist_ok=True)
            run = cli(["fit", self.config(where)])
            if run.rc != 0:
                raise RuntimeError(f"the reference fit failed: {run.error}")
            self._model = next((where / "outputs" / "c").glob("*/model"))
        return self._model

    def model_copy(self, tmp: Path) -> Path:
        dest = tmp / "model"
        shutil.copytree(self.model, dest)
        return dest

    def predict(self, model: Path | str, tmp: Path, data: Path | str | None = None, *more: str) -> Run:
        return cli(["predict", model, "--data", data or self.data, "--output", tmp / "p.parquet", *more])


# ------------------------------------------------------------------------- damaged cohorts
def _fit(env: Env, tmp: Path, data: Path, **config: Any) -> Run:
    before = snapshot([data])
    run = cli(["fit", env.config(tmp, data, **config)])
    run.lost = lost_since(before)
    return run


def _damaged(write: Callable[[Env, Path], Path], **config: Any) -> Callable[[Env, Path], Run]:
    return lambda env, tmp: _fit(env, tmp, write(env, tmp), **config)


def _empty_parquet(env, tmp):
    (tmp / "c.parquet").write_bytes(b"")
    return tmp / "c.parquet"


def _truncated_parquet(env, tmp):
    data = env.data.read_bytes()
    (tmp / "c.parquet").write_bytes(data[: len(data) // 2])
    return tmp / "c.parquet"


def _no_rows_parquet(env, tmp):
    env.frame.head(0).write_parquet(tmp / "c.parquet")
    return tmp / "c.parquet"


def _csv(env, tmp, edit=None, separator=",", name="c.csv"):
    frame = env.frame if edit is None else edit(env.frame)
    frame.write_csv(tmp / name, separator=separator)
    return tmp / name


def _latin1_csv(env, tmp):
    text = _csv(env, tmp).read_text().replace("poorly differentiated", "peu différencié", 3)
    (tmp / "c.csv").write_bytes(text.encode("latin-1"))
    return tmp / "c.csv"


def _with_cell(column: str, row: int, value: Any):
    import polars as pl

    return lambda f: f.with_columns(f[column].cast(pl.String).scatter(row, value))


def _na_time_csv(env, tmp):
    return _csv(env, tmp, _with_cell("time", 5, "NA"))


def _parquet_named_csv(env, tmp):
    shutil.copy(env.data, tmp / "c.csv")
    return tmp / "c.csv"


def _ragged_csv(env, tmp):
    lines = _csv(env, tmp).read_text().splitlines()
    lines[4] += ",9,9"
    (tmp / "c.csv").write_text("\n".join(lines) + "\n")
    return tmp / "c.csv"


def _duplicated_header(env, tmp):
    head, _, body = _csv(env, tmp).read_text().partition("\n")
    (tmp / "c.csv").write_text(head.replace(",size,", ",age,") + "\n" + body)
    return tmp / "c.csv"


def _empty_csv(env, tmp):
    (tmp / "c.csv").write_text("")
    return tmp / "c.csv"


def _parquet(env, tmp, edit):
    edit(env.frame).write_parquet(tmp / "c.parquet")
    return tmp / "c.parquet"


def _one_row(env, tmp):
    return _parquet(env, tmp, lambda f: f.head(1))


def _eight_rows(env, tmp):
    return _parquet(env, tmp, lambda f: f.head(8))


def _event_two(env, tmp):
    import polars as pl

    return _parquet(env, tmp, lambda f: f.with_columns(f["event"].cast(pl.Int64).scatter(9, 2)))


def _all_censored(env, tmp):
    import polars as pl

    return _parquet(env, tmp, lambda f: f.with_columns(pl.lit(False).alias("event")))


def _id_named_risk(env, tmp):
    return _parquet(env, tmp, lambda f: f.rename({"patient_id": "risk"}))


def _fit_file_case(name, write, expect, **config):
    return Case(name, "damaged cohort", _damaged(write, **config), expect)


def _before_training(run_case: Callable[[Env, Path], Run]) -> Callable[[Env, Path], Run]:
    """An error that should come before anything is trained: one that comes after a run started is unclear
    (the model was trained, then lost)."""
    def run(env: Env, tmp: Path) -> Run:
        result = run_case(env, tmp)
        started = list((tmp / "outputs").glob("*/*/mmclin-run.json"))
        if result.error and started:
            result.verdict = "unclear"
            result.error += " (after a run had started: the model was trained, then lost)"
        return result
    return run


def _mixed_ids(env: Env, tmp: Path) -> Run:
    """A pandas frame whose id column holds both numbers and text (pandas keeps it as object)."""
    from mmclin import MultimodalSurvivalModel
    from mmclin.datasets import load_cohort

    c = load_cohort("gse7390")
    df = c.frame.to_pandas()
    df["patient_id"] = [i if i % 2 else f"P{i:04d}" for i in range(len(df))]
    model = MultimodalSurvivalModel(modalities=c.modalities[:1], id_column="patient_id", max_epochs=1)
    return api(lambda: model.fit(df, c.y))


def _mixed_numbers(env: Env, tmp: Path) -> Run:
    """A pandas frame whose number column holds one text cell (an object column)."""
    from mmclin import MultimodalSurvivalModel
    from mmclin.datasets import load_cohort

    c = load_cohort("gse7390")
    df = c.frame.to_pandas()
    df["age"] = df["age"].astype(object)
    df.loc[3, "age"] = "unknown"
    model = MultimodalSurvivalModel(modalities=c.modalities[:1], max_epochs=1)
    return api(lambda: model.fit(df, c.y))


def _utf16_csv(env, tmp):
    text = _csv(env, tmp).read_text()
    (tmp / "c.csv").write_bytes(text.encode("utf-16"))  # what a spreadsheet's "Unicode text" export writes
    return tmp / "c.csv"


def _null_id(env, tmp):
    return _parquet(env, tmp, lambda f: f.with_columns(f["patient_id"].scatter(4, None)))


def _time_as_text(env, tmp):
    import polars as pl

    return _parquet(env, tmp, lambda f: f.with_columns(f["time"].cast(pl.String)))


def _estimator(fit: Callable[[Any, Any], Any]) -> Callable[[Env, Path], Run]:
    """``fit(cohort, MultimodalSurvivalModel)`` through the Python API, on the gse7390 cohort."""
    def run(env: Env, tmp: Path) -> Run:
        from mmclin import MultimodalSurvivalModel
        from mmclin.datasets import load_cohort

        return api(lambda: fit(load_cohort("gse7390"), MultimodalSurvivalModel))
    return run


def _duplicated_pandas_columns(c, model):
    df = c.frame.to_pandas()[["patient_id", "age", "er", "grade", "size"]]
    df.columns = ["patient_id", "age", "er", "age", "size"]  # pandas allows it; which 'age' would be read?
    return model(modalities=c.modalities[:1], max_epochs=1).fit(df, c.y)


def _continuous_labels(c, model):
    from mmclin import MultimodalClassifier

    return MultimodalClassifier(modalities=c.modalities[:1], max_epochs=1).fit(c.frame, c.y["t.tdm"] + 0.5)


def _id_read_by_a_modality(c, model):
    from mmclin.cohort import ModalitySpec

    spec = ModalitySpec(name="clinical", kind="tabular", columns=["age", "patient_id"])
    return model(modalities=[spec], id_column="patient_id", max_epochs=1).fit(c.frame, c.y)


def _text_at_predict_time(env, tmp):
    import polars as pl

    data = tmp / "new.parquet"
    env.frame.with_columns(env.frame["age"].cast(pl.String).scatter(2, "old")).write_parquet(data)
    return env.predict(env.model, tmp, data)


COHORT_CASES = [
    _fit_file_case("empty parquet", _empty_parquet, (r"c\.parquet", "parquet", "empty|0 bytes")),
    _fit_file_case("truncated parquet", _truncated_parquet, (r"c\.parquet", "not a readable parquet|truncated|damaged")),
    _fit_file_case("parquet without rows", _no_rows_parquet, (r"c\.parquet", "no rows")),
    _fit_file_case("Latin-1 CSV", _latin1_csv, (r"c\.csv", "UTF-8", r"line \d+", "re-encode|encoding")),
    _fit_file_case("semicolon-separated .csv", lambda e, t: _csv(e, t, separator=";"), (r"c\.csv", "semicolons")),
    _fit_file_case("tab-separated .csv", lambda e, t: _csv(e, t, separator="\t"), (r"c\.csv", "tabs", r"\.tsv")),
    _fit_file_case("pipe-separated .csv", lambda e, t: _csv(e, t, separator="|"), (r"c\.csv", r"'\|'|pipes|separat")),
    _fit_file_case("NA text in the time column", _na_time_csv, (r"c\.csv", "column 'time'", "'NA'", "row 5",
                                                                "data.null_values")),
    _fit_file_case("NA read as missing time", _na_time_csv, ("'time'", "row 5"), data_extra="  null_values: [NA]"),
    _fit_file_case("empty CSV", _empty_csv, (r"c\.csv", "empty")),
    _fit_file_case("parquet bytes in a .csv", _parquet_named_csv, (r"c\.csv", "parquet|UTF-8|not .*text")),
    _fit_file_case("row with extra fields", _ragged_csv, (r"c\.csv", r"(line|row) \d", "field")),
    _fit_file_case("duplicated CSV header", _duplicated_header, (r"c\.csv", "'age' twice")),
    _fit_file_case("group column not in the data", lambda e, t: e.data, ("data.group_column", "'hospital'"),
                   data_extra="  group_column: hospital"),
    Case("id column named like an output column", "damaged cohort", _before_training(_damaged(_id_named_risk,
                                                                                             id_column="risk")),
         ("id column 'risk'", "prediction column|output column", "rename")),
    _fit_file_case("id column not in the data", lambda e, t: e.data, ("'patient_idd'", "patient_id"),
                   id_column="patient_idd"),
    _fit_file_case("1-row cohort", _one_row, (r"c\.parquet|1 row", "1 (row|subject)", "at least")),
    _fit_file_case("event column holds a 2", _event_two, ("'event'", "row 9", "0/1")),
    _fit_file_case("every subject censored", _all_censored, ("no event", "censored")),
    _fit_file_case("target column missing", lambda e, t: e.data, ("'evnt'", "not in the data"), target="[evnt, time]"),
    _fit_file_case("modality column missing", lambda e, t: e.data, ("modality 'clinical'", "'agee'", "did you mean 'age'"),
                   modalities="    - {name: clinical, kind: tabular, columns: [agee, er]}"),
    Case("mixed-type id column (pandas)", "damaged cohort", _mixed_ids, ("'patient_id'", "int", "str", r"row \d")),
    Case("text cell in a number column (pandas)", "damaged cohort", _mixed_numbers, ("'age'", "row 3", "'unknown'")),
    _fit_file_case("UTF-16 CSV", _utf16_csv, (r"c\.csv", "UTF-16", "UTF-8", "iconv")),
    Case("null id at fit time", "damaged cohort", _before_training(_damaged(_null_id)),
         ("id column 'patient_id'", "null", "row 4")),
    _fit_file_case("survival time stored as text (parquet)", _time_as_text, ("'time'", "String", "not numbers")),
    Case("duplicated column names (pandas)", "damaged cohort", _estimator(_duplicated_pandas_columns),
         ("column 'age' twice", "positions 1 and 3")),
    Case("continuous y for a classifier (API)", "damaged cohort", _estimator(_continuous_labels),
         ("continuous", "row 0", "MultimodalRegressor")),
    Case("id column read by a modality (API)", "damaged cohort", _estimator(_id_read_by_a_modality),
         ("modality 'clinical'", "'patient_id'", "id column")),
    Case("text in a number column at predict time", "damaged cohort", _text_at_predict_time,
         ("modality 'clinical'", "column 'age'", "numeric", "row 2", "'old'")),
]


# second pass (issue 17): kinds seen before, inputs not tried before
def _cell(column: str, row: int, value: Any, dtype: Any = None):
    """``frame`` with ``column[row] = value`` (the column cast to ``dtype`` first when given)."""
    def edit(f):
        col = f[column] if dtype is None else f[column].cast(dtype)
        return f.with_columns(col.scatter(row, value))
    return edit


def _predict_edited(edit: Callable[[Any], Any]) -> Callable[[Env, Path], Run]:
    """``mmclin predict`` with the fitted model on an edited copy of the cohort."""
    def run(env: Env, tmp: Path) -> Run:
        data = tmp / "new.parquet"
        edit(env.frame).write_parquet(data)
        before = snapshot([data])
        result = env.predict(env.model, tmp, data)
        result.lost = lost_since(before)
        return result
    return run


def _all_null_column(env, tmp):
    import polars as pl

    return _parquet(env, tmp, lambda f: f.with_columns(pl.lit(None, pl.Float64).alias("size")))


def _event_as_words(env, tmp):
    import polars as pl

    return _csv(env, tmp, lambda f: f.with_columns(pl.when(f["event"]).then(pl.lit("yes")).otherwise(pl.lit("no"))
                                                    .alias("event")))


def _thousands_csv(env, tmp):
    import polars as pl

    return _csv(env, tmp, lambda f: f.with_columns(pl.format("{},250", (pl.col("size") * 1000).cast(pl.Int64) // 1000)
                                                    .alias("size")))


def _decimal_comma_tsv(env, tmp):
    import polars as pl

    frame = env.frame.with_columns(pl.col("age").cast(pl.String).str.replace(r"\.", ","))
    frame.write_csv(tmp / "c.tsv", separator="\t")
    return tmp / "c.tsv"


def _as_duration(f):
    import polars as pl

    return f.with_columns(pl.duration(days=pl.col("time").cast(pl.Int64)).alias("time"))


def _event_one_two(f):
    import polars as pl

    return f.with_columns((pl.col("event").cast(pl.Int64) + 1).alias("event"))


def _time_first_frame(c, model):
    """y as a pandas frame of (time, status), the order of many tables, where (event, time) is expected."""
    import pandas as pd

    event, time = c.y.dtype.names
    y = pd.DataFrame({"time": c.y[time], "status": c.y[event].astype(int)})
    return model(modalities=c.modalities[:1], max_epochs=1).fit(c.frame, y)


def _float_ids_with_nan(c, model):
    """Numeric ids from pandas with one missing id: pandas stores it as NaN in a float column."""
    df = c.frame.to_pandas()
    df["patient_id"] = [float(i) for i in range(len(df))]
    df.loc[5, "patient_id"] = float("nan")
    return model(modalities=c.modalities[:1], id_column="patient_id", max_epochs=1).fit(df, c.y)


def _numpy_x(c, model):
    """What a scikit-learn user tries first: a numpy array of the modality's columns."""
    spec = c.modalities[0]
    X = c.frame.select(spec.columns).to_numpy()
    return model(modalities=[spec], max_epochs=1).fit(X, c.y)


def _plain_survival_array(c, model):
    """Survival targets as a plain (n, 2) array of event and time, not a structured array."""
    import numpy as np

    event, time = c.y.dtype.names
    y = np.column_stack([c.y[event].astype(float), c.y[time]])
    return model(modalities=c.modalities[:1], max_epochs=1).fit(c.frame, y)


def _score_of_three(env: Env, tmp: Path) -> Run:
    from mmclin import MultimodalSurvivalModel
    from mmclin.datasets import load_cohort

    c = load_cohort("gse7390")
    model = MultimodalSurvivalModel(modalities=c.modalities[:1], max_epochs=1).fit(c.frame, c.y)
    return _undefined(api(lambda: {"c_index": model.score(c.frame.head(3), c.y[:3])}), "c_index")


def _no_run_left(run_case: Callable[[Env, Path], Run]) -> Callable[[Env, Path], Run]:
    """An error found while fitting (after the run directory was made) must not leave that directory behind saying
    ``running``: a later ``predict``/``--resume`` would take it for a run in progress or a killed one."""
    def run(env: Env, tmp: Path) -> Run:
        result = run_case(env, tmp)
        left = [str(m.parent) for m in (tmp / "outputs").glob("*/*/mmclin-run.json")
                if json.loads(m.read_text()).get("status") == "running"]
        if result.error and left:
            result.lost.append(f"a run directory still says 'running' after the fit failed: {left}")
        return result
    return run


COHORT_CASES += [  # second pass (issue 17): inputs of the same kinds, not tried before
    _fit_file_case("modality column that is null in every row", _all_null_column,
                   ("modality 'clinical'", "'size'", "no values")),
    _fit_file_case("infinite value at fit time", lambda e, t: _parquet(e, t, _cell("age", 7, float("inf"))),
                   ("modality 'clinical'", "'age'", "row 7", "not finite|inf")),
    _fit_file_case("negative survival time", lambda e, t: _parquet(e, t, _cell("time", 6, -5.0)),
                   ("'time'", "row 6", "> 0", "-5")),
    _fit_file_case("survival time of 0", lambda e, t: _parquet(e, t, _cell("time", 6, 0.0)),
                   ("'time'", "row 6", "> 0", "offset")),
    _fit_file_case("NaN survival time (not null)", lambda e, t: _parquet(e, t, _cell("time", 8, float("nan"))),
                   ("'time'", "row 8", "finite|NaN|missing")),
    _fit_file_case("infinite survival time", lambda e, t: _parquet(e, t, _cell("time", 8, float("inf"))),
                   ("'time'", "row 8", "finite")),
    _fit_file_case("event column of yes/no words (CSV)", _event_as_words, ("'event'", "'yes'|'no'", "0/1")),
    _fit_file_case("NaN in a float event column", lambda e, t: _parquet(e, t, _cell("event", 9, float("nan"),
                                                                                  __import__("polars").Float64)),
                   ("'event'", "row 9", "0/1|NaN|missing")),
    _fit_file_case("survival target columns swapped", lambda e, t: e.data,
                   ("data.target", "'event'", "the event first", "swap"), target="[time, event]"),
    Case("fit failing on its data mid-way leaves no run directory", "damaged cohort", _no_run_left(
        _damaged(lambda e, t: _parquet(e, t, _cell("X200726_at", 4, float("inf"))))),
         ("modality 'genes'", "'X200726_at'", "row 4", "not finite")),
    _fit_file_case("numbers with thousands separators (CSV)", _thousands_csv,
                   (r"c\.csv", "column 'size'", "with a comma", r"row 0", "decimal point")),
    _fit_file_case("decimal commas (TSV)", _decimal_comma_tsv, (r"c\.tsv", "column 'age'", "with a comma", "'57,0'")),
    _fit_file_case("survival time as a duration", lambda e, t: _parquet(e, t, _as_duration),
                   ("'time'", "durations", "total_days")),
    _fit_file_case("event coded 1/2 as in R's survival", lambda e, t: _parquet(e, t, _event_one_two),
                   ("'event'", "0/1", "1 or 2", "event == 2")),
    _fit_file_case("regression target too large to standardise", lambda e, t: _parquet(e, t, _cell("size", 4, 1e300)),
                   ("regression target", "row 4", "1e\\+300", "too large"), model="{task: {name: regression}}",
                   target="[size]", modalities="    - {name: clinical, kind: tabular, columns: [age, grade, er]}"),
    Case("survival y frame with the time first (API)", "damaged cohort", _estimator(_time_first_frame),
         ("the event first", "swap")),
    Case("float ids with a NaN (pandas, API)", "damaged cohort", _estimator(_float_ids_with_nan),
         ("id column 'patient_id'", "row 5", "NaN|null|missing")),
    Case("numpy array as X (API)", "damaged cohort", _estimator(_numpy_x),
         ("ndarray", r"shape \(198, 4\)", "by name", "DataFrame")),
    Case("survival y as a plain 2-column array (API)", "damaged cohort", _estimator(_plain_survival_array),
         ("survival y", "plain array", "event", "time", "Surv")),
    Case("-inf at predict time", "damaged cohort", _predict_edited(_cell("age", 3, float("-inf"))),
         ("modality 'clinical'", "'age'", "row 3", "not finite|inf")),
    Case("category seen only at predict time", "damaged cohort",
         _predict_edited(_cell("grade", 2, "undifferentiated")),
         ("modality 'clinical'", "column 'grade'", "1 row", "not seen in training"), warn=True),
    Case("predict data lacking a modality's column", "damaged cohort", _predict_edited(lambda f: f.drop("grade")),
         ("modality 'clinical'", "'grade'")),
    Case("predict data without rows", "damaged cohort", _predict_edited(lambda f: f.head(0)),
         (r"new\.parquet", "no rows")),
    Case("numbers stored as text at predict time", "damaged cohort",
         _predict_edited(lambda f: f.with_columns(f["age"].cast(__import__("polars").String))),
         ("modality 'clinical'", "column 'age'", "numeric", "String")),
]


# ----------------------------------------------------------------------- damaged model dirs
def _damaged_model(edit: Callable[[Path], None]) -> Callable[[Env, Path], Run]:
    def run(env: Env, tmp: Path) -> Run:
        model = env.model_copy(tmp)
        edit(model)
        result = env.predict(model, tmp)
        if (tmp / "p.parquet").exists() and result.rc != 0:
            result.lost.append("a predictions file was written although predict failed")
        return result
    return run


def _flip(name: str, at: int = -5, manifest: bool = True):
    def edit(model: Path) -> None:
        data = bytearray((model / name).read_bytes())
        data[at] ^= 0xFF
        (model / name).write_bytes(bytes(data))
        if not manifest:
            (model / "manifest.json").unlink()
    return edit


def _edit_json(change: Callable[[dict], None], manifest: bool = True):
    def edit(model: Path) -> None:
        meta = json.loads((model / "mmclin.json").read_text())
        change(meta)
        (model / "mmclin.json").write_text(json.dumps(meta))
        if not manifest:
            (model / "manifest.json").unlink()
    return edit


def _shift_mean(meta: dict) -> None:
    state = meta["featurizers"]["clinical"]
    key = next(k for k, v in state.items() if isinstance(v, list) and v and isinstance(v[0], (int, float)))
    state[key] = [v + 30.0 for v in state[key]]


def _truncate(name: str, manifest: bool = False):
    def edit(model: Path) -> None:
        data = (model / name).read_bytes()
        (model / name).write_bytes(data[: len(data) // 2])
        if not manifest:
            (model / "manifest.json").unlink()
    return edit


def _model_case(name, edit, expect, warn=False):
    return Case(name, "damaged model", _damaged_model(edit), expect, warn=warn)


def _drop_key(key):
    return lambda meta: meta.pop(key)


MODEL_CASES = [
    _model_case("flipped bytes in model.safetensors", _flip("model.safetensors"),
                ("model.safetensors", "SHA-256", "manifest.json")),
    _model_case("edited mmclin.json (a mean shifted)", _edit_json(_shift_mean), ("mmclin.json", "SHA-256")),
    _model_case("model.safetensors missing", lambda m: (m / "model.safetensors").unlink(), ("model.safetensors", "missing")),
    _model_case("mmclin.json missing", lambda m: (m / "mmclin.json").unlink(), ("mmclin.json", "model")),
    _model_case("manifest.json not JSON", lambda m: (m / "manifest.json").write_text("{"), ("manifest.json", "damaged")),
    _model_case("manifest.json dropped", lambda m: (m / "manifest.json").unlink(), ("manifest.json", "cannot be checked"),
                warn=True),
    _model_case("truncated weights, no manifest", _truncate("model.safetensors"),
                ("model.safetensors", "not a readable safetensors")),
    _model_case("mmclin.json without its featurizers, no manifest", _edit_json(_drop_key("featurizers"), manifest=False),
                ("mmclin.json", "'featurizers'", "damaged|missing|lacks")),
    _model_case("mmclin.json of another format version, no manifest",
                _edit_json(lambda meta: meta.update(format_version=99), manifest=False), ("format 99", "expected 1")),
    _model_case("mmclin.json not JSON, no manifest", lambda m: ((m / "mmclin.json").write_text("{x"),
                                                                 (m / "manifest.json").unlink()),
                ("mmclin.json", "not valid JSON")),
    _model_case("weights of another shape, no manifest", lambda m: _other_weights(m), ("model.safetensors|weights",
                                                                                        "shape|size|match")),
    _model_case("featurizer state of the wrong type, no manifest",
                _edit_json(lambda meta: meta["featurizers"].update(clinical=3), manifest=False),
                ("mmclin.json", "modality 'clinical'", "damaged")),
    Case("empty model directory", "damaged model", lambda env, tmp: env.predict((tmp / "m").mkdir() or tmp / "m", tmp),
         (r"/m'", "mmclin.json|not a")),
]


def _other_weights(model: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(model / "model.safetensors"))
    key = next(k for k, v in weights.items() if v.ndim == 2)
    weights[key] = weights[key][:, :-1].contiguous()
    save_file(weights, str(model / "model.safetensors"))
    (model / "manifest.json").unlink()


def _edit_manifest(model: Path) -> None:
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["sha256"]["mmclin.json"] = "0" * 64
    (model / "manifest.json").write_text(json.dumps(manifest))


def _empty_manifest(model: Path) -> None:
    """A manifest that lists no part: nothing would be checked."""
    (model / "manifest.json").write_text(json.dumps({"sha256": {}}))


def _nan_mean(meta: dict) -> None:
    state = meta["featurizers"]["clinical"]
    state["mean"] = [float("nan")] + list(state["mean"][1:])


def _unfinished_run(tmp: Path) -> Path:
    """A run directory of a fit killed before its model was saved: marker ``running``, checkpoints, no model."""
    run_dir = tmp / "outputs" / "c" / "20000101-000000"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "mmclin-run.json").write_text(json.dumps({"verb": "fit", "config": "c", "status": "running",
                                                          "mlflow_run_id": None}))
    return run_dir


def _explain_truncated_weights(env: Env, tmp: Path) -> Run:
    model = env.model_copy(tmp)
    _truncate("model.safetensors", manifest=True)(model)
    return cli(["explain", model, "--data", env.data, "--output-dir", tmp / "ex", "--no-tracking", "--levels", "modality"])


def _newer_format(model: Path) -> None:
    """A model as a newer mmclin would save it: another format version, its manifest consistent with it."""
    from mmclin.persistence.model_files import write_manifest

    meta = json.loads((model / "mmclin.json").read_text())
    (model / "mmclin.json").write_text(json.dumps({**meta, "format_version": 2}))
    write_manifest(model, ["mmclin.json", "model.safetensors"])


MODEL_CASES += [  # second pass (issue 17): inputs of the same kinds, not tried before
    _model_case("manifest.json with an edited hash", _edit_manifest, ("mmclin.json", "SHA-256", "manifest.json")),
    _model_case("manifest.json that lists no file", _empty_manifest,
                ("manifest.json", "does not list", "model.safetensors")),
    _model_case("model of a newer format version (manifest intact)", _newer_format,
                ("format 2", "expected 1", "newer mmclin", "upgrade")),
    _model_case("model directory holding a file its manifest does not list",
                lambda m: (m / "notes.txt").write_text("mine\n"), (r"notes\.txt", "does not list", "ignored"),
                warn=True),
    _model_case("NaN in a stored mean, no manifest", _edit_json(_nan_mean, manifest=False),
                ("mmclin.json", "modality 'clinical'", "not finite|NaN")),
    Case("predict on the run directory of an unfinished fit", "damaged model",
         lambda env, tmp: env.predict(_unfinished_run(tmp), tmp),
         ("20000101-000000", "did not finish|unfinished", "--resume")),
    Case("predict on a config's output directory with only unfinished runs", "damaged model",
         lambda env, tmp: env.predict(_unfinished_run(tmp).parent, tmp),
         (r"outputs/c'", "no finished run", "20000101-000000", "--resume")),
    Case("explain with truncated weights", "damaged model", _explain_truncated_weights,
         ("model.safetensors", "SHA-256")),
]


# ------------------------------------------------------------------------- checkpoints
def _corrupt_checkpoint_index(env: Env, tmp: Path) -> Run:
    """An interrupted run whose checkpoint index (checkpoints/store.json) is damaged, then ``fit --resume``."""
    cfg = env.config(tmp, extra="")
    cfg.write_text(cfg.read_text().replace("checkpoint_every: 0", "checkpoint_every: 1"))
    run_dir = tmp / "outputs" / "c" / "20000101-000000"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "mmclin-run.json").write_text(json.dumps({"verb": "fit", "config": "c", "status": "running",
                                                          "mlflow_run_id": None}))
    (run_dir / "checkpoints" / "store.json").write_text('{"fingerprint": "ab')
    return cli(["fit", cfg, "--resume"])


def _corrupt_last_checkpoint(env: Env, tmp: Path) -> Run:
    """An interrupted run whose last checkpoint is damaged (fingerprint of the real inputs), then ``--resume``."""
    cfg = env.config(tmp)
    cfg.write_text(cfg.read_text().replace("checkpoint_every: 0", "checkpoint_every: 1"))
    first = cli(["fit", cfg])
    if first.rc != 0:
        return first
    run_dir = next((tmp / "outputs" / "c").glob("*/model")).parent
    from mmclin.config import load_config
    from mmclin.interfaces.experiment import Experiment
    from mmclin.training.core import checkpoint_store
    from mmclin.training.splits import holdout_split

    exp = Experiment(load_config(cfg))
    c, conf = exp.cohort, exp.config
    tr, _ = holdout_split(c.y, "survival", conf.data.test_size, conf.data.split_seed, None)
    store = checkpoint_store(run_dir / "checkpoints", c.frame[tr], c.y[tr], c.modalities, conf.model, conf.trainer,
                             exp.task_config(), resume=False)
    store.member_dir(0).mkdir(parents=True, exist_ok=True)
    (store.member_dir(0) / "last.ckpt").write_bytes(b"PK\x03\x04 not a checkpoint")
    (store.member_dir(0) / "last.json").write_text(json.dumps({"epoch": 0, "history": []}))
    marker = json.loads((run_dir / "mmclin-run.json").read_text())
    (run_dir / "mmclin-run.json").write_text(json.dumps({**marker, "status": "running"}))
    shutil.rmtree(run_dir / "model")
    return cli(["fit", cfg, "--resume"])


CHECKPOINT_CASES = [
    Case("corrupt checkpoint index (store.json)", "checkpoints", _corrupt_checkpoint_index,
         (r"store\.json", "damaged|not valid JSON|cannot be read")),
    Case("corrupt last checkpoint", "checkpoints", _corrupt_last_checkpoint, (r"last\.ckpt", "cannot be read|damaged")),
]


# --------------------------------------------------------------------------- hostile configs
QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "gse7390_survival.yaml"


def _config_case(name: str, expect: tuple[str, ...], *, model: str | None = None, extra: str = "",
                 sets: tuple[str, ...] = (), text: str | None = None, slow: bool = False) -> Case:
    def run(env: Env, tmp: Path) -> Run:
        if text is not None:
            cfg = tmp / "c.yaml"
            cfg.write_text(text)
        else:
            cfg = env.config(tmp, model=model or "{task: {name: cox}}", extra=extra)
        return cli(["fit", cfg, *[x for s in sets for x in ("--set", s)]])
    return Case(name, "config", run, expect, slow=slow)


CONFIG_CASES = [
    _config_case("negative encoder width", ("model.encoders.clinical|modality 'clinical'", "d_model", "-4",
                                            "positive|>= 1|at least 1"),
                 model="{task: {name: cox}, encoders: {clinical: {d_model: -4}}}"),
    _config_case("encoder heads that do not divide the width",
                 ("modality 'clinical'|model.encoders.clinical", "d_model", "n_heads", "divisible"),
                 model="{task: {name: cox}, encoders: {clinical: {d_model: 30, n_heads: 4}}}"),
    _config_case("fusion heads that do not divide the width", ("cascaded_transformer", "d_model", "n_heads", "divisible"),
                 model="{task: {name: cox}, fusion: {name: cascaded_transformer, d_model: 30, n_heads: 4}}"),
    _config_case("negative fusion width", ("fusion", "d_model", "-8"),
                 model="{task: {name: cox}, fusion: {name: concat, d_model: -8}}"),
    _config_case("encoder option of the wrong type", ("modality 'genes'|model.encoders.genes", "d_model", "'wide'"),
                 model="{task: {name: cox}, encoders: {genes: {d_model: wide}}}"),
    _config_case("unknown encoder option", ("modality 'clinical'", "d_modle"),
                 model="{task: {name: cox}, encoders: {clinical: {d_modle: 8}}}"),
    _config_case("unknown task option", ("task 'cox'|model.task", "'tie'", "ties"), model="{task: {name: cox, tie: efron}}"),
    _config_case("bad task option value", ("ties", "'efron' or 'breslow'", "'exact'"),
                 model="{task: {name: cox, ties: exact}}"),
    _config_case("unknown fusion name", ("model.fusion.name", "concatt", "did you mean 'concat'"),
                 model="{task: {name: cox}, fusion: {name: concatt}}"),
    _config_case("encoders for a modality that does not exist", ("model.encoders", "'clinicl'", "did you mean 'clinical'"),
                 model="{task: {name: cox}, encoders: {clinicl: {d_model: 8}}}"),
    _config_case("unknown trainer key", ("trainer.max_epoch", "unknown key"), sets=("trainer.max_epoch=3",)),
    _config_case("unknown top-level key", ("trainr", "unknown key"), extra="trainr: {max_epochs: 2}"),
    _config_case("wrong type: max_epochs: ten", ("trainer.max_epochs", "integer"), sets=("trainer.max_epochs=ten",)),
    _config_case("wrong type: a list for batch_size", ("trainer.batch_size", "integer"), sets=("trainer.batch_size=[1, 2]",)),
    _config_case("negative batch size", ("trainer.batch_size", "greater than or equal to 1"), sets=("trainer.batch_size=-1",)),
    _config_case("test_size above 1", ("data.test_size", "less than 1"), sets=("data.test_size=1.5",)),
    _config_case("unknown device", ("trainer.device", "'tpu'"), sets=("trainer.device=tpu",)),
    _config_case("invalid --set YAML value", ("--set value", "not valid YAML", "quote"), sets=("trainer.learning_rate=[1e-3",)),
    _config_case("--set without =", ("--set expects KEY=VALUE", "trainer.max_epochs"), sets=("trainer.max_epochs",)),
    _config_case("--set into a value", ("--set trainer.max_epochs.x", "'max_epochs' is a value"),
                 sets=("trainer.max_epochs.x=1",)),
    _config_case("duplicated YAML key", (r"c\.yaml", "key 'max_epochs' appears twice", r"lines \d+ and \d+"),
                 text="name: a\ndata: {cohort: gse7390}\ntrainer:\n  max_epochs: 3\n  max_epochs: 30\n"),
    _config_case("config not a mapping", ("must be a mapping",), text="- a\n- b\n"),
    _config_case("YAML tab indentation", (r"c\.yaml", "not valid YAML", r"line 3", "spaces, not tabs"), text="name: a\ndata:\n\tcohort: gse7390\n"),
    _config_case("name '..'", ("'name'", "not '.' or '..'"), sets=("name=..",)),
    _config_case("data.path and data.cohort both given", ("exactly one of 'data.cohort'",), sets=("data.cohort=gse7390",)),
    Case("config file missing", "config", lambda env, tmp: cli(["fit", tmp / "nothere.yaml"]), (r"nothere\.yaml", "does not exist")),
    Case("config file not UTF-8", "config", lambda env, tmp: _config_bytes(tmp, b"name: caf\xe9\ndata: {cohort: gse7390}\n"),
         (r"c\.yaml", "not valid UTF-8", "E9", "line 1")),
    _config_case("empty config file", (r"c\.yaml", "empty"), text="# nothing yet\n"),
    _config_case("binary task on a survival target", ("data.target", "binary", "one label column", "cox"),
                 model="{task: {name: binary}}"),
    Case("target column read by a modality", "config", lambda env, tmp: cli(["fit", env.config(
        tmp, modalities="    - {name: clinical, kind: tabular, columns: [age, time]}")]),
         ("modality 'clinical'", "'time'", "target column")),
    Case("id column read by a modality", "config", lambda env, tmp: cli(["fit", env.config(
        tmp, modalities="    - {name: clinical, kind: tabular, columns: [age, patient_id]}")]),
         ("modality 'clinical'", "'patient_id'", "id column")),
    Case("estimator parameter out of range (API)", "config", _estimator(
        lambda c, model: model(modalities=c.modalities[:1], max_epochs=-1).fit(c.frame, c.y)),
         ("The 'max_epochs' parameter of MultimodalSurvivalModel", "greater than or equal to 1", "Got -1")),
    Case("negative encoder width (API)", "config", _estimator(
        lambda c, model: model(modalities=c.modalities[:1], encoder_options={"clinical": {"d_model": -3}},
                               max_epochs=1).fit(c.frame, c.y)),
         ("'encoder_options' parameter", r"clinical\.d_model", ">= 1", "-3")),
    Case("unknown modality kind (API)", "config", _estimator(
        lambda c, model: model(modalities=[{"name": "clinical", "kind": "tabluar", "columns": ["age"]}],
                               max_epochs=1).fit(c.frame, c.y)),
         (r"modalities\[0\] \('clinical'\)", "kind", "'tabluar'")),
    Case("explain --n-steps 0", "config", lambda env, tmp: _explain(env, tmp, "--n-steps", "0"),
         ("--n-steps", ">= 1", "'0'")),
    Case("explain --top 0", "config", lambda env, tmp: _explain(env, tmp, "--top", "0"), ("--top", ">= 1", "'0'")),
    Case("explain --id-column with a typo", "config", lambda env, tmp: _explain(env, tmp, "--id-column", "patient_idd"),
         ("--id-column 'patient_idd'", "not in the data", "did you mean 'patient_id'")),
    Case("explain --patients naming no patient", "config", lambda env, tmp: _explain(env, tmp, "--patients", ",,"),
         ("--patients", "no patient", "',,'")),
    _config_case("negative data.split_seed", ("data.split_seed", "greater than or equal to 0"), sets=("data.split_seed=-1",)),
    Case("tune.space bound NaN", "config", lambda env, tmp: cli(["tune", env.config(tmp, extra=(
        "tune: {space: {trainer.learning_rate: {type: float, low: .nan, high: 0.1}}, n_trials: 1, cv: null}"))]),
         (r"tune\.space\.trainer\.learning_rate\.low", "finite")),
    Case("data.root with no modality that reads files", "config", lambda env, tmp: cli(["fit", env.config(
        tmp, data_extra="  root: /nonexistent/images")]), ("data.root", "/nonexistent/images", "ignored", "image"),
         warn=True),
]


def _evaluate(env: Env, tmp: Path, *more: str, **config: Any) -> Run:
    return cli(["evaluate", env.config(tmp, **config), *more])


def _tune_space(space: str) -> Callable[[Env, Path], Run]:
    return lambda env, tmp: cli(["tune", env.config(tmp, extra=f"tune: {{space: {{{space}}}, n_trials: 1, cv: null}}"),
                                 "--no-refit"])


CONFIG_CASES += [  # second pass (issue 17): inputs of the same kinds, not tried before
    _config_case("trainer.val_fraction that leaves 1 training row", ("trainer.val_fraction", "0.99",
                                                                      r"\d+ training row", r"\d+ validation row"),
                 sets=("trainer.val_fraction=0.99",)),
    Case("trainer.val_fraction that leaves 1 validation row", "config", lambda env, tmp: cli(["fit", env.config(
        tmp), "--set", "trainer.val_fraction=0.005"]), ("trainer.val_fraction", "0.005", r"\d+ validation row"),
         warn=True),
    Case("modality name with a '.'", "config", lambda env, tmp: cli(["fit", env.config(
        tmp, modalities="    - {name: clin.ical, kind: tabular, columns: [age, er, grade, size]}")]),
         ("data.modalities.0.name", "'clin.ical'", "may not contain '.'", "'clin_ical'")),
    Case("modality name with a '+'", "config", _estimator(lambda c, model: model(
        modalities=[{"name": "clin+ical", "kind": "tabular", "columns": ["age", "er"]}], max_epochs=1).fit(c.frame, c.y)),
         (r"modalities\[0\]", "'clin\\+ical'", "may not contain '\\+'")),
    _config_case("batch size 1 for a Cox model", ("trainer.batch_size 1", "cox", "at least 2"),
                 sets=("trainer.batch_size=1",)),
    _config_case("unknown fusion option", ("model.fusion", "fusion head 'concat'", "'d_modle'", "did you mean 'd_model'"),
                 model="{task: {name: cox}, fusion: {name: concat, d_modle: 8}}"),
    Case("unknown key in a modality", "config", lambda env, tmp: cli(["fit", env.config(
        tmp, modalities="    - {name: clinical, kind: tabular, colums: [age, er]}")]),
         ("data.modalities.0.colums", "unknown key", "did you mean 'columns'")),
    Case("tune.space key that is not a config key", "config", _tune_space(
        "trainer.learnin_rate: {type: float, low: 0.0001, high: 0.1}"),
         ("tune.space", "trainer.learnin_rate", "did you mean 'learning_rate'")),
    Case("tune.space key of a fusion option for another head", "config", _tune_space(
        "model.fusion.n_headz: {type: int, low: 1, high: 4}"), ("tune.space", "model.fusion", "unknown option 'n_headz'")),
    Case("evaluate --cv larger than the number of subjects", "config",
         lambda env, tmp: _evaluate(env, tmp, "--cv", "500"), ("198 row", "500-fold|--cv")),
    Case("data.path is a directory", "config", lambda env, tmp: cli(["fit", env.config(tmp, tmp)]),
         ("data file", "is a directory")),
    Case("data.path of an unknown file type", "config", lambda env, tmp: cli(["fit", env.config(
        tmp, (tmp / "c.xlsx").write_bytes(b"PK") and tmp / "c.xlsx")]), (r"c\.xlsx", "parquet", "csv")),
]


def _config_bytes(tmp: Path, data: bytes) -> Run:
    (tmp / "c.yaml").write_bytes(data)
    return cli(["fit", tmp / "c.yaml"])


def _explain(env: Env, tmp: Path, *more: str) -> Run:
    return cli(["explain", env.model, "--data", env.data, "--output-dir", tmp / "ex", "--no-tracking", "--levels",
                "modality", *more])


# ------------------------------------------------------------------------- disks and stores
def _predict_into_read_only(env: Env, tmp: Path) -> Run:
    model = env.model
    with read_only(tmp / "ro"):
        return cli(["predict", model, "--data", env.data, "--output", tmp / "ro" / "p.parquet"])


def _fit_into_read_only(env: Env, tmp: Path) -> Run:
    cfg = env.config(tmp)
    with read_only(tmp / "ro"):
        return cli(["fit", cfg, "--output-dir", tmp / "ro"])


def _predict_disk_full(env: Env, tmp: Path) -> Run:
    import polars as pl

    model = env.model
    with mock.patch.object(pl.DataFrame, "write_parquet", _disk_full):
        run = env.predict(model, tmp)
    if list(tmp.glob(".p.parquet*")) or (tmp / "p.parquet").exists():
        run.lost.append("a partial predictions file was left behind")
    return run


def _fit_disk_full(env: Env, tmp: Path) -> Run:
    cfg = env.config(tmp)
    with mock.patch("safetensors.torch.save_file", _disk_full):
        run = cli(["fit", cfg])
    if list((tmp / "outputs" / "c").glob("*/.model*")) or list((tmp / "outputs" / "c").glob("*/model")):
        run.lost.append("a partial model directory was left behind")
    return run


def _mlflow_store(uri_of: Callable[[Path], str], slow: bool = False) -> Callable[[Env, Path], Run]:
    def run(env: Env, tmp: Path) -> Run:
        cfg = env.config(tmp)
        return cli(["fit", cfg, "--set", "tracking.enabled=true", "--set", f"tracking.uri={uri_of(tmp)}",
                    "--set", "tracking.log_model=false"])
    return run


def _store_in_read_only_dir(tmp: Path) -> str:
    (tmp / "ro").mkdir()
    return f"sqlite:///{tmp / 'ro' / 'sub' / 'mlruns.db'}"


def _store_not_a_database(tmp: Path) -> str:
    (tmp / "mlruns.db").write_text("these are my notes, not a database\n" * 50)
    return f"sqlite:///{tmp / 'mlruns.db'}"


def _locked_store(env: Env, tmp: Path) -> Run:
    import sqlite3

    import mlflow

    db = tmp / "mlruns.db"
    mlflow.MlflowClient(f"sqlite:///{db}").search_experiments()  # a valid store ...
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # ... held by another writer
    try:
        return _mlflow_store(lambda t: f"sqlite:///{db}")(env, tmp)
    finally:
        holder.close()


def _unreadable_store_of_a_read_only_dir(env: Env, tmp: Path) -> Run:
    uri = _store_in_read_only_dir(tmp)
    with read_only(tmp / "ro"):
        return _mlflow_store(lambda t: uri)(env, tmp)


_KILLED_PREDICT = """
import os, signal, sys
sys.argv = ["mmclin", "predict", {model!r}, "--data", {data!r}, "--output", {out!r}]
os.replace = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # killed between writing and renaming
from mmclin.interfaces.cli import main
main(sys.argv[1:])
"""


def _leftover_of_killed_predict(env: Env, tmp: Path) -> Run:
    """``predict`` killed (SIGKILL) after writing its temporary file, then ``predict`` again to the same name."""
    model, out = env.model, tmp / "p.parquet"
    code = _KILLED_PREDICT.format(model=str(model), data=str(env.data), out=str(out))
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                   capture_output=True, timeout=600)
    leftovers = [p.name for p in tmp.iterdir() if p.name.startswith(".p.parquet")]
    if not leftovers:
        return Run(0, "", warnings=["(the killed predict left nothing behind)"])
    run = env.predict(model, tmp)
    stale = [p.name for p in tmp.iterdir() if p.name.startswith(".p.parquet")]
    if stale:  # still there, beside the output, without a word
        run.warnings.append(f"(temporary file(s) of the killed predict still beside the output: {stale})")
        run.verdict = "silent" if run.rc == 0 else None
    elif run.rc == 0:
        run.verdict = "clear"
    return run


def _output_parent_is_a_file(env: Env, tmp: Path) -> Run:
    (tmp / "notes.txt").write_text("mine\n")
    before = snapshot([tmp / "notes.txt"])
    run = cli(["predict", env.model, "--data", env.data, "--output", tmp / "notes.txt" / "p.parquet"])
    run.lost = lost_since(before)
    return run


def _output_is_data(env: Env, tmp: Path) -> Run:
    data = tmp / "mine.parquet"
    shutil.copy(env.data, data)
    before = snapshot([data])
    run = cli(["predict", env.model, "--data", data, "--output", data, "--overwrite"])
    run.lost = lost_since(before)
    return run


def _name_dot_over_user_files(env: Env, tmp: Path) -> Run:
    """A config named "." would make the output directory the run's own: the user's files there must stay."""
    out = tmp / "mine"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "notes.txt").write_text("mine\n")
    (out / "model").mkdir()
    (out / "model" / "weights.bin").write_bytes(b"mine")
    before = snapshot([out / "checkpoints" / "notes.txt", out / "model" / "weights.bin"])
    run = cli(["fit", env.config(tmp), "--set", "name=.", "--output-dir", out])
    run.lost = lost_since(before)
    return run


def _predict_over_a_user_file(env: Env, tmp: Path) -> Run:
    mine = tmp / "mine.csv"
    mine.write_text("my,own\n1,2\n")
    before = snapshot([mine])
    run = cli(["predict", env.model, "--data", env.data, "--output", mine])
    run.lost = lost_since(before)
    return run


DISK_CASES = [
    Case("config name '.' over the user's files", "disk", _name_dot_over_user_files, ("'name'", "not '.' or '..'")),
    Case("predict --output an existing file of the user's", "disk", _predict_over_a_user_file,
         (r"mine\.csv", "already exists", "--overwrite")),
    Case("predict into a read-only directory", "disk", _predict_into_read_only,
         ("permission denied|not writable|read-only", r"/ro", "--output|write")),
    Case("fit into a read-only directory", "disk", _fit_into_read_only,
         ("permission denied|not writable|read-only", r"/ro", "--output-dir|write")),
    Case("predict on a full disk", "disk", _predict_disk_full, ("disk is full|no space left", r"p\.parquet")),
    Case("fit on a full disk (saving the model)", "disk", _fit_disk_full, ("disk is full|no space left", "model")),
    Case("MLflow store in a read-only directory", "disk", _unreadable_store_of_a_read_only_dir,
         ("MLflow", r"mlruns\.db", "--no-tracking|tracking.uri|--tracking-uri")),
    Case("MLflow store that is not a database", "disk", _mlflow_store(_store_not_a_database),
         ("MLflow", r"mlruns\.db", "not a database|cannot")),
    Case("MLflow store locked by another writer", "disk", _locked_store,
         ("MLflow", r"mlruns\.db", "locked"), slow=True),
    Case("leftover temporary file of a killed predict", "disk", _leftover_of_killed_predict, (), slow=True),
    Case("predict --output under a file", "disk", _output_parent_is_a_file, (r"notes\.txt", "not a directory")),
    Case("predict --output is --data, with --overwrite", "disk", _output_is_data, ("is the --data file",)),
]


def _predict_into_a_directory(env: Env, tmp: Path) -> Run:
    (tmp / "preds").mkdir()
    return cli(["predict", env.model, "--data", env.data, "--output", tmp / "preds"])


def _predict_csv_disk_full(env: Env, tmp: Path) -> Run:
    import polars as pl

    model = env.model
    with mock.patch.object(pl.DataFrame, "write_csv", _disk_full):
        run = cli(["predict", model, "--data", env.data, "--output", tmp / "p.csv"])
    if list(tmp.glob(".p.csv*")) or (tmp / "p.csv").exists():
        run.lost.append("a partial predictions file was left behind")
    return run


def _fit_predictions_disk_full(env: Env, tmp: Path) -> Run:
    """The disk fills up after the model is saved, while the test predictions are written."""
    import polars as pl

    cfg = env.config(tmp)
    with mock.patch.object(pl.DataFrame, "write_parquet", _disk_full):
        run = cli(["fit", cfg])
    runs = list((tmp / "outputs" / "c").glob("*"))
    if any((d / ".test_predictions.parquet").exists() or list(d.glob(".test_predictions*")) for d in runs):
        run.lost.append("a partial test predictions file was left behind")
    return run


_KILLED_EXPLAIN = """
import os, signal, sys
sys.argv = ["mmclin", "explain", {model!r}, "--data", {data!r}, "--output-dir", {out!r}, "--no-tracking",
            "--levels", "modality"]
os.replace = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # killed between writing and renaming
from mmclin.interfaces.cli import main
main(sys.argv[1:])
"""


def _leftover_of_killed_explain(env: Env, tmp: Path) -> Run:
    """``explain`` killed (SIGKILL) while swapping its finished output directory in, then ``explain`` again into the
    same directory: the half-swapped temporary directory (``.ex.*`` beside ``ex``) must not stay."""
    model, out = env.model, tmp / "ex"
    code = _KILLED_EXPLAIN.format(model=str(model), data=str(env.data), out=str(out))
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                   capture_output=True, timeout=600)
    if not list(tmp.glob(".ex.*")):
        return Run(0, "", warnings=["(the killed explain left nothing behind)"])
    run = _explain(env, tmp)  # the same --output-dir
    stale = [p.name for p in tmp.glob(".ex.*")]
    if stale:
        run.warnings.append(f"(temporary directory of the killed explain still beside the output: {stale})")
        run.verdict = "silent" if run.rc == 0 else None
    elif run.rc == 0:
        run.verdict = "clear"
    return run


def _over_users_file(where: Callable[[Path], Path], act: Callable[[Env, Path, Path], Run]) -> Callable[[Env, Path], Run]:
    """``act(env, tmp, target)`` where ``target`` is a file of the user's (``where(tmp)`` is a file) or a directory
    holding one: that file must stay as it was."""
    def run(env: Env, tmp: Path) -> Run:
        target = where(tmp)
        mine = target if target.suffix else target / "notes.txt"
        mine.parent.mkdir(parents=True, exist_ok=True)
        mine.write_text("mine\n")
        before = snapshot([mine])
        result = act(env, tmp, target)
        result.lost = lost_since(before)
        return result
    return run


def _save_estimator(env: Env, tmp: Path, target: Path) -> Run:
    from mmclin import MultimodalSurvivalModel
    from mmclin.datasets import load_cohort

    c = load_cohort("gse7390")
    model = MultimodalSurvivalModel(modalities=c.modalities[:1], max_epochs=1).fit(c.frame, c.y)
    return api(lambda: model.save(str(target)))


def _save_fitted(env: Env, tmp: Path, target: Path) -> Run:
    from mmclin.training.core import FittedModel

    fitted = FittedModel.load(env.model)
    return api(lambda: fitted.save(target))


DISK_CASES += [  # second pass (issue 17): inputs of the same kinds, not tried before
    Case("pretrain --output a directory of the user's", "disk", _over_users_file(
        lambda tmp: tmp / "mine", lambda env, tmp, mine: cli(["pretrain", env.config(tmp), "--output", mine, "--set",
                                                              "pretrain.max_epochs=1"])),
         (r"mine", "did not write", r"notes\.txt")),
    Case("estimator save() into a directory of the user's (API)", "disk",
         _over_users_file(lambda tmp: tmp / "mine", _save_estimator), (r"mine", "did not write", r"notes\.txt")),
    Case("model saved over a file of the user's (API)", "disk",
         _over_users_file(lambda tmp: tmp / "notes.txt", _save_fitted), (r"notes\.txt", "not a directory")),
    Case("predict --output an existing directory", "disk", _predict_into_a_directory,
         (r"preds'", "directory", "\\.parquet|\\.csv")),
    Case("predict to CSV on a full disk", "disk", _predict_csv_disk_full, ("disk is full|no space left", r"p\.csv")),
    Case("fit --output-dir a file of the user's", "disk", _over_users_file(
        lambda tmp: tmp / "notes.txt", lambda env, tmp, mine: cli(["fit", env.config(tmp), "--output-dir", mine])),
         (r"notes\.txt", "not a directory")),
    Case("fit on a full disk (writing the test predictions)", "disk", _fit_predictions_disk_full,
         ("disk is full|no space left", "test_predictions")),
    Case("leftover temporary file of a killed explain", "disk", _leftover_of_killed_explain, (), slow=True),
]


# --------------------------------------------------------------------- metrics and support
def _reported(task):
    """How mmclin reports a task's metrics (``reported_metrics`` where it exists, else the raw ``metrics``)."""
    return getattr(task, "reported_metrics", task.metrics)


def _cox_metrics(y_test, risk, y_train=None):
    from mmclin.tasks.survival import CoxTask

    task = CoxTask()
    return _reported(task)(y_test, risk.reshape(-1, 1), y_train=y_train)


def _surv(event, time):
    import numpy as np

    from mmclin.tasks.survival import SURVIVAL_DTYPE

    out = np.empty(len(event), dtype=SURVIVAL_DTYPE)
    out["event"], out["time"] = event, time
    return out


def _undefined(result: Run, *names: str) -> Run:
    """A metric reported as a number where the case says it is undefined is a silent answer, whatever is said."""
    import math

    value = result.value if isinstance(result.value, dict) else {}
    reported = {n: value.get(n) for n in names if value.get(n) is not None and not math.isnan(value[n])}
    if not result.error and reported:
        result.warnings.append(f"(reported as numbers: {reported})")
        result.verdict = "silent"
    return result


def _c_index_of_two_events(env: Env, tmp: Path) -> Run:
    import numpy as np

    y = _surv([True, False, False, True, False, False, False, False], np.arange(1.0, 9.0))
    return _undefined(api(lambda: _cox_metrics(y, np.linspace(1, 0, 8), y_train=y)), "c_index")


def _auroc_of_one_positive(env: Env, tmp: Path) -> Run:
    import numpy as np

    from mmclin.tasks.classification import BinaryTask

    task = BinaryTask().fit_targets(np.array([0, 1] * 20))
    y = np.array([1] + [0] * 29)
    return _undefined(api(lambda: _reported(task)(y, np.linspace(2, -2, 30).reshape(-1, 1))), "auroc")


def _regression_of_three(env: Env, tmp: Path) -> Run:
    import numpy as np

    from mmclin.tasks.regression import RegressionTask

    task = RegressionTask().fit_targets(np.arange(20.0))
    return _undefined(api(lambda: _reported(task)(np.array([1.0, 2.0, 3.0]), np.array([[0.1], [0.2], [0.4]]))), "r2")


def _test_beyond_follow_up(env: Env, tmp: Path) -> Run:
    import numpy as np

    rng = np.random.default_rng(0)
    train = _surv(rng.random(100) < 0.6, rng.uniform(1, 100, 100))
    test = _surv(rng.random(60) < 0.6, rng.uniform(150, 300, 60))
    return api(lambda: _cox_metrics(test, rng.normal(size=60), y_train=train))


def _survival_function_at(times_of: Callable[[float], list[float]]) -> Callable[[Env, Path], Run]:
    def run(env: Env, tmp: Path) -> Run:
        from mmclin.datasets import load_cohort
        from mmclin.training.core import FittedModel

        fitted = FittedModel.load(env.model)
        frame = load_cohort("gse7390").frame.head(5)
        outputs = fitted.predict_outputs(frame)
        last = float(env.frame["time"].max())
        return api(lambda: fitted.task.survival_function(outputs, times_of(last)))
    return run


def _tiny_cohort_fit(env: Env, tmp: Path) -> Run:
    return _fit(env, tmp, _parquet(env, tmp, lambda f: f.head(12)))


def _score_of_other_length(env: Env, tmp: Path) -> Run:
    from mmclin import MultimodalSurvivalModel
    from mmclin.datasets import load_cohort

    c = load_cohort("gse7390")
    return api(lambda: MultimodalSurvivalModel(modalities=c.modalities[:1], max_epochs=1).fit(c.frame, c.y)
               .score(c.frame, c.y[:10]))


METRIC_CASES = [
    Case("score with y of another length (API)", "metrics", _score_of_other_length, ("X has 198 rows", "y has 10")),
    Case("survival function at a NaN time", "metrics", _survival_function_at(lambda last: [100.0, float("nan")]),
         ("not finite", "nan", "position 1")),
    Case("c-index from 2 events", "metrics", _c_index_of_two_events, ("c_index", "2 event", "10"), warn=True),
    Case("AUROC with 1 positive subject", "metrics", _auroc_of_one_positive, ("auroc", "1 subject", "5"), warn=True),
    Case("R^2 of 3 subjects", "metrics", _regression_of_three, ("r2|metrics", "3 subject", "10"), warn=True),
    Case("test times beyond the training follow-up", "metrics", _test_beyond_follow_up,
         ("beyond|after", "follow-up", r"\d+ (test )?subject"), warn=True),
    Case("survival function at negative times", "metrics", _survival_function_at(lambda last: [-10.0, 100.0]),
         ("negative", "-10"), warn=True),
    Case("survival function far beyond follow-up", "metrics", _survival_function_at(lambda last: [100.0, last * 10]),
         ("extrapolat", "follow-up"), warn=True),
    Case("fit on a 12-subject cohort (3 test subjects)", "metrics", _tiny_cohort_fit,
         ("c_index|undefined", r"\d event|\d subject"), warn=True),
]

def _evaluate_too_few_events_per_fold(env: Env, tmp: Path) -> Run:
    """--cv 10 on 60 subjects with 25 events: each test fold holds 2 or 3 events, too few for a C-index."""
    import polars as pl

    data = _parquet(env, tmp, lambda f: pl.concat([f.filter(pl.col("event")).head(25),
                                                    f.filter(~pl.col("event")).head(35)]))
    return _evaluate(env, tmp, "--cv", "10", data=data)


METRIC_CASES += [  # second pass (issue 17): inputs of the same kinds, not tried before
    Case("score() on 3 subjects (API)", "metrics", _score_of_three, ("c_index", "3 subject"), warn=True),
    Case("evaluate --cv with too few events per fold", "metrics", _evaluate_too_few_events_per_fold,
         ("--cv 10", "10 of 10 test folds", "c_index", r"\d event\(s\)", "use --cv 2 or fewer"), warn=True,
         slow=True),
]

CASES: list[Case] = COHORT_CASES + MODEL_CASES + CHECKPOINT_CASES + CONFIG_CASES + DISK_CASES + METRIC_CASES


def run_case(case: Case, env: Env, tmp: Path) -> tuple[str, Run]:
    cwd = os.getcwd()
    os.chdir(tmp)  # relative defaults (mlruns.db, outputs/) stay in the case's directory
    try:
        result = case.run(env, tmp)
    finally:
        os.chdir(cwd)
    return classify(case, result), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the cases whose name holds this text")
    parser.add_argument("--verbose", action="store_true", help="print each case's message")
    args = parser.parse_args(argv)
    import mmclin

    print(f"mmclin from {Path(mmclin.__file__).parent}")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    counts = dict.fromkeys(KINDS, 0)
    by_group: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="mmclin-catalogue-") as root:
        env = Env(Path(root))
        for i, case in enumerate(c for c in CASES if not args.only or args.only in c.name):
            tmp = Path(root) / f"case{i}"
            tmp.mkdir()
            start = time.perf_counter()
            kind, result = run_case(case, env, tmp)
            counts[kind] += 1
            by_group.setdefault(case.group, dict.fromkeys(KINDS, 0))[kind] += 1
            shown = result.error or " | ".join(result.warnings) or "(nothing said)"
            line = f"{kind:8s} {case.group:15s} {case.name}"
            print(line + (f"  [{time.perf_counter() - start:.0f} s]\n         {shown[:400]}" if args.verbose else ""))
            if result.lost and args.verbose:
                print(f"         lost: {result.lost}")
    total = sum(counts.values())
    print(f"\n{total} cases: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print("| group | " + " | ".join(KINDS) + " |\n|---|" + "---|" * len(KINDS))
    for group, c in by_group.items():
        print(f"| {group} | " + " | ".join(str(c[k]) for k in KINDS) + " |")
    print("| all | " + " | ".join(str(counts[k]) for k in KINDS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
