"""Run output directories: every run writes into a new directory of its own, which proves that mmclin made it.

Layout (``mmclin fit``; the studies' refit too)::

    outputs/<config name>/<YYYYmmdd-HHMMSS>[-N]/
        mmclin-run.json          the ownership marker: verb, config name, MLflow run id, status
        model/                   the saved model (when the run finished)
        test_predictions.parquet
        checkpoints/             while the run is in progress (``mmclin fit --resume`` continues it)

A second fit never replaces the first one's model, as a second MLflow run never replaces the
first's artifacts; two fits started at the same second get two directories (exclusive ``mkdir``).
Everything a fit writes is inside the run directory it made. (Other verbs still write beside the run
directories, under ``outputs/<name>/``: the missing-modality plot, ``pretrained/`` and the study's ``study/``.)
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from mmclin.persistence.atomic import check_writable_parent, refused_write, write_json_atomic

RUN_MARKER = "mmclin-run.json"
# what a run directory holds before anything of value is written: its marker and the index of its checkpoints
_EMPTY_RUN = {RUN_MARKER, "checkpoints/store.json"}
log = logging.getLogger("mmclin")


def new_run_directory(parent: str | Path, verb: str, config_name: str) -> Path:
    """A fresh ``parent/<timestamp>[-N]`` directory with its ownership marker (status ``running``)."""
    parent = Path(parent)
    check_writable_parent(parent / "run", "output directory")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for k in range(1, 10_000):
        directory = parent / (stamp if k == 1 else f"{stamp}-{k}")
        try:
            parent.mkdir(parents=True, exist_ok=True)
            directory.mkdir()  # exclusive: a concurrent run with the same stamp takes the next name
        except FileExistsError:
            continue
        except OSError as err:
            refused = refused_write(err, parent)
            if refused is None:
                raise
            raise refused from None
        write_json_atomic(directory / RUN_MARKER, {
            "verb": verb, "config": config_name, "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "host": socket.gethostname(), "pid": os.getpid(), "mlflow_run_id": None})
        return directory
    raise RuntimeError(f"could not create a new run directory under {str(parent)!r}")  # pragma: no cover


@contextlib.contextmanager
def settled_on_failure(directory: str | Path, made_here: bool) -> Iterator[None]:
    """A run that fails (an error in the data found while training, a diverged loss, Ctrl-C) does not leave its
    directory saying ``running``: one that this run made (``made_here``) and that holds nothing but its marker (and an
    empty checkpoint index) is removed, as nothing in it can be resumed; otherwise its marker says ``failed`` (an
    error) or ``interrupted``, and its checkpoints stay for ``mmclin fit --resume``."""
    directory = Path(directory)
    try:
        yield
    except BaseException as err:
        with contextlib.suppress(OSError, ValueError):
            files = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if not p.is_dir()}
            if made_here and files <= _EMPTY_RUN:
                shutil.rmtree(directory)
                log.info("removed the run directory %s: the run failed before anything was saved", directory)
            else:
                update_marker(directory, status="failed" if isinstance(err, Exception) else "interrupted")
        raise


def read_marker(directory: str | Path) -> dict[str, Any] | None:
    """The marker of a run directory mmclin made, or None when ``directory`` is not one."""
    path = Path(directory) / RUN_MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and "status" in marker else None


def update_marker(directory: str | Path, **fields: Any) -> None:
    marker = read_marker(directory)
    if marker is None:
        raise ValueError(f"{str(directory)!r} is not a run directory of mmclin (no {RUN_MARKER})")
    write_json_atomic(Path(directory) / RUN_MARKER, {**marker, **fields})


def _runs(parent: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """mmclin's run directories under ``parent`` with their markers, oldest first (names sort by time)."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    found = [(d, read_marker(d)) for d in parent.iterdir() if d.is_dir()]
    return sorted(((d, m) for d, m in found if m is not None), key=lambda pair: _order(pair[0]))


def run_directories(parent: str | Path) -> list[Path]:
    """mmclin's run directories under ``parent``, oldest first."""
    return [d for d, _ in _runs(parent)]


def _order(directory: Path) -> tuple[str, int]:
    """``<date>-<time>`` then the counter ``-N`` of runs started in the same second."""
    date, _, rest = directory.name.partition("-")
    clock, _, k = rest.partition("-")
    return f"{date}{clock}", int(k) if k.isdigit() else 1


def unfinished_run_directory(parent: str | Path) -> Path | None:
    """The newest run directory whose run did not finish and left checkpoints (what ``--resume`` continues)."""
    for directory, marker in reversed(_runs(parent)):
        if marker.get("status") != "finished" and (directory / "checkpoints").is_dir():
            return directory
    return None


def unfinished_run_message(directory: str | Path, marker: dict[str, Any]) -> str:
    """Why the run directory ``directory`` holds no model, and what to do: continue it, or use a finished run."""
    directory = Path(directory)
    status = marker.get("status", "running")
    how = {"running": "it is still running, or was killed before its model was saved",
           "failed": "it failed before its model was saved",
           "interrupted": "it was interrupted before its model was saved"}.get(status, f"its status is {status!r}")
    resumable = (directory / "checkpoints").is_dir()
    config = f" (the YAML file of config {marker['config']!r})" if marker.get("config") else ""
    fix = f"continue it with `mmclin fit CONFIG --resume`{config}" if resumable else "fit it again"
    newest = newest_finished_model(directory.parent)
    other = f", or predict with the newest finished run: {str(newest)!r}" if newest else ""
    return f"run directory {str(directory)!r} holds no model: its fit did not finish ({how}); {fix}{other}"


def newest_run(parent: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest of mmclin's run directories under ``parent``, with its marker."""
    runs = _runs(parent)
    return runs[-1] if runs else None


def newest_finished_model(parent: str | Path) -> Path | None:
    """``<run>/model`` of the newest finished run under ``parent`` (a config's output directory)."""
    for directory, marker in reversed(_runs(parent)):
        if marker.get("status") == "finished" and (directory / "model").is_dir():
            return directory / "model"
    return None
