"""The bad-input catalogue of issue 17, run as tests: every case of ``benchmarks/bad_inputs_catalogue.py``
(damaged copies of the gse7390 cohort, damaged model directories and checkpoints, hostile configs, read-only
and full disks, locked or foreign MLflow stores, a killed ``predict``, metrics on too few subjects) must get
a *clear* answer: exit status 2 and one error line (or one user-facing error from the API) that holds the
words the case names (file, column, row, key, modality, what was expected), or, where the right answer is a
warning, that warning. ``benchmarks/bad_inputs_catalogue.py`` prints the counts of every outcome."""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bad_inputs_catalogue as catalogue  # noqa: E402

# cases whose fix lies outside this change, with what it needs (a strict xfail: it fails once fixed, so the
# marker is removed then)
PENDING: dict[str, str] = {}  # cases whose fix is still to come: name -> why (strict xfail)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return catalogue.Env(tmp_path_factory.mktemp("catalogue"))


def _params():
    for case in catalogue.CASES:
        marks = [pytest.mark.slow] if case.slow else []
        if case.name in PENDING:
            marks.append(pytest.mark.xfail(reason=PENDING[case.name], strict=True))
        yield pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize("case", _params())
def test_catalogue_case_is_answered_clearly(case, env, tmp_path):
    kind, run = catalogue.run_case(case, env, tmp_path)
    said = run.error or " | ".join(run.warnings) or "(nothing said)"
    assert kind == "clear", f"{case.name}: {kind}: {said} {run.lost or ''}"
    if run.rc is not None and run.error:  # the CLI: exit status 2, the error on its first line
        assert run.rc == 2 and "Traceback" not in run.error
        first, *rest = run.error.splitlines()
        assert first.startswith("mmclin ") and ": error: " in first, first
        assert all(line.startswith("  ") for line in rest), run.error  # more lines: a config error's keys, indented


def test_the_catalogue_holds_at_least_60_cases_of_every_kind_of_the_issue():
    groups = {c.group for c in catalogue.CASES}
    assert len(catalogue.CASES) >= 60 and len({c.name for c in catalogue.CASES}) == len(catalogue.CASES)
    assert groups == {"damaged cohort", "damaged model", "checkpoints", "config", "disk", "metrics"}


def test_the_classification_itself():
    case = catalogue.Case("x", "g", lambda env, tmp: None, ("column 'a'", "row 3"))
    assert catalogue.classify(case, catalogue.Run(2, "mmclin fit: error: column 'a', row 3: bad")) == "clear"
    assert catalogue.classify(case, catalogue.Run(2, "mmclin fit: error: something is wrong")) == "unclear"
    assert catalogue.classify(case, catalogue.Run(1, "column 'a', row 3")) == "unclear"
    assert catalogue.classify(case, catalogue.Run(0)) == "silent"
    assert catalogue.classify(case, catalogue.Run(None, "KeyError: 'a'", crashed=True)) == "crash"
    assert catalogue.classify(case, catalogue.Run(2, "column 'a', row 3", lost=["mine.csv"])) == "loss"


# ----------------------------------------------------------------------- the same, without simulation
def test_a_really_read_only_output_directory(tmp_path, env, capsys):
    """chmod 555, as a user other than root meets it (root writes anyway: then this is skipped, and the
    catalogue's case simulates the refusal of the kernel instead)."""
    from mmclin.interfaces.cli import main

    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: chmod does not make a directory read-only")
        assert main(["predict", str(env.model), "--data", str(env.data), "--output", str(ro / "p.parquet")]) == 2
        err = capsys.readouterr().err
        assert f"cannot write '{ro / 'p.parquet'}': permission denied" in err and "Traceback" not in err
    finally:
        os.chmod(ro, 0o755)


