"""Feature-level attributions: Captum Integrated Gradients on encoder inputs and embedding layers.

Every attributable input of every modality (see :mod:`mmclin.explain.attributable`) is one
input of a single Integrated Gradients call, so the attributions of all features of all
present modalities add up to ``f(x) - f(reference)`` (Captum's convergence delta measures
the integration error): the reference puts every numeric value at its training mean and
every category at its column's mean embedding, with each subject's presence unchanged.

Inputs attributed at a layer (category embeddings) are the layer's output: a forward hook
replaces it with the interpolated tensor. In an ``EnsembleNet`` every member has its own
layer, so each member's embedding is a separate IG input and a column's attribution is the
sum over members (the ensemble averages the members' outputs, so completeness still holds).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from mmclin.explain.attributable import AttributableInput, attributable_inputs
from mmclin.explain.modality import members
from mmclin.explain.targets import ExplainTarget


@dataclass
class AttributedPart:
    """One IG input: a modality's raw input, or one member's layer output for it."""

    modality: str
    decl: AttributableInput
    member: int | None  # None: the raw input, shared by all members


def plan(net: nn.Module, levels: tuple[str, ...] | None = None) -> tuple[dict[str, list[AttributableInput]], list[str]]:
    """Declarations per modality (from the first member's encoders) of the given levels (all by
    default), and the modalities that declare none of them."""
    first = members(net)[0]
    decls = {m: [d for d in attributable_inputs(enc) if levels is None or d.level in levels]
             for m, enc in first.encoders.items()}
    return {m: d for m, d in decls.items() if d}, sorted(m for m, d in decls.items() if not d)


@contextlib.contextmanager
def _layer_overrides(modules: dict[tuple[int, str, str], nn.Module]) -> Iterator[dict]:
    """Forward hooks that replace a module's output with ``slot[key]`` while it is set."""
    slot: dict = {}
    handles = []
    for key, module in modules.items():
        def hook(_mod, _inp, out, key=key):
            return slot[key] if key in slot else out
        handles.append(module.register_forward_hook(hook))
    try:
        yield slot
    finally:
        for h in handles:
            h.remove()


def integrated_gradients(
    net: nn.Module, inputs: dict[str, dict[str, Tensor]], present: dict[str, Tensor], target: ExplainTarget,
    rows: np.ndarray, n_steps: int = 50, method: str = "gausslegendre", levels: tuple[str, ...] | None = None,
) -> tuple[list[AttributedPart], list[Tensor], Tensor, Tensor]:
    """IG for one batch of subjects over every declared input.

    Returns ``(parts, attributions, reference_output, delta)``: attribution ``k`` has the shape
    of part ``k``'s tensor; ``reference_output`` is the explained scalar at the reference,
    ``delta`` Captum's convergence delta (sum of attributions minus ``f(x) - f(reference)``).
    One forward + backward pass covers the ``B`` subjects at one step.

    Shapes:
        inputs[m][k]: ``[B, ...]``; present[m]: ``[B]`` -> attributions ``[B, ...]``, reference ``[B]``, delta ``[B]``.
    """
    from captum.attr import IntegratedGradients

    decls, _ = plan(net, levels)
    nets = members(net)
    parts: list[AttributedPart] = []
    layer_modules: dict[tuple[int, str, str], nn.Module] = {}
    for m in sorted(decls):
        for d in decls[m]:
            if d.layer is None:
                parts.append(AttributedPart(m, d, None))
            else:
                for k, member in enumerate(nets):
                    parts.append(AttributedPart(m, d, k))
                    layer_modules[(k, m, d.key)] = member.encoders[m].get_submodule(d.layer)

    # the layers' actual outputs for these subjects: one capturing forward
    captured: dict[tuple[int, str, str], Tensor] = {}
    handles = [mod.register_forward_hook(lambda _m, _i, out, key=key: captured.__setitem__(key, out.detach()))
               for key, mod in layer_modules.items()]
    try:
        with torch.no_grad():
            net(inputs, present)
    finally:
        for h in handles:
            h.remove()

    xs, refs = [], []
    for p in parts:
        if p.member is None:
            x = inputs[p.modality][p.decl.key].float()
            enc = nets[0].encoders[p.modality]
        else:
            x = captured[(p.member, p.modality, p.decl.key)]
            enc = nets[p.member].encoders[p.modality]
        xs.append(x)
        refs.append(p.decl.baseline(enc, x, inputs[p.modality]).detach())

    # everything else travels as additional forward args, which Captum repeats along the batch
    extra_keys = [(m, k) for m in sorted(inputs) for k in sorted(inputs[m])]
    names = sorted(present)
    n_parts = len(parts)
    raw_slots = {(p.modality, p.decl.key): i for i, p in enumerate(parts) if p.member is None}

    with _layer_overrides(layer_modules) as slot:
        def forward(*args: Tensor) -> Tensor:
            attributed, extras = args[:n_parts], args[n_parts:]
            rebuilt: dict[str, dict[str, Tensor]] = {m: {} for m in inputs}
            for (m, k), t in zip(extra_keys, extras[: len(extra_keys)]):
                i = raw_slots.get((m, k))
                rebuilt[m][k] = attributed[i] if i is not None else t
            pres = dict(zip(names, extras[len(extra_keys):]))
            for i, p in enumerate(parts):
                if p.member is not None:
                    slot[(p.member, p.modality, p.decl.key)] = attributed[i]
            try:
                return target.columns(net(rebuilt, pres)[0].float())
            finally:
                slot.clear()

        extras = tuple(inputs[m][k] for m, k in extra_keys) + tuple(present[m] for m in names)
        tgt = torch.as_tensor(target.index[rows], dtype=torch.long).tolist()
        ig = IntegratedGradients(forward)
        attributions, delta = ig.attribute(
            tuple(xs), baselines=tuple(refs), target=tgt, additional_forward_args=extras, n_steps=n_steps,
            method=method, internal_batch_size=len(rows), return_convergence_delta=True)
        with torch.no_grad():
            reference = target.select(forward(*refs, *extras), rows)
    return parts, [a.detach() for a in attributions], reference.detach(), delta.detach()


def reduce_attribution(part: AttributedPart, attribution: Tensor) -> Tensor:
    """Sum the trailing dims beyond the declared axes. Shapes: ``[B, *axes, *rest]`` -> ``[B, *axes]``."""
    kept = len(part.decl.axes)
    a = attribution.double()
    if a.dim() > kept + 1:
        a = a.reshape(*a.shape[: kept + 1], -1).sum(-1)
    return a
