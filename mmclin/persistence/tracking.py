"""MLflow: run lifecycle, what is logged, and a pyfunc wrapper that predicts from a frame.

Default store is embedded: a local SQLite file (``sqlite:///mlruns.db``) with artifacts in
``./mlartifacts``; ``uri`` can point at an MLflow server instead.
"""
from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

from mmclin.config import ExperimentConfig, TrackingConfig, config_to_yaml
from mmclin.persistence.processes import process_alive

DEFAULT_URI = TrackingConfig.model_fields["uri"].default  # where `mmclin fit` records runs by default
# MLflow 3's UI opens an experiment on its GenAI "Traces" page unless the experiment says it holds models
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def open_store(uri: str | None = None) -> str:
    """Point MLflow at an existing store to read runs from (default: ``fit``'s, ``sqlite:///mlruns.db``).
    A SQLite file that does not exist is an error, not a new empty store made by accident."""
    import mlflow

    uri = uri or DEFAULT_URI
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise FileNotFoundError(f"no MLflow store at {uri!r} (mmclin fit writes runs there by default); "
                                "pass --tracking-uri where the run was logged")
    mlflow.set_tracking_uri(uri)
    return uri


class TrackingStoreError(ValueError):
    """The MLflow store cannot be used (locked, not a database, not writable): one line naming the store."""


def _store_problem(uri: str, err: BaseException) -> TrackingStoreError | None:
    """A clear error for an MLflow / SQLAlchemy / OS error about the store at ``uri``; None when ``err`` is not one."""
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover
        MlflowException = ()  # type: ignore[assignment]  # noqa: N806
    try:
        from sqlalchemy.exc import SQLAlchemyError
    except ImportError:  # pragma: no cover
        SQLAlchemyError = ()  # type: ignore[assignment]  # noqa: N806
    if not isinstance(err, (MlflowException, SQLAlchemyError, OSError)):
        return None
    text = str(getattr(err, "message", None) or err)
    fix = "pass --no-tracking (tracking.enabled: false) or another --tracking-uri (tracking.uri)"
    if "database is locked" in text:
        why = "it is locked by another process that holds a write on it (another fit, mlflow ui or sqlite3 shell?)"
        fix = "wait for it to finish, or " + fix
    elif "file is not a database" in text:
        why = "the file is not an SQLite database"
    elif "readonly database" in text or "unable to open database file" in text or isinstance(err, PermissionError):
        why = "it cannot be written (a read-only file or directory?)"
    elif isinstance(err, OSError) and err.errno is not None:
        why = f"{os.strerror(err.errno)}" + (f" ({err.filename!r})" if err.filename else "")
    else:
        why = text.splitlines()[0][:300] if text else type(err).__name__
    return TrackingStoreError(f"MLflow store {redact_uri(uri)!r} cannot be used: {why}; {fix}")


def redact_uri(uri: str) -> str:
    """``uri`` without a password (``postgresql://user:***@host/db``)."""
    import re

    return re.sub(r"(//[^:/@]+:)[^@]*@", r"\1***@", uri)


