"""The tensors that flow between data, encoders, fusion heads and tasks."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class ModalityTokens:
    """An encoder's output.

    Shapes:
        tokens: ``[B, T, D]``; a pooled vector is ``T = 1``.
        mask: ``[B, T]`` bool, True where a token is real.
    """

    tokens: Tensor
    mask: Tensor

    def validate(self, name: str = "?") -> None:
        if self.tokens.dim() != 3:
            raise ValueError(f"modality {name!r}: tokens must be [B, T, D], got shape {tuple(self.tokens.shape)}")
        if self.mask.shape != self.tokens.shape[:2]:
            raise ValueError(
                f"modality {name!r}: mask has shape {tuple(self.mask.shape)} but tokens are "
                f"{tuple(self.tokens.shape)}; expected mask [B, T] = {tuple(self.tokens.shape[:2])}"
            )
        if self.mask.dtype != torch.bool:
            raise ValueError(f"modality {name!r}: mask must be bool, got {self.mask.dtype}")

    def pooled(self) -> Tensor:
        """Masked mean over tokens, ``[B, D]``; zeros where a sample has no token."""
        m = self.mask.unsqueeze(-1).to(self.tokens.dtype)
        return (self.tokens * m).sum(1) / m.sum(1).clamp_min(1.0)


@dataclass
class FusionOutput:
    """A fusion head's output.

    Shapes:
        pooled: ``[B, D]``.
        aux_loss: scalar or None (e.g. a contrastive term).
        per_step: optional dict of ``[B, D]`` intermediate states (e.g. one per modality).
    """

    pooled: Tensor
    aux_loss: Tensor | None = None
    per_step: dict[str, Tensor] | None = None


@dataclass
class ModalityBatch:
    """One mini-batch.

    Shapes:
        inputs[m][k]: ``[B, ...]`` for every modality ``m`` and input tensor ``k``.
        present[m]: ``[B]`` bool; False means the modality is absent for that sample.
        target: ``[B, ...]`` tensor, or None at prediction time.
    """

    inputs: dict[str, dict[str, Tensor]]
    present: dict[str, Tensor]
    target: Tensor | None = None
    index: Tensor | None = field(default=None)

    @property
    def batch_size(self) -> int:
        return int(next(iter(self.present.values())).shape[0])

    def validate(self) -> None:
        if set(self.inputs) != set(self.present):
            raise ValueError(
                f"inputs have modalities {sorted(self.inputs)} but present has {sorted(self.present)}"
            )
        sizes: dict[str, int] = {}
        for name in sorted(self.present):
            p = self.present[name]
            if p.dim() != 1 or p.dtype != torch.bool:
                raise ValueError(f"present[{name!r}] must be a 1-D bool tensor, got {p.dtype} {tuple(p.shape)}")
            sizes[f"present[{name!r}]"] = p.shape[0]
            for key, t in sorted(self.inputs[name].items()):
                sizes[f"{name!r}/{key!r}"] = t.shape[0]
        if self.target is not None:
            sizes["target"] = self.target.shape[0]
        first_name, first = next(iter(sizes.items()))
        for name, n in sizes.items():
            if n != first:
                raise ValueError(f"{name} has {n} samples but {first_name} has {first}")

    def to(self, device: torch.device | str) -> "ModalityBatch":
        return ModalityBatch(
            inputs={m: {k: t.to(device, non_blocking=True) for k, t in d.items()} for m, d in self.inputs.items()},
            present={m: p.to(device, non_blocking=True) for m, p in self.present.items()},
            target=None if self.target is None else self.target.to(device, non_blocking=True),
            index=self.index,
        )

    def select(self, idx: Tensor) -> "ModalityBatch":
        return ModalityBatch(
            inputs={m: {k: t[idx] for k, t in d.items()} for m, d in self.inputs.items()},
            present={m: p[idx] for m, p in self.present.items()},
            target=None if self.target is None else self.target[idx],
            index=None if self.index is None else self.index[idx],
        )


def describe(obj: Any) -> str:
    if isinstance(obj, Tensor):
        return f"{obj.dtype} {tuple(obj.shape)}"
    return type(obj).__name__
