"""What a study gives back: the result object, the trials table, the study plots and the list of studies."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import polars as pl
from optuna.trial import TrialState

from mmclin.interfaces.studies.storage import _file_of, open_storage

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def state_name(state: TrialState) -> str:
    """complete, pruned, failed, running, waiting: the trial states as MLflow tags and tables show them."""
    return "failed" if state == TrialState.FAIL else state.name.lower()


# --- results ---------------------------------------------------------------------------------------
@dataclass
class StudyResult:
    study_name: str
    storage: str  # redacted
    metric: str
    direction: str
    n_complete: int
    n_pruned: int
    n_failed: int
    best_value: float | None
    best_params: dict[str, Any]
    best_trial: int | None
    baseline_value: float | None  # the config's own values (the enqueued first trial)
    test_metrics: dict[str, float] | None  # the refit, scored once on the test subjects
    model_dir: Path | None
    parent_run_id: str | None
    trials: pl.DataFrame
    timings: list[dict[str, Any]] = field(default_factory=list)  # this worker's trials
    refit_by_this_worker: bool = False
    seconds: float = 0.0


def retry_of(trial: optuna.trial.FrozenTrial | optuna.Trial) -> int | None:
    """The number of the failed trial whose values this trial runs again (Optuna's ``retry_history``), or None."""
    system_attrs = trial.system_attrs if isinstance(trial, optuna.trial.FrozenTrial) else trial.storage.get_trial_system_attrs(trial._trial_id)
    history = system_attrs.get("retry_history") or []
    return history[-1] if history else None


def trials_frame(study: optuna.Study) -> pl.DataFrame:
    """One row per trial: number, state, value, seconds, baseline / retry markers, error, params."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        secs = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        rows.append({"number": t.number, "state": state_name(t.state), "value": t.value,
                     "seconds": secs, "baseline": bool(t.user_attrs.get("mmclin.baseline", False)),
                     "retry_of": retry_of(t), "error": t.user_attrs.get("mmclin.error"),
                     "params": json.dumps(t.params, sort_keys=True, default=str)})
    schema = {"number": pl.Int64, "state": pl.String, "value": pl.Float64, "seconds": pl.Float64, "baseline": pl.Boolean,
              "retry_of": pl.Int64, "error": pl.String, "params": pl.String}
    return pl.DataFrame(rows, schema=schema)


def save_study_plots(study: optuna.Study, out_dir: str | Path) -> dict[str, str]:
    """Optimisation history and parameter importances (Optuna's matplotlib backend) as PNGs;
    returns ``{file: note}`` for plots that could not be drawn (e.g. one complete trial)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization.matplotlib import (
        plot_optimization_history,
        plot_param_importances,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes = {}
    plots = {"optimization_history.png": lambda: plot_optimization_history(study),
             "param_importances.png": lambda: plot_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))}
    for name, draw in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ax = draw()
            except (ValueError, RuntimeError, ZeroDivisionError) as err:
                notes[name] = f"not drawn: {err}"
                continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
    return notes


def _baseline_value(study: optuna.Study) -> float | None:
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.user_attrs.get("mmclin.baseline"):
            return t.value
    return None


# --- listing -----------------------------------------------------------------------------------------
def list_studies(storage: str) -> pl.DataFrame:
    """One row per study in ``storage``: trials by state, best and baseline values, the refit's test metric."""
    path = _file_of(storage)
    if path is not None and not path.exists():
        raise FileNotFoundError(f"no study storage at {str(path)!r} (run `mmclin tune CONFIG` first, or pass --storage)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = open_storage(storage)
    rows = []
    for s in optuna.get_all_study_summaries(st, include_best_trial=False):
        study = optuna.load_study(study_name=s.study_name, storage=st)
        trials = study.get_trials(deepcopy=False)
        count = {state: sum(t.state == state for t in trials) for state in TrialState}
        metric = s.user_attrs.get("mmclin.metric", "")
        refit = s.user_attrs.get("mmclin.refit") or {}
        best = study.best_trial if count[TrialState.COMPLETE] and len(study.directions) == 1 else None
        rows.append({
            "study": s.study_name, "metric": metric, "direction": "/".join(d.name.lower() for d in study.directions),
            "complete": count[TrialState.COMPLETE], "pruned": count[TrialState.PRUNED], "failed": count[TrialState.FAIL],
            "running": count[TrialState.RUNNING] + count[TrialState.WAITING],
            "best_trial": best.number if best else None, "best_value": best.value if best else None,
            "baseline_value": _baseline_value(study),
            "test_value": (refit.get("test") or {}).get(metric) if refit.get("status") == "done" else None,
            "started": s.datetime_start.strftime("%Y-%m-%d %H:%M") if s.datetime_start else "",
        })
    return pl.DataFrame(rows) if rows else pl.DataFrame(schema={"study": pl.String})
