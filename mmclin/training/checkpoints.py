"""Resumable training: a Lightning checkpoint per ensemble member, replaced atomically at each
epoch end, and each finished member's weights, under one directory tied to the run's inputs.

Layout (``<output>/checkpoints`` for ``mmclin fit``)::

    store.json                   fingerprint of config + data, MLflow run id
    member0/final.safetensors    a finished member (weights) + final.json (history, best epoch)
    member1/last.ckpt            the member in progress, at its last finished epoch + last.json

Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain containers only.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint

from mmclin.persistence.atomic import write_file_atomic, write_json_atomic
from mmclin.persistence.weights import read_weights, save_weights

log = logging.getLogger("mmclin")

LAST, LAST_META, FINAL, FINAL_META, STORE = "last.ckpt", "last.json", "final.safetensors", "final.json", "store.json"


def training_fingerprint(frame: Any, y: Any, parts: dict[str, Any]) -> str:
    """SHA-256 of the training rows, the targets and the settings that shape training (``parts``, JSON)."""
    from mmclin.persistence.tracking import frame_fingerprint

    h = hashlib.sha256(frame_fingerprint(frame).encode())
    for key in sorted(y) if isinstance(y, dict) else [None]:
        arr = np.asarray(y[key] if key is not None else y)
        # object arrays (text labels) hold pointers: hash their values, which are the same in every process
        data = "\x1f".join(map(repr, arr.tolist())).encode() if arr.dtype == object else arr.tobytes()
        h.update(str(arr.dtype).encode() + data)
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return h.hexdigest()


class CheckpointStore:
    """Where the members of one training run keep their progress; see the module docstring.

    ``read_only``: the view of a DDP rank > 0 resuming with rank 0, which alone writes and removes.
    """

    def __init__(self, root: str | Path, fingerprint: str, read_only: bool = False) -> None:
        self.root, self.fingerprint, self.read_only = Path(root), fingerprint, read_only

    def prepare(self, resume: bool) -> None:
        """``resume``: keep what an interrupted run of the same inputs left (refuse a different run's);
        otherwise start clean, removing any earlier checkpoints (said, at WARNING)."""
        store = self.root / STORE
        if self.read_only and not resume:
            raise ValueError("a read-only checkpoint store can only resume")
        if resume and store.exists():
            found = _read_store(store).get("fingerprint")
            if found != self.fingerprint:
                raise ValueError(
                    f"--resume: the checkpoints in {str(self.root)!r} were written by a run with a different config or "
                    "different data, so resuming would not give the uninterrupted run's result; run without --resume to "
                    "start over in a new run directory, or restore the original config and data")
            if self.read_only:
                return
            stale = [p for p in self.root.rglob(".*") if p.is_file()]
            for p in stale:  # temporary files of a write that was killed midway
                p.unlink()
            done = list(self.root.glob(f"member*/{FINAL}"))
            log.info("resuming from %s: %d member(s) finished%s", self.root, len(done),
                     f", {len(stale)} unfinished temporary file(s) removed" if stale else "")
            return
        if self.read_only:
            return
        if resume:
            log.warning("--resume: no checkpoints in %s; training from the start", self.root)
        elif self.root.exists() and any(self.root.iterdir()):
            log.warning("removing checkpoints of an earlier, unfinished run in %s (pass --resume to continue it instead)",
                        self.root)
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        write_json_atomic(store, {"fingerprint": self.fingerprint})

    @property
    def run_id(self) -> str | None:
        store = self.root / STORE
        return _read_store(store).get("mlflow_run_id") if store.exists() else None

    @run_id.setter
    def run_id(self, value: str) -> None:
        if self.read_only:
            return
        write_json_atomic(self.root / STORE, {"fingerprint": self.fingerprint, "mlflow_run_id": value})

    def member_dir(self, k: int) -> Path:
        return self.root / f"member{k}"

    def last_checkpoint(self, k: int) -> Path | None:
        path = self.member_dir(k) / LAST
        return path if path.exists() else None

    def save_finished(self, k: int, net: torch.nn.Module, history: list[dict[str, float]], best_epoch: int) -> None:
        if self.read_only:
            return
        d = self.member_dir(k)
        d.mkdir(parents=True, exist_ok=True)
        write_file_atomic(d / FINAL, lambda tmp: save_weights(net, tmp))
        write_json_atomic(d / FINAL_META, {"history": history, "best_epoch": best_epoch})
        # last.ckpt stays until clear(): a DDP rank > 0 may still be about to read it (final.* wins when both exist)

    def load_finished(self, k: int, net: torch.nn.Module) -> tuple[list[dict[str, float]], int] | None:
        """Load member ``k``'s finished weights into ``net``; ``(history, best_epoch)``, or None when not finished."""
        d = self.member_dir(k)
        if not (d / FINAL).exists() or not (d / FINAL_META).exists():
            return None
        net.load_state_dict(read_weights(d / FINAL))
        meta = json.loads((d / FINAL_META).read_text())
        return meta["history"], int(meta["best_epoch"])

    def clear(self) -> None:
        if not self.read_only:
            shutil.rmtree(self.root, ignore_errors=True)


def read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused or a damaged file
        raise ValueError(f"checkpoint {str(path)!r} cannot be read safely ({type(err).__name__}: {err}); "
                         "remove the checkpoints directory and train from the start") from None


class EpochCheckpoint(Checkpoint):
    """Replace ``last.ckpt`` atomically at the end of every ``every``-th epoch (and at the last one).

    A :class:`~lightning.pytorch.callbacks.Checkpoint`, so Lightning runs it after early stopping
    has decided whether this epoch is the last.
    """

    def __init__(self, directory: Path, every: int = 1) -> None:
        self.directory, self.every = Path(directory), every

    @staticmethod
    def _is_final(trainer: Any) -> bool:
        """This epoch ends the run (early stopping or max_epochs): resuming from it must not train another."""
        max_epochs = trainer.max_epochs
        return bool(trainer.should_stop or (max_epochs is not None and 0 < max_epochs <= trainer.current_epoch + 1))

    def on_save_checkpoint(self, trainer: Any, module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint["mmclin_stopped"] = self._is_final(trainer)

    def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
        if (trainer.current_epoch + 1) % self.every and not self._is_final(trainer):
            return
        if not trainer.is_global_zero:  # every rank joins the save; only rank 0 writes
            trainer.save_checkpoint(self.directory / LAST, weights_only=False)
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        write_file_atomic(self.directory / LAST, lambda tmp: trainer.save_checkpoint(tmp, weights_only=False))
        write_json_atomic(self.directory / LAST_META, {"epoch": trainer.current_epoch, "history": module.history})


def _read_store(store: Path) -> dict[str, Any]:
    try:
        found = json.loads(store.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"checkpoint index {str(store)!r} is damaged ({err}); move the checkpoint directory "
                         f"{str(store.parent)!r} away to train from the start") from None
    if not isinstance(found, dict):
        raise ValueError(f"checkpoint index {str(store)!r} is damaged (not a JSON object); move the checkpoint "
                         f"directory {str(store.parent)!r} away to train from the start")
    return found
