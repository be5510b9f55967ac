"""UTDE: gated combination of imputation-based and learned-interpolation embeddings.

Zhang, Cui, Wang et al., "Improving Medical Predictions by Irregular Multimodal Electronic
Health Records Modeling" (ICML 2023), unified time discretization embedding. At ``R``
regular reference points over the window:

* imputation path: for every variable its last observation at or before the point (carried
  forward), an "observed yet" flag and the time since that observation -> ``e_imp``;
* learned interpolation: mTAND multi-time attention (see :mod:`mmclin.encoders.mtand`) -> ``e_att``;
* gate: ``g = sigmoid(W [e_imp; e_att] + b)``, ``e = g * e_imp + (1 - g) * e_att``;

then a transformer over the ``R`` steps and a masked mean (or all ``R`` tokens). Uses the
``irregular_series`` featurizer; events arrive sorted by time within a subject.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmclin.batch import ModalityTokens
from mmclin.encoders.base import ModalityEncoder
from mmclin.encoders.irregular_series import TimeEmbedding, example_events
from mmclin.encoders.mtand import MultiTimeAttention
from mmclin.registry import ENCODERS


def carry_forward(inputs: dict[str, Tensor], ref: Tensor, n_codes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Last observation of each variable at or before each reference time (vectorised).

    Shapes:
        inputs ``code, value, time, mask``: ``[B, L]`` (time ascending per row); ref ``[R]`` ->
        value ``[B, R, V]`` (0 where none yet), observed ``[B, R, V]`` bool, age ``[B, R, V]``
        (``ref - time of that observation``, 0 where none).
    """
    code, mask, time = inputs["code"], inputs["mask"], inputs["time"]
    b, length = code.shape
    r = ref.numel()
    onehot = F.one_hot(code, n_codes).bool() & mask.unsqueeze(-1)  # [B, L, V]
    pos = torch.arange(length, device=code.device).view(1, length, 1)
    last = torch.where(onehot, pos, -1).cummax(dim=1).values  # [B, L, V]: last event of v up to l
    t_sorted = time.masked_fill(~mask, float("inf")).contiguous()
    upto = torch.searchsorted(t_sorted, ref.to(time.dtype).expand(b, r).contiguous(), right=True) - 1  # [B, R]
    idx = last.gather(1, upto.clamp_min(0).unsqueeze(-1).expand(b, r, n_codes))
    idx = torch.where(upto.unsqueeze(-1) >= 0, idx, -1)
    observed = idx >= 0
    safe = idx.clamp_min(0).flatten(1)
    value = torch.where(observed, inputs["value"].gather(1, safe).view(b, r, n_codes), 0.0)
    age = torch.where(observed, ref.to(time.dtype).view(1, r, 1) - time.gather(1, safe).view(b, r, n_codes), 0.0)
    return value, observed, age


@ENCODERS.register("utde")
class UTDEEncoder(ModalityEncoder):
    """UTDE: gate between carry-forward imputation and mTAND interpolation at reference points.

    Args:
        n_codes: variables (from the data). d_model: width D. n_ref: reference points R.
        n_heads: mTAND heads. n_layers: transformer layers over the R steps. dropout.
        output: ``"pooled"`` (T = 1, masked mean) or ``"tokens"`` (T = R).

    Shapes:
        inputs: ``code, value, value_missing, time, mask``: ``[B, L]``.
        output: tokens ``[B, 1, D]`` or ``[B, R, D]``, mask all True.
    """

    kind = "irregular_series"

    def __init__(self, n_codes: int, d_model: int = 64, n_ref: int = 16, n_heads: int = 1, n_layers: int = 1,
                 d_time: int = 16, dropout: float = 0.1, output: str = "pooled") -> None:
        super().__init__()
        if output not in ("pooled", "tokens"):
            raise ValueError(f"output={output!r}: choose 'pooled' or 'tokens'")
        self.output_dim, self.n_codes, self.output = d_model, n_codes, output
        self.mtan = MultiTimeAttention(n_codes, n_ref, n_heads, d_time)
        self.attention_proj = nn.Linear(2 * n_heads * n_codes + n_codes, d_model)
        self.imputation_proj = nn.Linear(3 * n_codes, d_model)
        self.gate = nn.Linear(2 * d_model, d_model)
        self.ref_time = TimeEmbedding(d_model)
        self.steps = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d_model, max(1, min(4, d_model // 8)), 2 * d_model, dropout, batch_first=True,
                                       norm_first=True), n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, inputs: dict[str, Tensor]) -> ModalityTokens:
        ref = self.mtan.ref
        values, mass, observed = self.mtan(inputs)
        r = values.shape[1]
        seen = observed.to(values.dtype).unsqueeze(1).expand(-1, r, -1)
        e_att = self.attention_proj(torch.cat([values, mass, seen], -1))
        v, obs, age = carry_forward(inputs, ref, self.n_codes)
        e_imp = self.imputation_proj(torch.cat([v, obs.to(v.dtype), age], -1))
        g = torch.sigmoid(self.gate(torch.cat([e_imp, e_att], -1)))
        x = g * e_imp + (1 - g) * e_att + self.ref_time(ref.to(values.dtype))
        h = self.norm(self.steps(x))
        tokens = h.mean(1, keepdim=True) if self.output == "pooled" else h
        return ModalityTokens(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))

    @classmethod
    def example(cls) -> "UTDEEncoder":
        return cls(n_codes=6, d_model=8, n_ref=5, n_heads=2, d_time=4)

    def example_input(self, batch_size: int, seed: int = 0) -> dict[str, Tensor]:
        return example_events(batch_size, self.n_codes, seed)
