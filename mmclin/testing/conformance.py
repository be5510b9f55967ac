"""Shared conformance checks for every registered encoder and fusion head.

Tests parametrise over ``ENCODERS.names()`` x ``ENCODER_CHECKS`` and
``FUSIONS.names()`` x ``FUSION_CHECKS``, so a newly registered component is checked
without anyone writing a test for it.
"""
from __future__ import annotations

import io
from typing import Callable

import torch
from torch import Tensor, nn

from mmclin.batch import ModalityTokens
from mmclin.registry import ENCODERS, FUSIONS, load_builtin_components


# --- encoders ------------------------------------------------------------------------------
def make_encoder(name: str) -> nn.Module:
    load_builtin_components()
    torch.manual_seed(0)
    return ENCODERS.get(name).example()


def _check_tokens(enc: nn.Module, out: ModalityTokens, batch_size: int, name: str) -> None:
    assert isinstance(out, ModalityTokens), f"{name}: forward must return ModalityTokens, got {type(out).__name__}"
    out.validate(name)
    assert out.tokens.shape[0] == batch_size, f"{name}: batch {batch_size} gave {out.tokens.shape[0]} rows"
    assert out.tokens.shape[2] == enc.output_dim, f"{name}: token width {out.tokens.shape[2]} != output_dim {enc.output_dim}"
    assert torch.isfinite(out.tokens).all(), f"{name}: non-finite tokens"


def check_encoder_shapes(name: str) -> None:
    enc = make_encoder(name).eval()
    assert enc.kind == ENCODERS.get(name).kind and enc.kind, f"{name}: encoder must declare its modality kind"
    for b in (5, 1):  # includes a batch of one
        _check_tokens(enc, enc(enc.example_input(b)), b, name)