def test_stale_temporaries_are_removed_only_when_their_writer_is_gone(tmp_path):
    """A killed write's temporary (this host, a pid that no longer runs) goes at the next write of that file;
    a live writer's, another host's, a fresh old-style one and the user's own dot-files stay."""
    import subprocess
    import time

    from mmclin.persistence.atomic import _HOST, write_file_atomic

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {
        "dead": f".p.parquet.{_HOST}-{dead.pid}.abc123.tmp.parquet",
        "live": f".p.parquet.{_HOST}-{os.getppid()}.abc123.tmp.parquet",
        "other host": f".p.parquet.elsewhere-{dead.pid}.abc123.tmp.parquet",
        "old style, fresh": ".p.parquet.k2j4h5g6.tmp.parquet",
        "old style, stale": ".p.parquet.a1b2c3d4.tmp.parquet",
        "user's": ".p.parquet.my-notes",
    }
    for name in names.values():
        (tmp_path / name).write_text("x")
    two_hours_ago = time.time() - 7200
    os.utime(tmp_path / names["old style, stale"], (two_hours_ago, two_hours_ago))
    write_file_atomic(tmp_path / "p.parquet", lambda tmp: Path(tmp).write_text("new"))
    left = {p.name for p in tmp_path.iterdir()}
    assert names["dead"] not in left and names["old style, stale"] not in left
    assert {names[k] for k in ("live", "other host", "old style, fresh", "user's")} <= left
    assert (tmp_path / "p.parquet").read_text() == "new"


def test_stale_temporary_directories_of_a_gone_writer_are_removed_by_the_next_write(tmp_path):
    """A directory write killed mid-swap (``explain``'s output, a model) leaves ``.<name>.<host>-<pid>.*.tmp``; the
    next write of that name removes it when its writer is gone, and leaves a live writer's and the user's own."""
    import subprocess

    from mmclin.persistence.atomic import _HOST, atomic_directory

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".ex.{_HOST}-{dead.pid}.k2j4h5g6.tmp"
    swapped_out = tmp_path / f".ex.{_HOST}-{dead.pid}.old.tmp"  # killed between the two renames of a swap
    live = tmp_path / f".ex.{_HOST}-{os.getppid()}.a1b2c3d4.tmp"
    mine = tmp_path / ".ex.backup"
    for d in (stale, swapped_out, live, mine):
        d.mkdir()
        (d / "report.html").write_text("x")
    with atomic_directory(tmp_path / "ex") as tmp:
        (tmp / "report.html").write_text("new")
    assert not stale.exists() and not swapped_out.exists()
    assert live.exists() and mine.exists() and (tmp_path / "ex" / "report.html").read_text() == "new"


def test_a_model_is_saved_again_over_itself_but_never_over_the_users_files(tmp_path):
    import torch

    from mmclin.persistence.atomic import ForeignFilesError
    from mmclin.persistence.model_files import write_model_directory

    net = torch.nn.Linear(2, 1)
    path = write_model_directory(tmp_path / "m", net, "w.safetensors", {"a": 1}, "meta.json", 1)
    write_model_directory(path, net, "w.safetensors", {"a": 2}, "meta.json", 1)  # a model replaces a model
    assert '"a": 2' in (path / "meta.json").read_text()
    (path / "notes.txt").write_text("mine")
    with pytest.raises(ForeignFilesError, match=r"holds files mmclin did not write \(notes\.txt\); nothing was deleted"):
        write_model_directory(path, net, "w.safetensors", {"a": 3}, "meta.json", 1)
    assert (path / "notes.txt").read_text() == "mine" and '"a": 2' in (path / "meta.json").read_text()
    hf = tmp_path / "hf"  # another tool's directory holding a file of the same name
    hf.mkdir()
    (hf / "w.safetensors").write_bytes(b"theirs")
    with pytest.raises(ForeignFilesError):
        write_model_directory(hf, net, "w.safetensors", {"a": 1}, "meta.json", 1)
    assert (hf / "w.safetensors").read_bytes() == b"theirs"


