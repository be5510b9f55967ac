"""sklearn-style estimators over the training core.

    >>> from mmclin import MultimodalSurvivalModel
    >>> model = MultimodalSurvivalModel(modalities=[...], fusion="concat", fusion_options={"d_model": 32})  # doctest: +SKIP
    >>> model.set_params(fusion__d_model=16)  # nested names, as GridSearchCV uses them  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import copy
import math
import warnings
from typing import Any, Iterator

# numpy, polars and torch are imported where used: `from mmclin import MultimodalClassifier` stays under a second
from pydantic import ValidationError
from mmclin.config import ComponentConfig, ModelConfig, TrainerConfig, option_problems
from mmclin.interfaces.sklearn_api import EstimatorParams, check_fitted

# Nested options: ``fusion__d_model=32`` is stored in ``fusion_options["d_model"]``, and
# ``encoders__clinical__d_model=16`` in ``encoder_options["clinical"]["d_model"]``.
_NESTED = {"fusion": "fusion_options", "task": "task_options", "encoders": "encoder_options"}


class _MultimodalBase(EstimatorParams):
    _problem = ""

    def __init__(
        self,
        modalities: Any = None,
        fusion: str = "concat",
        fusion_options: dict | None = None,
        task: str | None = None,
        task_options: dict | None = None,
        encoder_options: dict | None = None,
        max_epochs: int = 100,
        batch_size: int = 64,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-4,
        modality_dropout: float = 0.1,
        ensemble_size: int = 1,
        linear_path: bool | None = None,
        val_fraction: float = 0.2,
        patience: int | None = 10,
        device: str = "auto",
        num_threads: int | None = 1,
        id_column: str | None = None,
        random_state: int | None = None,
        verbose: bool = False,
        pretrained: str | None = None,
        deterministic: bool = False,
    ) -> None:
        self.modalities = modalities
        self.fusion = fusion
        self.fusion_options = fusion_options
        self.task = task
        self.task_options = task_options
        self.encoder_options = encoder_options
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.modality_dropout = modality_dropout
        self.ensemble_size = ensemble_size
        self.linear_path = linear_path  # None: a penalised linear path beside the deep one where the task allows
        self.val_fraction = val_fraction
        self.patience = patience
        self.device = device
        self.num_threads = num_threads
        self.id_column = id_column
        self.random_state = random_state
        self.verbose = verbose
        self.pretrained = pretrained  # a `mmclin pretrain` directory the encoders start from
        self.deterministic = deterministic  # torch's deterministic algorithms (bit-identical GPU runs)

    # --- nested parameters -------------------------------------------------------------
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        params = super().get_params(deep=False)
        if deep:
            for prefix, attr in _NESTED.items():
                for key, value in _flatten(params.get(attr) or {}):
                    params[f"{prefix}__{key}"] = value
        return params

    def set_params(self, **params: Any) -> "_MultimodalBase":
        plain = {}
        for key, value in params.items():
            prefix, sep, rest = key.partition("__")
            if sep and prefix in _NESTED:
                attr = _NESTED[prefix]
                options = copy.deepcopy(getattr(self, attr) or {})
                node = options
                *path, leaf = rest.split("__")
                for p in path:
                    node = node.setdefault(p, {})
                node[leaf] = value
                setattr(self, attr, options)
            else:
                plain[key] = value
        if plain:
            super().set_params(**plain)
        return self

    # --- the core ------------------------------------------------------------------------
    def _task_name(self, y: Any) -> str:
        raise NotImplementedError

    def _configs(self, y: Any) -> tuple[ModelConfig, TrainerConfig, ComponentConfig]:
        from mmclin.registry import FUSIONS, TASKS, load_builtin_components

        load_builtin_components()
        if self.fusion not in FUSIONS:
            raise ValueError(f"The 'fusion' parameter of {type(self).__name__} must be one of {FUSIONS.names()}. "
                             f"Got {self.fusion!r} instead.")
        task_name = self._task_name(y)
        if task_name not in TASKS:
            raise ValueError(f"The 'task' parameter of {type(self).__name__} must be one of {TASKS.names()}. "
                             f"Got {task_name!r} instead.")
        found = [(f"fusion_options.{k}", v) for k, v in (self.fusion_options or {}).items()]
        found += [(f"encoder_options.{m}.{k}", v) for m, options in (self.encoder_options or {}).items()
                  if isinstance(options, dict) for k, v in options.items()]
        problems = option_problems(found)
        if problems:
            param = problems[0].split(".")[0]
            raise ValueError(f"The {param!r} parameter of {type(self).__name__} is invalid: " + "; ".join(problems))
        name = type(self).__name__
        with _parameters(name, "fusion_options"):
            fusion = ComponentConfig(name=self.fusion, **(self.fusion_options or {}))
        with _parameters(name, "task_options"):
            task = ComponentConfig(name=task_name, **(self.task_options or {}))
        with _parameters(name):
            model = ModelConfig(
                fusion=fusion,
                encoders=self.encoder_options or {},
                modality_dropout=self.modality_dropout,
                ensemble_size=self.ensemble_size,
                linear_path=self.linear_path,
                pretrained=None if self.pretrained is None else str(self.pretrained),
            )
            trainer = TrainerConfig(
                max_epochs=self.max_epochs, batch_size=self.batch_size, learning_rate=self.learning_rate,
                weight_decay=self.weight_decay, val_fraction=self.val_fraction, patience=self.patience,
                device=self.device, num_threads=self.num_threads,
                seed=0 if self.random_state is None else self.random_state, progress_bar=self.verbose,
                deterministic=self.deterministic,
            )
        return model, trainer, task

    def fit(self, X: Any, y: Any, checkpoint_dir: str | None = None, resume: bool = False) -> "_MultimodalBase":
        """Train on ``X`` (one row per subject) and ``y``.

        ``checkpoint_dir``: checkpoint every epoch there (removed once the fit succeeds);
        ``resume=True`` continues an interrupted fit of the same data and parameters from it,
        ending exactly as the uninterrupted fit would have on CPU (docs/reliability.md).
        """
        from mmclin.training.core import checkpoint_store, fit_model

        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs the checkpoint_dir of the interrupted fit")
        model, trainer, task = self._configs(y)
        store = None if checkpoint_dir is None else checkpoint_store(
            checkpoint_dir, X, y, self.modalities, model, trainer, task, resume)
        self.model_ = fit_model(X, y, self.modalities, model, trainer, task, id_column=self.id_column, checkpoints=store)
        if store is not None:
            store.clear()
        self.task_ = self.model_.task
        self.history_ = self.model_.history
        self.n_features_in_ = sum(len(s.columns) for s in self.model_.specs)
        return self

    def _outputs(self, X: Any) -> np.ndarray:
        import numpy as np
        check_fitted(self, "model_")
        return self.model_.predict_outputs(X)

    def predict(self, X: Any) -> np.ndarray:
        import numpy as np
        outputs = self._outputs(X)  # first: an unfitted estimator raises NotFittedError
        return self.task_.predict(outputs)

    def _scored_targets(self, y: Any, outputs: np.ndarray) -> Any:
        """``y`` checked by the task, with as many rows as ``X`` had (never a metric of misaligned rows)."""
        import numpy as np
        y = self.task_.check_targets(y)
        if self.task_.n_rows(y) != len(outputs):
            raise ValueError(f"X has {len(outputs)} rows but y has {self.task_.n_rows(y)}")
        return y

    def score(self, X: Any, y: Any) -> float:
        """The task's primary metric (Harrell's C for survival); NaN, said, where ``y`` is too small to support it."""
        outputs = self._outputs(X)
        y = self._scored_targets(y, outputs)
        return self._supported(y, self.task_.primary_metric, lambda: float(self.task_.score(y, outputs)))

    def _supported(self, y: Any, metric: str, compute: Any) -> float:
        """``compute()``, or NaN with an ``UndefinedMetricWarning`` when ``y`` has too few subjects or events for
        ``metric`` (the thresholds of ``reported_metrics``, so ``score`` and ``metrics`` agree)."""
        from mmclin.tasks.base import Metrics

        reason = self.task_.undefined_metrics(y).get(metric)
        if reason is None:
            return compute()
        return Metrics({metric: math.nan}).mark_undefined([metric], reason)[metric]

    def metrics(self, X: Any, y: Any, y_train: Any = None) -> dict[str, float]:
        """All the task's metrics (e.g. Harrell's and Uno's C, integrated Brier score)."""
        outputs = self._outputs(X)
        return self.task_.reported_metrics(self._scored_targets(y, outputs), outputs, y_train=y_train)

    def predict_per_step(self, X: Any) -> Any:
        """Predictions after every step of a sequential fusion head (``sequential_modular``):
        a polars frame with one row per subject and step (see ``FittedModel.predict_per_step``)."""
        check_fitted(self, "model_")
        return self.model_.predict_per_step(X)

    def missing_report(self, X: Any, y: Any, y_train: Any = None, **options: Any) -> Any:
        """Metrics on ``X, y`` under every modality subset and MCAR/MAR/MNAR missingness shifts:
        a :class:`mmclin.evaluation.robustness.MissingReport` (``options``: see ``mmclin.evaluation.robustness.missing_report``)."""
        from mmclin.evaluation.robustness import missing_report

        check_fitted(self, "model_")
        return missing_report(self.model_, X, y, y_train=y_train, **options)

    def explain(self, X: Any, **options: Any) -> Any:
        """Which modality and which feature drove each prediction: an :class:`mmclin.explain.Explanation`
        (modality Shapley values, Integrated Gradients; ``options``: see :func:`mmclin.explain.explain`,
        e.g. ``horizon=1825`` for survival at a time, ``levels=("modality",)``)."""
        from mmclin.explain import explain

        check_fitted(self, "model_")
        options.setdefault("num_threads", self.num_threads)
        return explain(self.model_, X, **options)

    def compare_to_baselines(self, X: Any, y: Any, cv: int = 5, groups: Any = None, baselines: list[str] | None = None,
                             split_seed: int = 0) -> Any:
        """Cross-validate a fresh clone of this estimator on ``cv`` subject-level folds and fit the classical
        baselines (:mod:`mmclin.evaluation.baselines`) on the same folds and columns: a
        :class:`~mmclin.evaluation.baselines.BaselineComparison` (``.table()``, ``.summary_line()``) with
        mmclin's paired difference to the best baseline. This estimator itself is left as it is."""
        import numpy as np
        from sklearn.base import clone

        from mmclin.cohort import as_modality_specs, to_polars
        from mmclin.evaluation.baselines import check_baselines, compare, fit_baselines, task_scores
        from mmclin.training.core import build_task
        from mmclin.training.splits import cv_splits

        frame = to_polars(X)
        task = build_task(self._configs(y)[2])
        y_checked = task.check_targets(y)
        specs = as_modality_specs(self.modalities)
        check_baselines(specs, task.problem, baselines)
        splits = list(cv_splits(y_checked, task.problem, cv, split_seed, None if groups is None else np.asarray(groups)))
        scores = []
        for tr, te in splits:
            member = clone(self).fit(frame[tr], task.take_rows(y_checked, tr))
            scores.append(task_scores(member.task_, member.model_.predict_outputs(frame[te])))
        fitted = fit_baselines(frame, y_checked, specs, task.problem, splits,
                               0 if self.random_state is None else int(self.random_state), baselines)
        return compare(task.problem, task.primary_metric, y_checked, splits, scores, fitted, seed=split_seed)

    def save(self, path: str) -> str:
        check_fitted(self, "model_")
        return str(self.model_.save(path))


