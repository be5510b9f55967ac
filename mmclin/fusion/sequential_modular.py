"""Sequential modular fusion: a state vector updated by one module per modality in turn.

After Swamy et al., "MultiModN: Multimodal, Multi-Task, Interpretable Modular Networks"
(NeurIPS 2023). Each modality has its own small module that reads the current state and the
modality's embedding and writes the next state; the task decoders (the task head, one slice
per sub-task for a multitask) can read the state after every step, which makes the per-step
predictions interpretable: how each modality moved a patient's prediction. The reference
code skips a modality for the whole batch when any sample lacks it; here it is skipped per
sample (that sample's state passes through unchanged).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mmclin.batch import FusionOutput, ModalityTokens
from mmclin.fusion.base import FusionHead, mlp
from mmclin.fusion.steps import INITIAL_STEP, SequentialSteps
from mmclin.registry import FUSIONS


class StateUpdate(nn.Module):
    """One MultiModN module: ``s' = s + MLP([LN(s), W LN(mean(t))])``.

    Shapes:
        state: ``[B, S]``; tokens: ``[B, T, D_m]`` (masked mean over T) -> ``[B, S]``.
    """

    def __init__(self, in_dim: int, state_dim: int, n_layers: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, state_dim))
        self.norm = nn.LayerNorm(state_dim)
        self.update = mlp(2 * state_dim, state_dim, state_dim, n_layers, dropout)

    def forward(self, state: Tensor, tokens: ModalityTokens) -> Tensor:
        x = self.embed(tokens.pooled())
        return state + self.update(torch.cat([self.norm(state), x], dim=-1))


@FUSIONS.register("sequential_modular")
class SequentialModularFusion(SequentialSteps, FusionHead):
    """MultiModN-style state machine over the modalities, in a configurable order.

    ``s_0`` is learned; ``s_k = s_{k-1} + p_k * U_k(s_{k-1}, t_k)`` with ``p_k`` the sample's
    presence of modality ``order[k]`` (an absent modality leaves the state exactly unchanged);
    ``pooled = s_M``. Every ``s_k`` lives in the space the task head (the decoders) reads, and
    with ``step_loss_weight > 0`` (default 1) the decoders are trained on every step, as in
    MultiModN: ``loss = L(s_M) + w * mean_{k<M} L_k(s_k)`` (see :func:`mmclin.fusion.steps.per_step_loss`).
    ``FittedModel.predict_per_step`` / the estimators' ``predict_per_step`` decode each step.

    Args:
        input_dims: ``{modality: D_m}``. d_model: state size and output width (64).
        n_layers: hidden layers of each update MLP (1). dropout: 0.1.
        order: the modalities' order (default: sorted names). step_loss_weight: ``w`` (1.0).

    Shapes:
        tokens[m].tokens: ``[B, T_m, D_m]``; present[m]: ``[B]`` -> pooled ``[B, d_model]``;
        per_step: ``{"(initial)": s_0, order[0]: s_1, ...}``, each ``[B, d_model]``.
    """

    per_step_decodable = True

    def __init__(self, input_dims: dict[str, int], d_model: int = 64, n_layers: int = 1, dropout: float = 0.1,
                 order: list[str] | None = None, step_loss_weight: float = 1.0) -> None:
        super().__init__(input_dims)
        self.init_steps("sequential_modular", order, step_loss_weight)
        self.output_dim = d_model
        self.initial_state = nn.Parameter(torch.randn(d_model) * d_model**-0.5)  # not zeros: LN(0) has no gradient
        self.updates = nn.ModuleDict({m: StateUpdate(d, d_model, n_layers, dropout) for m, d in self.input_dims.items()})

    def forward(self, tokens: dict[str, ModalityTokens], present: dict[str, Tensor]) -> FusionOutput:
        b = present[self.order[0]].shape[0]
        state = self.initial_state.unsqueeze(0).expand(b, -1)
        per_step = {INITIAL_STEP: state}
        for m in self.order:
            updated = self.updates[m](state, tokens[m])
            state = torch.where(present[m].unsqueeze(-1), updated, state)  # skipped per sample: exactly unchanged
            per_step[m] = state
        return FusionOutput(pooled=state, per_step=per_step)

    @classmethod
    def example_options(cls) -> dict:
        return {"d_model": 8}