def test_a_failed_run_does_not_stay_marked_running(tmp_path):
    """An empty run directory made by the failed run goes; one with checkpoints stays, marked failed, and
    ``--resume`` still finds it; one this run did not make (a resumed one) is never removed."""
    import json

    from mmclin.persistence.outputs import new_run_directory, read_marker, settled_on_failure, unfinished_run_directory

    empty = new_run_directory(tmp_path / "c", "fit", "c")
    with pytest.raises(ValueError, match="bad data"), settled_on_failure(empty, made_here=True):
        (empty / "checkpoints").mkdir()
        (empty / "checkpoints" / "store.json").write_text(json.dumps({"fingerprint": "x"}))
        raise ValueError("bad data")
    assert not empty.exists()
    kept = new_run_directory(tmp_path / "c", "fit", "c")
    with pytest.raises(KeyboardInterrupt), settled_on_failure(kept, made_here=True):
        (kept / "checkpoints" / "member0").mkdir(parents=True)
        (kept / "checkpoints" / "member0" / "last.ckpt").write_bytes(b"epoch 3")
        raise KeyboardInterrupt
    assert read_marker(kept)["status"] == "interrupted" and unfinished_run_directory(tmp_path / "c") == kept
    resumed = new_run_directory(tmp_path / "d", "fit", "c")
    with pytest.raises(ValueError), settled_on_failure(resumed, made_here=False):
        raise ValueError("damaged index")
    assert read_marker(resumed)["status"] == "failed"


def test_validation_carve_out_sizes_are_said_or_refused(caplog):
    from mmclin.training.splits import validation_size

    assert validation_size(100, 0.2) == 20 and validation_size(100, 0.0) == 0
    with caplog.at_level("WARNING", logger="mmclin"):
        assert validation_size(6, 0.2, say=True) == 0  # 1 validation row: trained without one, said
    assert "trainer.val_fraction 0.2 of 6 training rows gives 1 validation row(s)" in caplog.text
    with pytest.raises(ValueError, match=r"trainer.val_fraction 0.5 .* of 3 training rows leaves 1 training row\(s\) "
                                         r"and 2 validation row\(s\)"):
        validation_size(3, 0.5)


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "the file system is read-only")])
def test_a_refused_write_names_the_target_and_leaves_nothing(tmp_path, code, words):
    from mmclin.persistence.atomic import WriteError, atomic_directory, write_file_atomic

    def refuse(tmp):
        Path(tmp).write_text("half")
        raise OSError(code, os.strerror(code))

    with pytest.raises(WriteError, match=f"cannot write '{tmp_path / 'p.csv'}': {words}"):
        write_file_atomic(tmp_path / "p.csv", refuse)
    with pytest.raises(WriteError, match=f"cannot write '{tmp_path / 'model'}': {words}"):
        with atomic_directory(tmp_path / "model") as tmp:
            refuse(tmp / "w")
    assert list(tmp_path.iterdir()) == []  # neither a half-written file nor a temporary one


def test_an_error_reading_another_file_inside_a_write_is_not_called_a_refused_write(tmp_path):
    from mmclin.persistence.atomic import write_file_atomic

    def read_elsewhere(tmp):
        raise PermissionError(errno.EACCES, "Permission denied", "/etc/some-secret")

    with pytest.raises(PermissionError, match="some-secret"):
        write_file_atomic(tmp_path / "p.csv", read_elsewhere)


# ----------------------------------------------------------------------- metrics and their support
def test_reported_metrics_record_why_a_metric_is_undefined():
    from mmclin.registry import TASKS
    from mmclin.tasks.base import MIN_EVENTS, UndefinedMetricWarning

    task = TASKS.create("cox").fit_targets(np.array([(True, 1.0), (False, 2.0)], dtype=[("e", bool), ("t", float)]))
    y = np.array([(i % 4 == 0, float(i + 1)) for i in range(20)], dtype=[("e", bool), ("t", float)])  # 5 events
    with pytest.warns(UndefinedMetricWarning, match=f"5 event\\(s\\) among 20 subject\\(s\\); survival metrics need "
                                                    f"at least {MIN_EVENTS} events"):
        out = task.reported_metrics(y, np.linspace(1, 0, 20)[:, None])
    assert all(np.isnan(v) for v in out.values()) and set(out.undefined) == set(out)
    raw = task.metrics(y, np.linspace(1, 0, 20)[:, None])  # the raw metric is still there for who asks for it
    assert np.isfinite(raw["c_index"])


