"""Cascaded multimodal mixing transformer: cross-attention stages, one modality after another.

After Liu et al., "Cascaded Multi-Modal Mixing Transformers for Alzheimer's Disease
Classification with Incomplete Data" (3MAT, NeuroImage 2023): each modality's tokens first go
through self-attention of their own, then are mixed into one running representation in a fixed
cascade, each stage attending from the running representation to the next modality's tokens;
every stage has an auxiliary output (the task head on the state after it) trained beside the
final one. Absent modalities are skipped per sample (and modality dropout, ``model.modality_dropout``,
trains for it, as 3MAT's does).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mmclin.batch import FusionOutput, ModalityTokens
from mmclin.fusion.base import FusionHead
from mmclin.fusion.steps import INITIAL_STEP, SequentialSteps
from mmclin.registry import FUSIONS


class MixingStage(nn.Module):
    """One cascade stage (pre-norm, residual): the running tokens attend over themselves and
    the next modality's tokens in one softmax (cross-attention and mixing together), then a
    feed-forward layer.

    ``q = LN(h); h <- h + Attn(q, [q; kv]); h <- h + FF(LN(h))``

    A separate cross-attention to a modality with one token (a pooled vector, T = 1) would
    return that token's value whatever the query; with the running tokens among the keys the
    stage can weigh the new modality against what it already holds. The modality's tokens are
    not layer-normalised: a per-feature tabular token ``x_j w_j`` would keep only the sign of
    ``x_j`` (a 0.03 lower C on GSE7390 in benchmarks/fusion_heads.py).

    Shapes:
        h: ``[B, Q, D]``; kv: ``[B, T, D]``; kv_padding: ``[B, T]`` bool, True = ignore -> ``[B, Q, D]``.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float, ff_mult: int = 2) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm_ff = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, ff_mult * d_model), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(ff_mult * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, kv: Tensor, kv_padding: Tensor) -> Tensor:
        q = self.norm_q(h)
        keys = torch.cat([q, kv], dim=1)
        # the running tokens are never padded, so no row has all keys masked (no NaN)
        padding = torch.cat([kv_padding.new_zeros(h.shape[:2]), kv_padding], dim=1)
        h = h + self.drop(self.attn(q, keys, keys, key_padding_mask=padding, need_weights=False)[0])
        return h + self.drop(self.ff(self.norm_ff(h)))


@FUSIONS.register("cascaded_transformer")
class CascadedTransformerFusion(SequentialSteps, FusionHead):
    """3MAT-style cascade of cross-attention stages, one per modality, in a configurable order; unlike 3MAT it starts from learned query tokens and its auxiliary outputs share the task head.

    The running representation starts as ``n_queries`` learned tokens (3MAT starts from the
    first modality's tokens; learned queries give a patient who lacks that modality a start
    too). Stage ``k`` mixes modality ``order[k]`` into it; for a sample without that modality
    the stage is skipped (its running tokens pass through unchanged), so absence is honoured
    per sample, not per batch. The readout is the LayerNorm of the mean running token.

    ``h_0 = Q``; ``h_k = Stage_k(h_{k-1}, W_k t_k)`` where modality ``k`` is present, else ``h_{k-1}``;
    ``pooled = LN(mean_q h_M)``

    How it differs from 3MAT: the running representation starts from learned query tokens rather
    than the first modality's tokens, and the auxiliary outputs share the task head.

    Args:
        input_dims: ``{modality: D_m}``. d_model: width of the running tokens and output (64).
        n_heads: attention heads (4). n_queries: running tokens (1; 4 gave a lower C on GSE7390
            in benchmarks/fusion_heads.py). n_layers: stages per modality (1). dropout: 0.1.
        intra_layers: self-attention layers over each modality's own tokens before its stage (1;
            0 turns them off). order: cascade order (default: sorted names).
        step_loss_weight: weight of the auxiliary per-stage losses (the state after every stage
            decoded by the task head, see ``step_loss``), 0.3 by default as 3MAT trains its
            auxiliary outputs; 0 trains only the final readout (intermediate states are then not
            decodable).

    Shapes:
        tokens[m].tokens: ``[B, T_m, D_m]``, tokens[m].mask: ``[B, T_m]``; present[m]: ``[B]``
        -> pooled ``[B, d_model]``; per_step: ``{"(initial)", *order}`` -> ``[B, d_model]``
        readouts after each stage.
    """

    def __init__(self, input_dims: dict[str, int], d_model: int = 64, n_heads: int = 4, n_queries: int = 1,
                 n_layers: int = 1, dropout: float = 0.1, order: list[str] | None = None,
                 step_loss_weight: float = 0.3, intra_layers: int = 1) -> None:
        super().__init__(input_dims)
        if d_model % n_heads:
            raise ValueError(f"fusion head 'cascaded_transformer': d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if n_queries < 1 or n_layers < 1:
            raise ValueError(f"fusion head 'cascaded_transformer': n_queries and n_layers must be >= 1, got {n_queries}, {n_layers}")
        if intra_layers < 0:
            raise ValueError(f"fusion head 'cascaded_transformer': intra_layers must be >= 0, got {intra_layers}")
        self.init_steps("cascaded_transformer", order, step_loss_weight)
        self.output_dim = d_model
        self.queries = nn.Parameter(torch.randn(n_queries, d_model) * d_model**-0.5)
        self.project = nn.ModuleDict({m: nn.Linear(d, d_model) for m, d in self.input_dims.items()})  # no LN: see MixingStage
        self.stages = nn.ModuleDict({m: nn.ModuleList(MixingStage(d_model, n_heads, dropout) for _ in range(n_layers))
                                     for m in self.modalities})
        # 3MAT's intra-modality self-attention (pre-norm: the tokens themselves stay un-normalised, see MixingStage)
        self.intra = nn.ModuleDict({m: nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, n_heads, 2 * d_model, dropout, batch_first=True, norm_first=True,
                                       activation="gelu") for _ in range(intra_layers)) for m in self.modalities})
        self.readout = nn.LayerNorm(d_model)

    @property
    def per_step_decodable(self) -> bool:
        """Intermediate readouts are trained (and so meaningful to decode) only with a step loss."""
        return self.step_loss_weight > 0

    def _read(self, h: Tensor) -> Tensor:
        return self.readout(h.mean(1))

    def forward(self, tokens: dict[str, ModalityTokens], present: dict[str, Tensor]) -> FusionOutput:
        b = present[self.order[0]].shape[0]
        h = self.queries.unsqueeze(0).expand(b, -1, -1)
        per_step = {INITIAL_STEP: self._read(h)}
        for m in self.order:
            t = tokens[m]
            active = present[m] & t.mask.any(1)  # [B]
            padding = ~t.mask | ~active.unsqueeze(1)  # an absent modality's tokens are never read
            kv = self.project[m](t.tokens)
            if len(self.intra[m]):
                # a row without any valid token (absent modality) reads its first token, so no softmax is over
                # nothing (NaN, also in the gradient); that row's result is never used (``active`` below)
                own = ~t.mask
                own[:, 0] &= t.mask.any(1)
                for layer in self.intra[m]:
                    kv = layer(kv, src_key_padding_mask=own)
            mixed = h
            for stage in self.stages[m]:
                mixed = stage(mixed, kv, padding)
            h = torch.where(active[:, None, None], mixed, h)
            per_step[m] = self._read(h)
        return FusionOutput(pooled=per_step[self.order[-1]], per_step=per_step)

    @classmethod
    def example_options(cls) -> dict:
        return {"d_model": 8, "n_heads": 2, "n_queries": 2}
