"""Turn raw task outputs into a tidy prediction frame (one row per subject)."""
from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from mmclin.cohort import to_polars


def prediction_columns(task: Any, outputs: np.ndarray) -> dict[str, Any]:
    """Named prediction columns for a task's raw outputs."""
    pred = task.predict(outputs)
    problem = task.problem
    if isinstance(pred, dict):  # multitask: one block per sub-task
        cols: dict[str, Any] = {}
        for name, sub in sorted(task.tasks.items()):
            sl = task.slices[name] if hasattr(task, "slices") else None
            sub_out = outputs[:, sl] if sl is not None else outputs
            cols.update({f"{name}/{k}": v for k, v in prediction_columns(sub, sub_out).items()})
        return cols
    if problem == "survival":
        return {"risk": np.asarray(pred, dtype=float)}
    if problem == "regression":
        return {"prediction": np.asarray(pred, dtype=float)}
    cols = {}
    proba = task.predict_proba(outputs)
    names = [str(c) for c in getattr(task, "classes_", getattr(task, "labels_", range(proba.shape[1])))]
    for j, name in enumerate(names):
        cols[f"proba_{name}"] = proba[:, j]
    if problem == "multilabel":
        pred = np.asarray(pred)
        for j, name in enumerate(names):
            cols[f"label_{name}"] = pred[:, j].astype(int)
    else:
        cols["prediction"] = np.asarray(pred).astype(str) if np.asarray(pred).dtype.kind in "OU" else np.asarray(pred)
    return cols


def prediction_frame(fitted: Any, frame: Any, id_column: str | None = None) -> pl.DataFrame:
    frame = to_polars(frame)
    outputs = fitted.predict_outputs(frame)
    cols = prediction_columns(fitted.task, outputs)
    out = pl.DataFrame({k: np.asarray(v) for k, v in cols.items()})
    id_column = id_column or fitted.id_column
    if id_column and id_column in frame.columns:
        out = out.insert_column(0, frame[id_column])
    return out