def _check_sqlite_file(uri: str) -> None:
    """A ``sqlite:///`` store whose file exists but is not a database is refused before MLflow touches it."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri[len("sqlite:///"):])
    if db.is_file() and db.stat().st_size > 0:
        with open(db, "rb") as f:
            head = f.read(16)
        if head != b"SQLite format 3\x00":
            raise TrackingStoreError(f"MLflow store {uri!r} cannot be used: {str(db)!r} is not an SQLite database "
                                     "(mmclin never overwrites it); pass another --tracking-uri (tracking.uri) or "
                                     "--no-tracking")
    elif db.is_dir():
        raise TrackingStoreError(f"MLflow store {uri!r} cannot be used: {str(db)!r} is a directory; name a file, "
                                 "e.g. sqlite:///mlruns.db")


def _setup(cfg: TrackingConfig) -> str:
    import mlflow

    _check_sqlite_file(cfg.uri)

    mlflow.set_tracking_uri(cfg.uri)
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is None:
        artifact_location = None
        if cfg.uri.startswith("sqlite:///"):
            # keep artifacts beside the database, not in whatever directory MLflow defaults to
            db = Path(cfg.uri[len("sqlite:///"):])
            artifact_location = (db.resolve().parent / "mlartifacts").as_uri()
        return mlflow.create_experiment(cfg.experiment, artifact_location=artifact_location, tags=EXPERIMENT_KIND)
    if "mlflow.experimentKind" not in exp.tags:
        mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
    return exp.experiment_id


@contextlib.contextmanager
def tracked_run(cfg: TrackingConfig, run_name: str | None = None, nested: bool = False,
                tags: dict[str, str] | None = None, resume_run_id: str | None = None) -> Iterator[Any]:
    """An MLflow run (or ``None`` when tracking is disabled); failed runs end as FAILED.

    ``resume_run_id``: reopen that run (an interrupted run being resumed) when the store still has it.
    """
    if not cfg.enabled:
        yield None
        return
    import mlflow

    try:
        experiment_id = _setup(cfg)
        if not nested:
            mark_dead_runs_killed(experiment_id)
    except Exception as err:
        problem = _store_problem(cfg.uri, err)
        if problem is None or isinstance(err, TrackingStoreError):
            raise
        raise problem from None
    owner = {"mmclin.host": socket.gethostname(), "mmclin.pid": str(os.getpid())}
    all_tags = {**owner, **(tags or {})}
    if resume_run_id is not None:
        from mlflow.exceptions import MlflowException

        try:
            mlflow.MlflowClient().get_run(resume_run_id)
        except MlflowException:
            import logging

            logging.getLogger("mmclin").warning("MLflow run %s of the interrupted run is not in %s; logging to a new run",
                                                resume_run_id, cfg.uri)
            all_tags["mmclin.resumed_from"] = resume_run_id
            resume_run_id = None
        else:
            all_tags["mmclin.resumed"] = "true"
    try:
        with mlflow.start_run(run_id=resume_run_id, experiment_id=None if resume_run_id else experiment_id,
                              run_name=None if resume_run_id else run_name, nested=nested, tags=all_tags) as run:
            yield run
    except Exception as err:  # MLflow's own errors while logging say which store; the user's errors pass as they are
        from mlflow.exceptions import MlflowException

        try:
            from sqlalchemy.exc import SQLAlchemyError
        except ImportError:  # pragma: no cover
            SQLAlchemyError = MlflowException  # type: ignore[misc,assignment]  # noqa: N806
        if not isinstance(err, (MlflowException, SQLAlchemyError)):
            raise
        raise _store_problem(cfg.uri, err) from err


def mark_dead_runs_killed(experiment_id: str) -> list[str]:
    """Runs left RUNNING by a process of this host that no longer exists (e.g. SIGKILL) become KILLED."""
    import mlflow

    client = mlflow.MlflowClient()
    host = socket.gethostname()
    killed = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        if tags.get("mmclin.host") != host or not tags.get("mmclin.pid", "").isdigit():
            continue
        if not process_alive(int(tags["mmclin.pid"])):
            client.set_terminated(run.info.run_id, status="KILLED")
            killed.append(run.info.run_id)
    return killed




def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            out[key] = ",".join(str(x.get("name", i)) for i, x in enumerate(v))
        else:
            out[key] = v
    return out


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("mmclin", "torch", "lightning", "torch-geometric", "scikit-survival", "scikit-learn", "polars",
                 "numpy", "optuna", "mlflow", "captum"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def frame_fingerprint(frame: Any) -> str:
    """SHA-256 over the frame's schema and row hashes (polars' row hash, stable for one polars version)."""
    import hashlib

    h = hashlib.sha256(str(frame.schema).encode())
    h.update(frame.hash_rows(seed=0).to_numpy().tobytes())
    return h.hexdigest()


def log_config(cfg: ExperimentConfig, frame: Any = None) -> None:
    """Params, the resolved config, package versions and (given the frame) a hash of the input data."""
    import json

    import mlflow

    params = flatten(cfg.model_dump(mode="json", exclude={"data": {"modalities"}}))
    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
    mlflow.log_text(config_to_yaml(cfg), "config.yaml")
    versions = package_versions()
    mlflow.log_text(json.dumps(versions, indent=1), "versions.json")
    tags = {f"version.{k}": v for k, v in versions.items()}
    if frame is not None:
        tags["data.sha256"] = frame_fingerprint(frame)
        tags["data.rows"] = str(frame.height)
    mlflow.set_tags(tags)


def epoch_logger(prefix: str = ""):
    """A sink for per-epoch metrics from the training core."""
    import mlflow

    def sink(metrics: dict[str, float], epoch: int) -> None:
        mlflow.log_metrics({f"{prefix}{k}": v for k, v in metrics.items()}, step=epoch)

    return sink


def log_metrics(metrics: dict[str, float], prefix: str = "") -> None:
    import math

    import mlflow

    mlflow.log_metrics({f"{prefix}{k}": v for k, v in metrics.items() if v is not None and not math.isnan(v)})


def log_frame(frame: Any, name: str) -> None:
    """Log a polars frame as a parquet artifact."""
    import mlflow

    folder, _, base = name.rpartition("/")  # "baselines/folds.parquet": a file in an artifact folder
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / base
        frame.write_parquet(path)
        mlflow.log_artifact(str(path), artifact_path=folder or None)


def quiet_mlflow() -> None:
    """MLflow's alembic migrations log at INFO on every new SQLite store; keep the CLI readable."""
    import logging

    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent", "mlflow.pyfunc", "mlflow.models.model"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # a database error is raised to mmclin, which says it in one line naming the store (tracked_run): MLflow's own
    # ERROR record of it, with the SQL and a traceback, would only bury that line
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
