"""The LightningModule: step logic and logging only; network and task are injected."""
from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl_
import numpy as np
import torch
from torch import Tensor

from mmclin.batch import ModalityBatch
from mmclin.tasks.base import Task
from mmclin.training.dropout import modality_dropout
from mmclin.training.linear_path import step_offsets
from mmclin.training.model import MultimodalNet


def network_generators(net: torch.nn.Module) -> dict[str, torch.Generator]:
    """Every ``torch.Generator`` held as an attribute by a submodule, by ``module path.attribute``."""
    found = {}
    for path, module in net.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, torch.Generator):
                found[f"{path}.{attr}" if path else attr] = value
    return found


class TrainingDiverged(ValueError):
    """The training loss became non-finite: nothing learnt after that point would be a model."""


class MultimodalModule(pl_.LightningModule):
    # Lightning sets `_current_fx_name` on the module before every hook (a dozen times a step); nn.Module's
    # __setattr__ checks parameters, buffers and submodules each time, which is a tenth of a small model's step
    _PLAIN_ATTRIBUTES = frozenset({"_current_fx_name"})

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._PLAIN_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def __init__(self, net: MultimodalNet, task: Task, learning_rate: float = 1e-3, weight_decay: float = 1e-4,
                 modality_dropout: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        self.net = net
        self.task = task
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.modality_dropout = modality_dropout
        self.seed = seed
        self.dropout_rng = torch.Generator().manual_seed(seed)
        # generators inside the network (e.g. the symile head's negative sampling): seeded per member, and
        # their states travel in checkpoints with the others, so every head resumes exactly
        self.net_generators = network_generators(net)
        for k, (_, gen) in enumerate(sorted(self.net_generators.items())):
            gen.manual_seed(int(np.random.SeedSequence([seed, k]).generate_state(1)[0]))
        self._rng_states: dict[str, Tensor] | None = None  # after the last training batch; see on_train_batch_start
        self.history: list[dict[str, float]] = []
        self._train_loss_sum: Tensor | None = None
        self._train_batches = 0
        self.epoch_sink = None  # callable(metrics, epoch), e.g. MLflow logging
        # One optimizer, no closure to re-run: stepping by hand skips Lightning's closure machinery, a large
        # share of a small model's step on CPU (benchmarks/peers). Precision plugins still scale the loss.
        self.automatic_optimization = False

    def forward(self, batch: ModalityBatch) -> Tensor:
        return self.net(batch.inputs, batch.present)[0]

    def _loss(self, batch: ModalityBatch, present: dict[str, Tensor]) -> Tensor:
        outputs, fused = self.net(batch.inputs, present)
        loss = self.task.loss(outputs.float(), batch.target)
        if fused.aux_loss is not None:
            loss = loss + fused.aux_loss
        # sequential heads (sequential_modular, ...) also train the decoders on intermediate states
        step_loss = getattr(self.net.fusion, "step_loss", None)
        if step_loss is not None and fused.per_step is not None:
            offsets = None
            if self.net.linear is not None:  # each step decodes to what the final output has: + the linear terms so far
                offsets = step_offsets(self.net.linear, batch.inputs, present, self.net.fusion.step_names())
            extra = step_loss(fused, present, self.net.head, self.task, batch.target, offsets)
            if extra is not None:
                loss = loss + extra
        return loss

    def training_step(self, batch: ModalityBatch, batch_idx: int) -> Tensor:
        present = modality_dropout(batch.present, self.modality_dropout, self.dropout_rng)
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        loss = self._loss(batch, present)
        self.manual_backward(loss)
        optimizer.step()
        # accumulate on device; one host sync per epoch rather than per step
        detached = loss.detach()
        self._train_loss_sum = detached if self._train_loss_sum is None else self._train_loss_sum + detached
        self._train_batches += 1
        return loss

    def on_train_batch_start(self, batch: ModalityBatch, batch_idx: int) -> None:
        # the random streams of training (modality dropout, nn.Dropout) continue at each epoch's first batch
        # from where the previous epoch's training left them; the states travel in checkpoints, so a resumed
        # run draws exactly what the uninterrupted one drew (loader iterators draw from the global generator
        # at moments that differ between the two)
        if batch_idx == 0 and self._rng_states is not None:
            torch.set_rng_state(self._rng_states["torch"])
            self.dropout_rng.set_state(self._rng_states["modality_dropout"])
            for name, gen in self.net_generators.items():
                if f"net:{name}" in self._rng_states:
                    gen.set_state(self._rng_states[f"net:{name}"])

    def on_train_batch_end(self, outputs: Any, batch: ModalityBatch, batch_idx: int) -> None:
        if batch_idx + 1 == self.trainer.num_training_batches:  # the epoch's last training batch
            self._rng_states = {"torch": torch.get_rng_state(), "modality_dropout": self.dropout_rng.get_state(),
                                **{f"net:{n}": g.get_state() for n, g in self.net_generators.items()}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mmclin_history"] = list(self.history)
        checkpoint["mmclin_rng_states"] = self._rng_states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = list(checkpoint.get("mmclin_history", []))
        self._rng_states = checkpoint.get("mmclin_rng_states")

    def on_train_epoch_end(self) -> None:
        # Lightning runs validation before this hook, so val_loss of this epoch is known here
        entry: dict[str, float] = {"epoch": self.current_epoch}
        if self._train_batches:
            mean = self._train_loss_sum / self._train_batches
            if self.trainer.world_size > 1:  # DDP: each rank saw its own shard; history keeps the mean over ranks
                mean = self.trainer.strategy.reduce(mean, reduce_op="mean")
            self.log("train_loss", mean, prog_bar=True, sync_dist=True)
            entry["train_loss"] = float(mean)
            if not np.isfinite(entry["train_loss"]):
                raise TrainingDiverged(
                    f"training diverged at epoch {self.current_epoch + 1}: the mean training loss is "
                    f"{entry['train_loss']}; lower trainer.learning_rate (now {self.learning_rate:g}) or check the "
                    "inputs for extreme values")
        self._train_loss_sum, self._train_batches = None, 0
        if "val_loss" in self.trainer.callback_metrics:
            entry["val_loss"] = float(self.trainer.callback_metrics["val_loss"])
            if not np.isfinite(entry["val_loss"]):
                raise TrainingDiverged(
                    f"training diverged at epoch {self.current_epoch + 1}: the validation loss is {entry['val_loss']}; "
                    f"lower trainer.learning_rate (now {self.learning_rate:g}) or check the inputs for extreme values")
        self.history.append(entry)
        if self.epoch_sink is not None and self.trainer.global_rank == 0:
            self.epoch_sink({k: v for k, v in entry.items() if k != "epoch"}, self.current_epoch)

    def validation_step(self, batch: ModalityBatch, batch_idx: int) -> Tensor:
        loss = self._loss(batch, batch.present)
        self.log("val_loss", loss, prog_bar=True, batch_size=batch.batch_size, sync_dist=True)
        return loss

    def predict_step(self, batch: ModalityBatch, batch_idx: int) -> Tensor:
        return self(batch).float()

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        # the fused kernel: one pass over all parameters (4x faster than per-tensor AdamW on CPU here)
        fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay, fused=fused or None)


class BestWeights(pl_.Callback):
    """Keep the weights of the best validation epoch in memory and restore them at the end."""

    def __init__(self, monitor: str = "val_loss") -> None:
        self.monitor = monitor
        self.best = float("inf")
        self.best_epoch = -1
        self.state: dict[str, Tensor] | None = None

    @torch.no_grad()
    def consider_start(self, module: "MultimodalModule", val_loader: Any) -> None:
        """The untrained weights as the first candidate (epoch -1): the validation loss as Lightning logs it
        (the mean over batches, weighted by their sizes)."""
        was_training = module.training
        module.eval()
        total, n = 0.0, 0
        for batch in val_loader:
            total += float(module._loss(batch, batch.present)) * batch.batch_size
            n += batch.batch_size
        module.train(was_training)
        if n:
            self._consider(total / n, -1, module)

    def on_validation_end(self, trainer: pl_.Trainer, module: pl_.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None:
            self._consider(float(value), trainer.current_epoch, module)

    def _consider(self, value: float, epoch: int, module: pl_.LightningModule) -> None:
        """Keep a copy of ``module``'s weights when ``value`` beats the best so far."""
        if value < self.best:
            self.best, self.best_epoch = value, epoch
            self.state = copy.deepcopy({k: v.detach().clone() for k, v in module.state_dict().items()})

    def on_fit_end(self, trainer: pl_.Trainer, module: pl_.LightningModule) -> None:
        if self.state is not None:
            module.load_state_dict(self.state)

    # saved in epoch checkpoints, so a resumed run knows the best epoch so far
    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "state": self.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.state = state["best"], state["best_epoch"], state["state"]
