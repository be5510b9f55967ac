"""The multimodal network: encoders + fusion head + task head, parts injected."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mmclin.batch import FusionOutput, ModalityTokens
from mmclin.encoders.base import ModalityEncoder
from mmclin.fusion.base import FusionHead


class MultimodalNet(nn.Module):
    """``outputs = head(fusion({m: encoder_m(inputs_m)}, present)) [+ linear(inputs, present)]``.

    Token masks are AND-ed with presence, so an absent modality contributes no token. ``linear``: the
    frozen penalised linear path (:class:`mmclin.training.linear_path.LinearPath`), or None.

    Shapes:
        inputs[m][k]: ``[B, ...]``; present[m]: ``[B]`` -> outputs ``[B, task.output_dim]``.
    """

    def __init__(self, encoders: dict[str, ModalityEncoder], fusion: FusionHead, head: nn.Module,
                 linear: nn.Module | None = None) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(dict(sorted(encoders.items())))
        self.fusion = fusion
        self.head = head
        self.linear = linear

    def encode(self, inputs: dict[str, dict[str, Tensor]], present: dict[str, Tensor]) -> dict[str, ModalityTokens]:
        tokens = {}
        for m, enc in self.encoders.items():
            out = enc(inputs[m])
            tokens[m] = ModalityTokens(out.tokens, out.mask & present[m].unsqueeze(1))
        return tokens

    def forward(self, inputs: dict[str, dict[str, Tensor]], present: dict[str, Tensor]) -> tuple[Tensor, FusionOutput]:
        fused = self.fusion(self.encode(inputs, present), present)
        outputs = self.head(fused.pooled)
        if self.linear is not None:
            outputs = outputs + self.linear(inputs, present).to(outputs.dtype)
        return outputs, fused


class EnsembleNet(nn.Module):
    """A deep ensemble: members trained with different seeds and validation carve-outs;
    raw outputs (log-risk, logits) are averaged.

    Shapes:
        same as ``MultimodalNet``: outputs ``[B, task.output_dim]``.
    """

    def __init__(self, members: list[MultimodalNet]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, inputs: dict[str, dict[str, Tensor]], present: dict[str, Tensor]) -> tuple[Tensor, FusionOutput]:
        outs = [m(inputs, present) for m in self.members]
        outputs = torch.stack([o[0] for o in outs]).mean(0)
        pooled = torch.stack([o[1].pooled for o in outs]).mean(0)
        return outputs, FusionOutput(pooled=pooled)
