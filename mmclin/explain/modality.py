"""Modality-level Shapley values: modalities are the players, absence goes through the presence mask.

For subject ``i`` and a coalition ``S`` of modalities, the value is the explained scalar of
the network run with ``present[m][i] = present_data[m][i] and m in S``: an absent modality is
hidden exactly as a missing one is at prediction time (never by zeroing its inputs), and
every fusion head honours that per subject. Shapley values
``phi_m = sum_{S not containing m} |S|! (M-|S|-1)! / M! (v(S + m) - v(S))`` then add up to
``v(all) - v(empty)``: the prediction minus the prediction with every modality absent.

* ``exact`` enumerates the ``2^M`` coalitions (each one fusion pass over cached encoder
  tokens) and combines them with the weights above. Captum's exact ``ShapleyValues`` walks
  all ``M!`` orderings (``M * M!`` evaluations; 322,560 for 8 modalities), so it is used here as
  the reference the exact path is tested against, not as the engine.
* ``sampling`` is Captum's ``ShapleyValueSampling`` over a per-subject binary presence vector
  (inputs all 1, baseline all 0, one feature per modality), with ``n_samples`` random
  orderings; each ordering telescopes, so completeness holds exactly here too.

A modality absent for a subject in the data is a null player for it: its value is exactly 0.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import Tensor, nn

from mmclin.batch import ModalityTokens

MAX_EXACT = 10  # 2^10 = 1,024 fusion passes per batch; beyond that, sample


def members(net: nn.Module) -> list[nn.Module]:
    """The ``MultimodalNet``s inside ``net``: itself, or an ``EnsembleNet``'s members."""
    from mmclin.training.model import EnsembleNet, MultimodalNet

    if isinstance(net, MultimodalNet):
        return [net]
    if isinstance(net, EnsembleNet):
        return list(net.members)
    raise TypeError(f"explanations need a MultimodalNet or EnsembleNet, got {type(net).__name__}")


class CoalitionForward:
    """``forward(coalition [B', M]) -> explained scalar [B']`` for a fixed batch of subjects.

    Encoders run once per batch (their tokens do not depend on presence: ``MultimodalNet``
    ANDs the token mask with presence after encoding); each coalition then costs one fusion
    + head pass. ``B'`` may be a multiple ``k * B`` (Captum's ``perturbations_per_eval``):
    coalition rows ``j * B + i`` belong to subject ``i``.

    Shapes:
        inputs[m][k]: ``[B, ...]``; present[m]: ``[B]``; coalition: ``[k * B, M]`` (0/1) -> ``[k * B]``.
    """

    def __init__(self, net: nn.Module, inputs: dict[str, dict[str, Tensor]], present: dict[str, Tensor],
                 scalar: Callable[[Tensor], Tensor]) -> None:
        self.net, self.inputs, self.present, self.scalar = net, inputs, present, scalar
        self.names = sorted(present)
        self.batch_size = int(present[self.names[0]].shape[0])
        self.cached = True
        with torch.no_grad():
            self.raw = [{m: enc(inputs[m]) for m, enc in member.encoders.items()} for member in members(net)]
            # the linear path's per-modality terms (mmclin.training.linear_path), None without one
            self.linear = [None if getattr(member, "linear", None) is None else member.linear.contributions(inputs)
                           for member in members(net)]
            # the cache must reproduce the network's own forward; a network that breaks the
            # encoders-ignore-presence assumption is run whole for every coalition instead
            full = torch.ones(self.batch_size, len(self.names))
            if not torch.allclose(self(full), self._uncached(full), rtol=1e-4, atol=1e-5):
                warnings.warn("cached encoder tokens do not reproduce the network's output; running the whole "
                              "network for every coalition (slower, same values)", stacklevel=2)
                self.cached = False

    def _presence(self, coalition: Tensor) -> dict[str, Tensor]:
        k = coalition.shape[0] // self.batch_size
        return {m: self.present[m].repeat(k) & (coalition[:, j] > 0.5).to(self.present[m].device)
                for j, m in enumerate(self.names)}

    def _uncached(self, coalition: Tensor) -> Tensor:
        k = coalition.shape[0] // self.batch_size
        inputs = {m: {key: t.repeat(k, *[1] * (t.dim() - 1)) for key, t in d.items()} for m, d in self.inputs.items()}
        return self.scalar(self.net(inputs, self._presence(coalition))[0].float())

    @torch.no_grad()
    def __call__(self, coalition: Tensor) -> Tensor:
        if coalition.shape[0] % self.batch_size:
            raise ValueError(f"coalition rows {coalition.shape[0]} are not a multiple of the batch {self.batch_size}")
        if not self.cached:
            return self._uncached(coalition)
        k = coalition.shape[0] // self.batch_size
        present = self._presence(coalition)
        outs = []
        for member, raw, linear in zip(members(self.net), self.raw, self.linear):
            tokens = {m: ModalityTokens(t.tokens.repeat(k, 1, 1), t.mask.repeat(k, 1) & present[m].unsqueeze(1))
                      for m, t in raw.items()}
            out = member.head(member.fusion(tokens, present).pooled)
            if linear is not None:
                out = out + member.linear.combine({m: t.repeat(k, 1) for m, t in linear.items()}, present).to(out.dtype)
            outs.append(out)
        out = outs[0] if len(outs) == 1 else torch.stack(outs).mean(0)  # EnsembleNet averages raw outputs
        return self.scalar(out.float())


