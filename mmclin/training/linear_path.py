"""The penalised linear path beside the deep one: the classical model a small cohort is best served by,
fitted by scikit-learn / scikit-survival on the training rows, added to the network's output.

The network's output is ``head(fusion(...)) + linear(x)``, where ``x`` is the featurised tabular and
genomics inputs (standardised values, missing flags, hinges at the training quartiles of each clinical
value, one-hot categories) and, for an irregular series, the standard hand-made summaries of its most
frequent training codes (last value, whether there is one, log(1 + count), time since last); an absent
modality's block is 0, its training mean. The linear weights are fitted once per fit on all training
rows by the task's own penalised model (:meth:`mmclin.tasks.base.Task.fit_linear`: near-ridge Cox with
its penalty chosen by inner CV, penalised logistic or ridge regression) and frozen. The task head starts
at zero, so training starts from exactly the linear model and the deep path learns what it leaves;
the starting point is an early-stopping candidate like every epoch, so on the validation rows the
model is never worse than the linear model it contains.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmclin.cohort import ModalitySpec

LINEAR_KINDS = ("tabular", "genomics", "irregular_series")
# an irregular series' summaries cover its most frequent training codes only: 4 columns per code, and a hospital's
# 10^4 codes would make a design wider than the penalised fit can use
MAX_EVENT_CODES = 64
# a tabular numeric column also enters through hinges max(0, z - knot) at these training quantiles: the linear
# model is then additive and piecewise linear in each clinical value (a skewed count, a U-shaped age effect), which
# the penalised fit uses or leaves at 0; genomics columns stay linear (hundreds of genes, little data per gene)
HINGE_QUANTILES = (0.25, 0.5, 0.75)
FIRST_EVENT_CODE = 2  # the irregular featurizer's ids: 0 padding, 1 unknown code, then the vocabulary


def linear_modalities(specs: list[ModalitySpec]) -> list[str]:
    """The modalities the linear path reads, sorted."""
    return sorted(s.name for s in specs if s.kind in LINEAR_KINDS)


def linear_path_enabled(setting: bool | None, specs: list[ModalitySpec], task: Any) -> bool:
    """``model.linear_path``: True, False, or None (automatic: on when the task has a linear model and a
    tabular, genomics or irregular-series modality exists). True where it cannot work is an error saying why."""
    if setting is False:
        return False
    from mmclin.tasks.base import Task

    has_model = type(task).fit_linear is not Task.fit_linear
    has_inputs = bool(linear_modalities(specs))
    if setting is True and not (has_model and has_inputs):
        why = (f"the {task.task_name!r} task has no penalised linear model" if not has_model else
               "it reads tabular, genomics and irregular_series modalities, and there is none (modalities: "
               + ", ".join(f"{s.name} ({s.kind})" for s in specs) + ")")
        raise ValueError(f"model.linear_path: true, but {why}; set model.linear_path: false")
    return has_model and has_inputs


class LinearPath(nn.Module):
    """``linear(x) = x @ weight.T + bias`` over the design of the tabular, genomics and irregular-series
    inputs; frozen buffers (saved with the weights, never trained by the optimiser).

    Shapes:
        inputs[m] as the featurizers give them, present[m] ``[B]`` -> ``[B, output_dim]``.
    """

    def __init__(self, specs: list[ModalitySpec], encoder_kwargs: dict[str, dict[str, Any]], output_dim: int) -> None:
        super().__init__()
        kinds = {s.name: s.kind for s in specs}
        # (modality, kind, categorical cardinalities, first column, end column) of the design
        self.blocks: list[tuple[str, str, list[int], int, int]] = []
        width = 0
        for m in linear_modalities(specs):
            kw = encoder_kwargs[m]
            if kinds[m] == "tabular":
                cards = [int(c) for c in kw["cardinalities"]]
                n_numeric = int(kw["n_numeric"])
                self.register_buffer(f"knots_{len(self.blocks)}", torch.zeros(n_numeric, len(HINGE_QUANTILES)))
                size = (2 + len(HINGE_QUANTILES)) * n_numeric + sum(cards)
            elif kinds[m] == "genomics":
                cards, size = [], 2 * int(kw["n_genes"])
            else:  # irregular series: cards holds [n_codes]; the codes summarised are a buffer chosen in fit
                n_codes = int(kw["n_codes"])
                k = min(max(n_codes - FIRST_EVENT_CODE, 0), MAX_EVENT_CODES)
                self.register_buffer(f"event_codes_{len(self.blocks)}", torch.arange(FIRST_EVENT_CODE, FIRST_EVENT_CODE + k))
                cards, size = [n_codes], 4 * k
            self.blocks.append((m, kinds[m], cards, width, width + size))
            width += size
        self.register_buffer("weight", torch.zeros(output_dim, width))
        self.register_buffer("bias", torch.zeros(output_dim))

    def _block(self, i: int, x: dict[str, Tensor]) -> Tensor:
        _, kind, cards, _, _ = self.blocks[i]
        if kind == "tabular":
            z = x["numeric"].float()
            observed = (~x["numeric_missing"]).float().unsqueeze(2)
            hinges = (F.relu(z.unsqueeze(2) - getattr(self, f"knots_{i}").float()) * observed).flatten(1)
            parts = [z, x["numeric_missing"].float(), hinges]
            parts += [F.one_hot(x["categorical"][:, j].long(), c).float() for j, c in enumerate(cards)]
            return torch.cat(parts, 1)
        if kind == "genomics":
            return torch.cat([x["values"].float(), x["missing"].float()], 1)
        return event_summaries(x, getattr(self, f"event_codes_{i}"), cards[0])

    def design(self, inputs: dict[str, dict[str, Tensor]], present: dict[str, Tensor]) -> Tensor:
        """Shapes: -> ``[B, width]``: per modality (sorted) its block; an absent modality's block is 0 (its
        training mean)."""
        return torch.cat([self._block(i, inputs[b[0]]) * present[b[0]].float().unsqueeze(1)
                          for i, b in enumerate(self.blocks)], 1)

    def contributions(self, inputs: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        """Each modality's term of the linear predictor when present (``forward`` = bias + the present ones).

        Shapes: -> ``{m: [B, output_dim]}``."""
        return {m: F.linear(self._block(i, inputs[m]), self.weight[:, start:end].float())
                for i, (m, _, _, start, end) in enumerate(self.blocks)}

    def combine(self, contributions: dict[str, Tensor], present: dict[str, Tensor]) -> Tensor:
        """``bias + sum of the present modalities' contributions``. Shapes: -> ``[B, output_dim]``."""
        out = self.bias.float()
        for m, term in contributions.items():
            out = out + term * present[m].to(term.dtype).unsqueeze(1)
        return out

    def forward(self, inputs: dict[str, dict[str, Tensor]], present: dict[str, Tensor]) -> Tensor:
        return self.combine(self.contributions(inputs), present)

    @torch.no_grad()
    def fit(self, table: Any, task: Any, chunk: int = 4096) -> None:
        """Fit the task's penalised linear model on the rows of ``table`` (a TensorTable of training rows) and
        store its weights; an irregular series summarises its ``MAX_EVENT_CODES`` most frequent codes there."""
        for i, (m, kind, _, _, _) in enumerate(self.blocks):
            if kind == "tabular":
                z, missing = table.inputs[m]["numeric"].double(), table.inputs[m]["numeric_missing"]
                knots = getattr(self, f"knots_{i}")
                for j in range(z.shape[1]):
                    seen = z[~missing[:, j] & table.present[m], j]
                    if len(seen):
                        knots[j] = torch.quantile(seen, torch.tensor(HINGE_QUANTILES, dtype=torch.float64)).float()
            if kind == "irregular_series":
                codes = getattr(self, f"event_codes_{i}")
                counts = torch.bincount(table.inputs[m].fields["code"].long(), minlength=FIRST_EVENT_CODE + len(codes))
                counts[:FIRST_EVENT_CODE] = -1  # padding and unknown codes are no code
                codes.copy_(torch.sort(torch.argsort(counts, descending=True, stable=True)[:len(codes)]).values)
        n = len(table)
        X = torch.cat([self.design((b := table.batch(torch.arange(s, min(s + chunk, n)))).inputs, b.present)
                       for s in range(0, n, chunk)]).double().numpy()
        # BLAS threads as many as torch's: scikit-learn's solvers with more threads than the cores left to
        # them spin at every barrier (a 40,000 x 1,221 logistic fit took 158 s beside one busy core, 50 s so)
        from threadpoolctl import threadpool_limits

        with threadpool_limits(torch.get_num_threads()):
            coef, intercept = task.fit_linear(X, table.target.detach().cpu().numpy())
        self.weight.copy_(torch.as_tensor(np.asarray(coef, dtype=np.float64).reshape(self.weight.shape)))
        self.bias.copy_(torch.as_tensor(np.asarray(intercept, dtype=np.float64).reshape(self.bias.shape)))