def _flatten(options: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in options.items():
        if isinstance(v, dict) and v and prefix == "" and k not in ("groups",) and all(isinstance(x, str) for x in v):
            # one level of nesting for per-modality encoder options
            out += [(f"{k}__{kk}", vv) for kk, vv in v.items()]
        else:
            out.append((f"{prefix}{k}", v))
    return out


class MultimodalSurvivalModel(_MultimodalBase):
    """Survival over several modalities. ``y``: scikit-survival structured array ``(event, time)``.

    ``task``: ``"cox"`` (partial likelihood, Breslow baseline) or ``"discrete_time"`` (hazard per bin).
    ``predict`` gives risk scores (higher = earlier event); ``score`` is Harrell's C.
    """

    _problem = "survival"

    def _task_name(self, y: Any) -> str:
        return self.task or "cox"

    def predict_survival_function(self, X: Any, times: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """``(times, S)`` with ``S[i, j]`` = P(T_i > times[j])."""
        import numpy as np
        outputs = self._outputs(X)
        return self.task_.survival_function(outputs, times)

    def predict_cumulative_hazard_function(self, X: Any, times: Any = None) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np
        t, s = self.predict_survival_function(X, times)
        return t, -np.log(np.clip(s, 1e-12, 1.0))


class MultimodalClassifier(_MultimodalBase):
    """Binary, multiclass or (with a 2-D 0/1 ``y``) multilabel classification."""

    _problem = "classification"
    _estimator_type = "classifier"

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """Accuracy of ``predict`` (scikit-learn's classifier ``score``); ``metrics`` gives AUROC and the rest."""
        from sklearn.metrics import accuracy_score

        return float(accuracy_score(y, self.predict(X), sample_weight=sample_weight))

    def _task_name(self, y: Any) -> str:
        import numpy as np
        if self.task:
            return self.task
        arr = np.asarray(y)
        if arr.ndim == 2 and arr.shape[1] == 1:
            # scikit-learn's reading of a column vector (its DataConversionWarning): one label per row
            warnings.warn(f"y is a column vector (shape {arr.shape}); it is taken as one label per row (binary or "
                          "multiclass). Pass a 1-D y to silence this, or task='multilabel' for one 0/1 label",
                          UserWarning, stacklevel=3)
            arr = arr[:, 0]
        elif arr.ndim == 2:
            return "multilabel"
        if arr.dtype.kind == "f":
            fractional = np.flatnonzero(~np.isnan(arr) & (arr != np.round(arr)))
            if len(fractional):
                row = int(fractional[0])
                raise ValueError(f"y holds continuous values ({len(fractional)} of {len(arr)} are not whole numbers, the "
                                 f"first {arr[row]:g} at row {row}), not class labels; {type(self).__name__} needs "
                                 "labels (use MultimodalRegressor for a continuous outcome)")
        return "binary" if len(np.unique(arr[~_isnull(arr)])) <= 2 else "multiclass"

    def fit(self, X: Any, y: Any, checkpoint_dir: str | None = None, resume: bool = False) -> "MultimodalClassifier":
        import numpy as np
        super().fit(X, y, checkpoint_dir, resume)
        if hasattr(self.task_, "classes_"):
            self.classes_ = np.asarray(self.task_.classes_)
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        import numpy as np
        outputs = self._outputs(X)
        return self.task_.predict_proba(outputs)


class MultimodalRegressor(_MultimodalBase):
    """Regression of a continuous outcome; targets are standardised on training rows."""

    _problem = "regression"
    _estimator_type = "regressor"

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """R² of ``predict`` (scikit-learn's regressor ``score``)."""
        from sklearn.metrics import r2_score

        predictions = self.predict(X)
        return self._supported(y, "r2", lambda: float(r2_score(y, predictions, sample_weight=sample_weight)))

    def _task_name(self, y: Any) -> str:
        return self.task or "regression"


# config fields whose estimator parameter has another name
_PARAMETER_OF = {"seed": "random_state", "progress_bar": "verbose", "encoders": "encoder_options"}


@contextlib.contextmanager
def _parameters(estimator: str, parameter: str | None = None) -> Iterator[None]:
    """pydantic's error on a parameter in scikit-learn's template: "The 'max_epochs' parameter of
    MultimodalClassifier must be greater than or equal to 1. Got -1 instead." (``parameter``: the estimator
    parameter the whole block builds from; else the config field that failed names it)."""
    try:
        yield
    except ValidationError as err:
        first = err.errors()[0]
        loc = [str(x) for x in first["loc"]]
        name = parameter or (_PARAMETER_OF.get(loc[0], loc[0]) if loc else "?")
        rule = first["msg"].replace("Input should be", "must be", 1)
        if not rule.startswith("must"):
            rule = f"is invalid ({rule})"
        where = f" ({'.'.join(loc)})" if parameter and loc else ""
        raise ValueError(f"The {name!r} parameter of {estimator}{where} {rule}. Got {first.get('input')!r} "
                         "instead.") from None


def _isnull(arr: np.ndarray) -> np.ndarray:
    import numpy as np
    if arr.dtype.kind == "f":
        return np.isnan(arr)
    return np.array([v is None for v in arr.ravel()], dtype=bool).reshape(arr.shape)