def check_encoder_gradients(name: str) -> None:
    enc = make_encoder(name).train()
    out = enc(enc.example_input(6))
    (out.tokens * out.mask.unsqueeze(-1)).pow(2).mean().backward()
    dead = [n for n, p in enc.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not dead, f"{name}: no gradient reaches parameters {dead}"


def check_encoder_sample_independence(name: str) -> None:
    """In eval mode, a sample's tokens do not depend on the other samples in the batch."""
    enc = make_encoder(name).eval()
    x = enc.example_input(4)
    full = enc(x)
    single = enc({k: v[:1] for k, v in x.items()})
    torch.testing.assert_close(full.tokens[:1], single.tokens, rtol=1e-4, atol=1e-5, msg=f"{name}: output depends on other samples")


def _reloaded(module: torch.nn.Module, fresh: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """A freshly built module (other random weights: ``seed``) with ``module``'s state loaded through bytes."""
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(seed)
    other = fresh().eval()
    other.load_state_dict(torch.load(buf))
    return other


def check_encoder_state_dict(name: str) -> None:
    enc = make_encoder(name).eval()
    other = _reloaded(enc, ENCODERS.get(name).example, 123)
    x = enc.example_input(3)
    torch.testing.assert_close(enc(x).tokens, other(x).tokens, msg=f"{name}: state_dict round trip changed the output")


ENCODER_CHECKS: list[Callable[[str], None]] = [
    check_encoder_shapes, check_encoder_gradients, check_encoder_sample_independence, check_encoder_state_dict,
]


# --- fusion heads --------------------------------------------------------------------------
EXAMPLE_DIMS = {"b_genes": 6, "a_clinical": 4, "c_notes": 5}


def example_tokens(batch_size: int, dims: dict[str, int] = EXAMPLE_DIMS, seed: int = 0) -> tuple[dict[str, ModalityTokens], dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    tokens, present = {}, {}
    for i, (m, d) in enumerate(sorted(dims.items())):
        t = 1 + i  # different token counts per modality
        mask = torch.ones(batch_size, t, dtype=torch.bool)
        if t > 1:
            mask[:, -1] = torch.arange(batch_size) % 2 == 0  # some padded tokens
        tokens[m] = ModalityTokens(torch.randn(batch_size, t, d, generator=g), mask)
        present[m] = torch.rand(batch_size, generator=g) > 0.3
    for m in present:  # every sample keeps at least one modality; sample 0 has all
        present[m][0] = True
    return tokens, present


def make_fusion(name: str, dims: dict[str, int] = EXAMPLE_DIMS) -> nn.Module:
    load_builtin_components()
    torch.manual_seed(0)
    cls = FUSIONS.get(name)
    return cls(input_dims=dims, **cls.example_options())


def _mask_absent(tokens: dict[str, ModalityTokens], present: dict[str, Tensor]) -> dict[str, ModalityTokens]:
    return {m: ModalityTokens(t.tokens, t.mask & present[m].unsqueeze(1)) for m, t in tokens.items()}


def check_fusion_shapes(name: str) -> None:
    head = make_fusion(name).eval()
    for b in (6, 1):
        tokens, present = example_tokens(b)
        out = head(_mask_absent(tokens, present), present)
        assert out.pooled.shape == (b, head.output_dim), f"{name}: pooled {tuple(out.pooled.shape)} != {(b, head.output_dim)}"
        assert torch.isfinite(out.pooled).all(), f"{name}: non-finite output"


def check_fusion_gradients(name: str) -> None:
    head = make_fusion(name).train()
    tokens, present = example_tokens(8)
    for m in present:  # all present so every branch is used
        present[m][:] = True
        tokens[m].tokens.requires_grad_(True)
    out = head(tokens, present)
    loss = out.pooled.pow(2).mean() + (out.aux_loss if out.aux_loss is not None else 0.0)
    loss.backward()
    # the encoders learn through the head: every modality's tokens get a gradient
    unreached = [m for m in tokens if tokens[m].tokens.grad is None or not tokens[m].tokens.grad.abs().sum() > 0]
    assert not unreached, f"{name}: no gradient reaches the tokens of {unreached}"
    # parameters that stand in for an absent modality (learned missing representations,
    # completions) can only learn from samples lacking one: a second batch where sample i
    # lacks modality i % (M + 1) - 1 (sample 0 has all) adds its gradients to the same .grad
    names = sorted(present)
    tokens2, _ = example_tokens(8, seed=1)
    for t in tokens2.values():
        t.tokens.requires_grad_(True)
    present2 = {m: torch.tensor([i % (len(names) + 1) != j + 1 for i in range(8)]) for j, m in enumerate(names)}
    out2 = head(_mask_absent(tokens2, present2), present2)
    (out2.pooled.pow(2).mean() + (out2.aux_loss if out2.aux_loss is not None else 0.0)).backward()
    dead = [n for n, p in head.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not dead, f"{name}: no gradient reaches parameters {dead}"


def check_fusion_absent_modality_ignored(name: str) -> None:
    """A sample's output does not change when another sample's modality is dropped, nor
    when an absent modality's tokens change (absence is honoured per sample)."""
    head = make_fusion(name).eval()
    tokens, present = example_tokens(6)
    base = head(_mask_absent(tokens, present), present).pooled
    m = sorted(present)[1]
    present2 = {k: v.clone() for k, v in present.items()}
    present2[m][3] = False
    present2[sorted(present)[0]][3] = True  # sample 3 keeps a modality
    out2 = head(_mask_absent(tokens, present2), present2).pooled
    others = [i for i in range(6) if i != 3]
    torch.testing.assert_close(base[others], out2[others], rtol=1e-4, atol=1e-5,
                               msg=f"{name}: dropping sample 3's {m!r} changed other samples")
    garbage = dict(tokens)
    garbage[m] = ModalityTokens(torch.randn_like(tokens[m].tokens) * 100, tokens[m].mask)
    out3 = head(_mask_absent(garbage, present2), present2).pooled
    torch.testing.assert_close(out2[3], out3[3], rtol=1e-4, atol=1e-5,
                               msg=f"{name}: sample 3's output depends on its absent modality {m!r}")


def check_fusion_order_invariant(name: str) -> None:
    """Modality dict order does not matter."""
    head = make_fusion(name).eval()
    tokens, present = example_tokens(5)
    a = head(_mask_absent(tokens, present), present).pooled
    rev_tokens = dict(reversed(list(_mask_absent(tokens, present).items())))
    rev_present = dict(reversed(list(present.items())))
    b = head(rev_tokens, rev_present).pooled
    torch.testing.assert_close(a, b, msg=f"{name}: output depends on modality dict order")
    head2 = make_fusion(name, dict(reversed(list(EXAMPLE_DIMS.items()))))
    assert head2.state_dict().keys() == head.state_dict().keys(), f"{name}: parameters depend on input_dims order"


def check_fusion_no_nan_when_absent(name: str) -> None:
    head = make_fusion(name).train()
    tokens, present = example_tokens(4)
    names = sorted(present)
    for m in names[1:]:
        present[m][:] = False  # only one modality left for everyone
    present[names[0]][:] = True
    for t in tokens.values():  # gradients to the encoders count too (and a head may have no parameters)
        t.tokens.requires_grad_(True)
    out = head(_mask_absent(tokens, present), present)
    assert torch.isfinite(out.pooled).all(), f"{name}: NaN/inf when modalities are absent"
    out.pooled.sum().backward()
    bad = [n for n, p in head.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    bad += [f"tokens of {m}" for m, t in tokens.items() if t.tokens.grad is not None and not torch.isfinite(t.tokens.grad).all()]
    assert not bad, f"{name}: non-finite gradients {bad} when modalities are absent"


def check_fusion_state_dict(name: str) -> None:
    head = make_fusion(name).eval()
    other = _reloaded(head, lambda: FUSIONS.get(name)(input_dims=EXAMPLE_DIMS, **FUSIONS.get(name).example_options()), 99)
    tokens, present = example_tokens(3)
    torch.testing.assert_close(head(_mask_absent(tokens, present), present).pooled,
                               other(_mask_absent(tokens, present), present).pooled)


FUSION_CHECKS: list[Callable[[str], None]] = [
    check_fusion_shapes, check_fusion_gradients, check_fusion_absent_modality_ignored,
    check_fusion_order_invariant, check_fusion_no_nan_when_absent, check_fusion_state_dict,
]
