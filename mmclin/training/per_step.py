"""Per-step predictions of sequential fusion heads: how each modality moved a prediction.

A sequential head (``sequential_modular``; ``cascaded_transformer`` trained with a step loss)
keeps a state after every step; the task head decodes each of them. The result is a tidy
polars frame with one row per subject and step.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import torch

from mmclin.cohort import to_polars
from mmclin.fusion.steps import INITIAL_STEP
from mmclin.training.linear_path import step_offsets


def _members(net: Any) -> list[Any]:
    return list(net.members) if hasattr(net, "members") else [net]


def check_decodable(fitted: Any) -> list[str]:
    """The head's step names, or a ValueError saying which heads give per-step predictions."""
    fusion = _members(fitted.net)[0].fusion
    name = getattr(type(fusion), "registry_name", type(fusion).__name__)
    if not getattr(fusion, "per_step_decodable", False):
        raise ValueError(
            f"per-step predictions need a fusion head whose intermediate states the task head is trained to "
            f"decode: 'sequential_modular', or 'cascaded_transformer' with step_loss_weight > 0; this model's "
            f"fusion head is {name!r}" + (" with step_loss_weight 0" if name == "cascaded_transformer" else "")
        )
    return list(fusion.step_names())


@torch.no_grad()
def per_step_outputs(fitted: Any, table: Any, batch_size: int = 1024) -> tuple[list[str], np.ndarray]:
    """Raw task outputs decoded from every step's state, averaged over ensemble members.

    Shapes:
        returns ``(step_names [S], outputs [S, N, task.output_dim])``.
    """
    steps = check_decodable(fitted)
    members = _members(fitted.net)
    n = len(table)
    total = np.zeros((len(steps), n, fitted.task.output_dim))
    for member in members:
        member.eval()
        device = next(member.parameters()).device
        for start in range(0, n, batch_size):
            b = table.batch(torch.arange(start, min(start + batch_size, n))).to(device)
            fused = member.fusion(member.encode(b.inputs, b.present), b.present)
            offsets = None
            if getattr(member, "linear", None) is not None:  # the linear path's terms of the modalities read so far
                offsets = step_offsets(member.linear, b.inputs, b.present, steps)
            for k, name in enumerate(steps):
                out = member.head(fused.per_step[name]).float()
                if offsets is not None:
                    out = out + offsets[name].float()
                total[k, start:start + b.batch_size] += out.cpu().numpy()
    return steps, total / len(members)


def per_step_predictions(fitted: Any, frame: Any, id_column: str | None = None, batch_size: int = 1024) -> pl.DataFrame:
    """One row per subject and step: ``[id or row], step, modality, present``, then the task's
    prediction columns (``risk``; ``proba_<class>`` + ``prediction``; ``<sub-task>/...`` for a
    multitask) decoded from the state after that step.

    Step 0 is the initial state (no modality read yet: ``modality`` and ``present`` are null);
    step ``k`` follows modality ``modality``. Where ``present`` is False the modality was
    skipped for that subject and its predictions equal those of step ``k - 1``.
    """
    from mmclin.training.predictions import prediction_columns

    frame = to_polars(frame)
    table = fitted.table(frame)
    steps, outputs = per_step_outputs(fitted, table, batch_size)
    n = len(table)
    id_column = id_column or fitted.id_column
    key = frame[id_column] if id_column and id_column in frame.columns else pl.Series("row", np.arange(n))
    parts = []
    for k, name in enumerate(steps):
        initial = name == INITIAL_STEP
        cols = prediction_columns(fitted.task, outputs[k])
        part = pl.DataFrame({
            key.name: key,
            "step": pl.Series("step", [k] * n, dtype=pl.Int32),
            "modality": pl.Series("modality", [None if initial else name] * n, dtype=pl.String),
            "present": pl.Series("present", [None] * n if initial else table.present[name].numpy(), dtype=pl.Boolean),
            **{c: np.asarray(v) for c, v in cols.items()},
        })
        parts.append(part.with_row_index("_row"))
    return pl.concat(parts).sort("_row", "step").drop("_row")
