"""Progress of training that says where a long job is: ``fold 3/5 · member 2/5 · epoch 12/60``.

Lightning's own bar counts batches within an epoch from 0 ("Epoch 39/59", "1/1 0.00it/s" when an
epoch is one batch, as for the Cox loss over a whole cohort); here the unit is the epoch, numbered
from 1, with the context of the job around it. On a terminal it is one live line per member; in a
log (not a TTY) it is one line per finished member.
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import lightning.pytorch as L


class EpochProgress(L.Callback):
    """``label``: where this fit sits in the job (e.g. ``"fold 3/5 · member 2/5"``)."""

    def __init__(self, label: str, max_epochs: int, stream: TextIO | None = None) -> None:
        self.label = label
        self.max_epochs = max_epochs
        self.stream = stream or sys.stderr
        self._bar: Any = None
        self._start = 0.0
        self._last: dict[str, float] = {}
        self._shown = 0

    def _live(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        self._start = time.perf_counter()
        self._shown = len(getattr(module, "history", []))  # a resumed member's earlier epochs count as done
        if self._live():
            from tqdm.auto import tqdm

            # the rate is per epoch; tqdm's "it/s" over sub-second epochs reads as noise, the elapsed time does not
            self._bar = tqdm(total=self.max_epochs, initial=trainer.current_epoch, desc=self.label, unit="epoch",
                             file=self.stream, leave=False, dynamic_ncols=True,
                             bar_format="{desc} · epoch {n_fmt}/{total_fmt} |{bar:20}| {elapsed}{postfix}")

    def _catch_up(self, module: L.LightningModule) -> None:
        # the module appends an epoch's losses to its history in its own on_train_epoch_end, which Lightning
        # calls after the callbacks' one: each epoch is shown once the next begins, or training ends
        history = getattr(module, "history", [])
        while self._shown < len(history):
            entry = history[self._shown]
            self._last = {k: float(entry[k]) for k in ("train_loss", "val_loss") if k in entry}
            self._shown += 1
            if self._bar is not None:
                self._bar.set_postfix_str(" ".join(f"{k} {v:.3f}" for k, v in self._last.items()), refresh=False)
                self._bar.update(1)

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.global_rank == 0:
            self._catch_up(module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        self._catch_up(module)
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        epochs = trainer.current_epoch
        stopped = " (early stop)" if trainer.should_stop and epochs < self.max_epochs else ""
        keeper = next((cb for cb in trainer.callbacks if hasattr(cb, "best_epoch")), None)  # BestWeights
        best = -1 if keeper is None else keeper.best_epoch
        parts = [f"{self.label}: {epochs}/{self.max_epochs} epochs{stopped}"]
        if best >= 0:
            parts.append(f"best epoch {best + 1}")
        elif keeper is not None and keeper.state is not None:  # kept before any epoch: the linear path's start
            parts.append("best epoch 0 (the linear path alone: no epoch improved on it)")
        parts += [f"{k} {v:.3f}" for k, v in self._last.items()]
        parts.append(f"{time.perf_counter() - self._start:.1f} s")
        print(", ".join(parts), file=self.stream, flush=True)