def test_multiclass_thin_class_and_multitask_reasons():
    from mmclin.registry import TASKS

    task = TASKS.create("multiclass").fit_targets(["a", "b", "c"] * 10)
    y = np.array(["a"] * 12 + ["b"] * 12 + ["c"] * 2)
    rng = np.random.default_rng(0)
    with pytest.warns(UserWarning, match="auroc, auprc undefined .*class 'c' \\(2 subject\\(s\\) in it, 24 not\\)"):
        out = task.reported_metrics(y, rng.normal(size=(26, 3)))
    assert np.isnan(out["auroc"]) and np.isfinite(out["accuracy"]) and "class 'c'" in out.undefined["auroc"]
    regression = TASKS.create("regression").fit_targets(np.arange(20.0))
    with pytest.warns(UserWarning, match="mae, rmse, r2 undefined .*4 subject\\(s\\) scored"):
        assert np.isnan(regression.reported_metrics(np.arange(4.0), np.zeros((4, 1)))["r2"])


def test_survival_function_says_when_it_extrapolates_also_for_models_saved_before():
    from mmclin.registry import TASKS
    from mmclin.tasks.base import ExtrapolationWarning

    rng = np.random.default_rng(0)
    y = np.array([(bool(e), t) for e, t in zip(rng.random(60) < 0.7, rng.uniform(1, 50, 60))],
                 dtype=[("e", bool), ("t", float)])
    last = float(y["t"].max())
    for name in ("cox", "discrete_time"):
        task = TASKS.create(name).fit_targets(y)
        outputs = rng.normal(size=(3, task.output_dim))
        if name == "cox":
            task.calibrate(rng.normal(size=(60, 1)), y)
        with pytest.warns(ExtrapolationWarning, match=f"after the training follow-up .*window is \\[0, {last:g}\\]\\)"
                                                      ": it extrapolates"):
            task.survival_function(outputs, [10.0, last * 3])
        with pytest.warns(ExtrapolationWarning, match="1 negative time\\(s\\) \\(the first -1\\)"):
            task.survival_function(outputs, [-1.0, 10.0])
        state = task.state_dict()
        state.pop("follow_up")  # a model saved before the follow-up was recorded
        old = TASKS.create(name)
        old.load_state_dict(state)
        with pytest.warns(ExtrapolationWarning, match="it extrapolates"):
            old.survival_function(outputs, [last * 100])
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            task.survival_function(outputs, [1.0, last / 2])  # inside the window: not a word


def test_baseline_folds_with_too_few_events_are_undefined_for_every_model():
    from mmclin.evaluation.baselines import BaselinePredictions, compare, fold_support

    y = np.array([(i < 12 if i < 40 else i == 40, float(i + 1)) for i in range(50)], dtype=[("e", bool), ("t", float)])
    splits = [(np.arange(10, 50), np.arange(0, 25)), (np.arange(0, 25), np.arange(25, 50))]
    assert fold_support("survival", y[splits[0][1]]) is None
    assert "1 event(s) among 25 subject(s)" in fold_support("survival", y[splits[1][1]])
    preds = [-y["t"][te] for _, te in splits]
    with pytest.warns(UserWarning, match="c_index undefined .*fold\\(s\\) 2: 1 event"):
        result = compare("survival", "c_index", y, splits, preds, BaselinePredictions({"cox": preds}, ["a"], [], {}))
    values = result.folds.filter(result.folds["fold"] == 1)["value"].to_list()
    assert all(np.isnan(v) for v in values) and np.isfinite(result.folds["value"][0])