def all_coalitions(n_players: int) -> Tensor:
    """Every subset as a 0/1 row; row ``s`` holds player ``j`` when bit ``j`` of ``s`` is set.

    Shapes:
        -> ``[2^M, M]`` float.
    """
    s = torch.arange(2**n_players).unsqueeze(1)
    return ((s >> torch.arange(n_players)) & 1).float()


def exact_shapley(forward: CoalitionForward, coalitions_per_pass: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    """Exact Shapley values over the ``2^M`` coalitions.

    Returns ``(phi [B, M], v_full [B], v_empty [B])``; ``phi.sum(1) == v_full - v_empty`` up to
    float rounding. Coalitions are evaluated ``coalitions_per_pass`` at a time.

    Shapes:
        -> phi ``[B, M]``, v_full ``[B]``, v_empty ``[B]``.
    """
    n_players, b = len(forward.names), forward.batch_size
    coalitions = all_coalitions(n_players)
    values = []
    for chunk in coalitions.split(coalitions_per_pass):
        rows = chunk.repeat_interleave(b, dim=0)  # coalition j for every subject, then j + 1, ...
        values.append(forward(rows).double().cpu().reshape(len(chunk), b))
    v = torch.cat(values)  # [2^M, B]
    sizes = coalitions.sum(1).long()
    weight = torch.tensor([math.factorial(s) * math.factorial(n_players - s - 1) / math.factorial(n_players)
                           for s in range(n_players)], dtype=torch.float64)
    phi = torch.zeros(b, n_players, dtype=torch.float64)
    index = torch.arange(2**n_players)
    for j in range(n_players):
        without = index[((index >> j) & 1) == 0]
        phi[:, j] = (weight[sizes[without]].unsqueeze(1) * (v[without | (1 << j)] - v[without])).sum(0)
    return phi, v[-1], v[0]


def sampled_shapley(forward: CoalitionForward, n_samples: int, seed: int = 0,
                    perturbations_per_eval: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """Captum ``ShapleyValueSampling`` over the presence vector; ``n_samples`` random orderings.

    Shapes:
        -> phi ``[B, M]``, v_full ``[B]``, v_empty ``[B]``.
    """
    from captum.attr import ShapleyValueSampling

    n_players, b = len(forward.names), forward.batch_size
    ones = torch.ones(b, n_players)
    with torch.random.fork_rng(devices=[]):  # Captum draws its orderings from torch's global generator
        torch.manual_seed(seed)
        phi = ShapleyValueSampling(forward).attribute(
            ones, baselines=torch.zeros_like(ones), feature_mask=torch.arange(n_players).unsqueeze(0),
            n_samples=n_samples, perturbations_per_eval=max(1, min(perturbations_per_eval, n_players)))
    return phi.double().cpu(), forward(ones).double().cpu(), forward(torch.zeros_like(ones)).double().cpu()
