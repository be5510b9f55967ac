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


def check_finite_outputs(outputs: np.ndarray, where: str = "the frame") -> np.ndarray:
    """Raw outputs with a non-finite value are refused, naming the rows: never a NaN prediction written silently."""
    bad = np.flatnonzero(~np.isfinite(np.asarray(outputs, dtype=np.float64)).all(axis=-1)) if np.size(outputs) else []
    if len(bad):
        raise ValueError(f"{len(bad)} row(s) of {where} got a non-finite prediction, the first at row {int(bad[0])}: "
                         "their inputs are far outside what the model was trained on, or the model's weights are damaged")
    return outputs


def prediction_frame(fitted: Any, frame: Any, id_column: str | None = None) -> pl.DataFrame:
    """One row per row of ``frame``: the id column (``id_column``, else the model's when the frame has it)
    and the task's prediction columns. An ``id_column`` the frame lacks is an error, not a frame without ids."""
    frame = to_polars(frame)
    if id_column is not None and id_column not in frame.columns:
        import difflib

        close = difflib.get_close_matches(id_column, frame.columns, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; columns are {frame.columns[:10]}"
        raise ValueError(f"id column {id_column!r} is not in the data{hint}")
    outputs = check_finite_outputs(fitted.predict_outputs(frame))
    cols = prediction_columns(fitted.task, outputs)
    out = pl.DataFrame({k: np.asarray(v) for k, v in cols.items()})
    id_column = id_column or fitted.id_column
    if id_column and id_column in frame.columns:
        ids = frame[id_column]
        if ids.null_count():
            raise ValueError(f"id column {id_column!r} is null in {ids.null_count()} row(s), the first at row "
                             f"{int(ids.is_null().arg_max())}: every prediction needs its subject's id")
        n_repeated = ids.len() - ids.n_unique()
        if n_repeated:
            import logging

            logging.getLogger("mmclin").warning("id column %r: %d row(s) repeat an earlier row's id; each row gets its "
                                                "own prediction", id_column, n_repeated)
        if id_column in out.columns:
            raise ValueError(f"id column {id_column!r} has the name of a prediction column ({out.columns}); rename it")
        out = out.insert_column(0, ids)
    return out
