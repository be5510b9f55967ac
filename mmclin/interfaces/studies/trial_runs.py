"""One trial as a nested MLflow run under the study's parent run."""
from __future__ import annotations

import math
import os
import time
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from mmclin.interfaces.studies.results import state_name
from mmclin.interfaces.studies.workers import HOST


# --- MLflow ----------------------------------------------------------------------------------------
class _TrialRun:
    """One trial as a nested MLflow run (created through the client: no global active run);
    per-epoch metrics are buffered and written in batches."""

    def __init__(self, client: Any, experiment_id: str, parent_id: str, study_name: str, trial: optuna.Trial,
                 params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        tags = {"mlflow.parentRunId": parent_id, "mmclin.verb": "tune-trial", "mmclin.study": study_name,
                "optuna.trial_number": str(trial.number), "mmclin.host": HOST, "mmclin.pid": str(os.getpid())}
        self.client = client
        self.run_id = client.create_run(experiment_id, run_name=f"trial-{trial.number}", tags=tags).info.run_id
        batch = [Param(k, str(v)[:500]) for k, v in params.items()] + [Param("trial_number", str(trial.number))]
        client.log_batch(self.run_id, params=batch)
        self._buffer: list[Any] = []

    def sink(self, prefix: str) -> Callable[[dict[str, float], int], None]:
        from mlflow.entities import Metric

        def add(metrics: dict[str, float], step: int) -> None:
            now = int(time.time() * 1000)
            self._buffer += [Metric(f"{prefix}{k}", float(v), now, int(step)) for k, v in metrics.items()
                             if v is not None and math.isfinite(v)]

        return add

    def log(self, metrics: dict[str, float], step: int = 0) -> None:
        self.sink("")(metrics, step)

    def flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def end(self, state: TrialState, error: str | None = None) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag("mmclin.state", state_name(state))] + ([RunTag("mmclin.error", error[:4000])] if error else [])
        chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
        self.flush()
        self.client.log_batch(self.run_id, metrics=chunk, tags=tags)  # one write for the last metrics and the state
        status = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED"}.get(state, "FAILED")
        self.client.set_terminated(self.run_id, status=status)
