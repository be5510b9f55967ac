"""Shared by the sequential heads (cascaded_transformer, sequential_modular): step names, the
cascade order option and the per-step loss that trains decoders on intermediate states."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mmclin.batch import FusionOutput

INITIAL_STEP = "(initial)"  # per_step key of the state before any modality is read


def check_order(head: str, order: list[str] | None, modalities: list[str]) -> list[str]:
    """The step order: ``order`` when it lists every modality exactly once, else the sorted names.

        >>> check_order("h", None, ["a", "b"]), check_order("h", ["b", "a"], ["a", "b"])
        (['a', 'b'], ['b', 'a'])
    """
    if order is None:
        return list(modalities)
    if isinstance(order, str) or not all(isinstance(m, str) for m in order):
        raise ValueError(f"The 'order' option of fusion head {head!r} must be a list of modality names. Got {order!r} instead.")
    order = list(order)
    if sorted(order) != sorted(modalities):
        raise ValueError(
            f"The 'order' option of fusion head {head!r} must list each modality exactly once: a permutation "
            f"of {sorted(modalities)}. Got {order} instead."
        )
    return order


def check_step_names(head: str, modalities: list[str]) -> None:
    if INITIAL_STEP in modalities:
        raise ValueError(f"fusion head {head!r}: the modality name {INITIAL_STEP!r} is reserved for the initial state; rename the modality")


def per_step_loss(fused: FusionOutput, present: dict[str, Tensor], step_names: list[str], head: nn.Module,
                  task: Any, target: Tensor, offsets: dict[str, Tensor] | None = None) -> Tensor:
    """Mean task loss of the decoded intermediate states: every step but the last, whose state
    is ``pooled`` and already in the main loss. Step ``k`` is scored only on the samples whose
    modality ``k`` was present (for the others the state did not change, so they were scored
    at an earlier step); the initial state (step 0) is scored on every sample: it learns the
    prior that the modalities then move. ``offsets[s]``: what is added to step ``s``'s decoded output
    (a model's linear path: the terms of the modalities read up to ``s``), as the final output has it.

    Shapes:
        fused.per_step[s]: ``[B, D]``; present[m]: ``[B]`` bool; target: ``[B, W]``;
        offsets[s]: ``[B, output_dim]`` -> scalar.
    """
    if fused.per_step is None:
        raise ValueError("per_step_loss needs a fusion output with per_step states")
    losses = []
    for name in step_names[:-1]:
        state = fused.per_step[name]
        rows = torch.ones(state.shape[0], dtype=torch.bool, device=state.device) if name == INITIAL_STEP else present[name]
        if not bool(rows.any()):
            continue
        decoded = head(state[rows]).float()
        if offsets is not None:
            decoded = decoded + offsets[name][rows].float()
        losses.append(task.loss(decoded, target[rows]))
    if not losses:
        return fused.pooled.new_zeros(())
    return torch.stack(losses).mean()


class SequentialSteps:
    """What the sequential heads share: a modality order, per-step names and the weighted per-step loss.

    A head mixes this in and calls :meth:`init_steps` in its constructor; the training module calls
    ``step_loss`` on the presence it trained with.
    """

    order: list[str]
    step_loss_weight: float

    def init_steps(self, head: str, order: list[str] | None, step_loss_weight: float) -> None:
        check_step_names(head, self.modalities)
        if step_loss_weight < 0:
            raise ValueError(f"fusion head {head!r}: step_loss_weight must be >= 0, got {step_loss_weight}")
        self.order = check_order(head, order, self.modalities)
        self.step_loss_weight = float(step_loss_weight)

    def step_names(self) -> list[str]:
        return [INITIAL_STEP, *self.order]

    def step_loss(self, fused: FusionOutput, present: dict[str, Tensor], head: nn.Module, task: Any,
                  target: Tensor, offsets: dict[str, Tensor] | None = None) -> Tensor | None:
        """``w * per_step_loss``; None when the weight is 0."""
        if self.step_loss_weight <= 0:
            return None
        return self.step_loss_weight * per_step_loss(fused, present, self.step_names(), head, task, target, offsets)