def event_summaries(x: dict[str, Tensor], codes: Tensor, n_codes: int) -> Tensor:
    """Per code of ``codes``: its last observed value (standardised; 0 when none), whether it has one,
    log(1 + number of events), time since its last event (0 when none), from a padded irregular batch
    (events in time order within a row, as the featurizer gives them).

    Shapes: code / value / value_missing / time / mask ``[B, L]`` -> ``[B, 4 * len(codes)]``.
    """
    code, mask = x["code"].long(), x["mask"]
    b, length = code.shape
    k = len(codes)
    column = torch.full((max(n_codes, int(code.max()) + 1 if code.numel() else 1),), -1, dtype=torch.long,
                        device=code.device)
    column[codes] = torch.arange(k, device=code.device)
    j = column[code]
    valid = mask & (j >= 0)
    cell = torch.arange(b, device=code.device).unsqueeze(1) * k + j.clamp_min(0)  # [B, L]: (row, code) cell
    position = torch.arange(length, device=code.device).expand(b, length)
    count = torch.zeros(b * k, device=code.device).index_add_(0, cell[valid], torch.ones(int(valid.sum()), device=code.device))
    observed = valid & ~x["value_missing"]

    def last(where: Tensor) -> Tensor:  # the position of each cell's last event in ``where``, -1 where none
        return torch.full((b * k,), -1, dtype=torch.long, device=code.device).scatter_reduce(
            0, cell[where], position[where], "amax")

    rows = torch.arange(b, device=code.device).repeat_interleave(k)
    last_value_at, last_event_at = last(observed), last(valid)
    value = torch.where(last_value_at >= 0, x["value"].float()[rows, last_value_at.clamp_min(0)], 0.0)
    since = torch.where(last_event_at >= 0, -x["time"].float()[rows, last_event_at.clamp_min(0)], 0.0)
    parts = [value, (last_value_at >= 0).float(), torch.log1p(count), since]
    return torch.stack([p.reshape(b, k) for p in parts], 1).reshape(b, 4 * k)


def step_offsets(linear: LinearPath, inputs: dict[str, Any], present: dict[str, Tensor],
                 step_names: list[str]) -> dict[str, Tensor]:
    """Per step of a sequential head (``step_names[0]`` the initial state, then one modality a step): the
    linear path's output over the modalities read up to that step, which a step's decoded output gets.

    Shapes: -> ``{step: [B, output_dim]}``."""
    terms = linear.contributions(inputs)
    return {name: linear.combine(terms, {m: p & (m in step_names[1:k + 1]) for m, p in present.items()})
            for k, name in enumerate(step_names)}
