"""Classification tasks: ``binary``, ``multiclass`` and ``multilabel``.

Targets are encoded as float ``[N, 1]`` class indices (binary, multiclass) or a float
``[N, K]`` 0/1 matrix (multilabel), so that a multitask can stack them with other targets.
Metrics come from scikit-learn; one that is undefined for the data given (e.g. AUROC when
``y_true`` holds one class only) is NaN rather than an error.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import expit, softmax
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    log_loss,
    roc_auc_score,
)
from torch import Tensor

from mmclin.registry import TASKS
from mmclin.tasks.base import MIN_PER_CLASS, Task, safe_metric, shown

_NAN = float("nan")


def _one_vs_rest(y: np.ndarray, scores: np.ndarray, metric: Any) -> list[float]:
    """Per-column ``metric(y[:, k], scores[:, k])``, NaN where column k of ``y`` holds one class.

    Shapes:
        y ``[N, K]`` 0/1, scores ``[N, K]`` -> K floats.
    """
    out = []
    for k in range(y.shape[1]):
        defined = len(np.unique(y[:, k])) == 2
        out.append(safe_metric(lambda: metric(y[:, k], scores[:, k])) if defined else _NAN)
    return out


def _thin_columns(y: np.ndarray, names: list[str], what: str, absent_too: bool) -> list[str]:
    """``"class 'a' (3 subject(s) in it, 27 not)"`` for each column of ``y`` ``[N, K]`` (0/1) with fewer than
    ``MIN_PER_CLASS`` rows of either value; a column with none of one value only when ``absent_too`` (a macro
    average leaves the classes absent from the scored rows out, as it always did)."""
    thin = []
    low = 0 if absent_too else 1
    for k, name in enumerate(names):
        positives = int((np.asarray(y)[:, k] == 1).sum())
        if low <= positives < MIN_PER_CLASS or low <= len(y) - positives < MIN_PER_CLASS:
            thin.append(f"{what} {name!r} ({positives} subject(s) in it, {len(y) - positives} not)")
    return thin


def _rule(what: str) -> str:
    return f"ranking metrics need at least {MIN_PER_CLASS} subjects in and {MIN_PER_CLASS} not in each {what}"


def _nanmean(values: list[float]) -> float:
    arr = np.asarray(values, dtype=float)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else _NAN


class _LabelTask(Task):
    """Shared by binary and multiclass: one label per row, classes learned in ``fit_targets``."""

    primary_metric = "auroc"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.classes_: np.ndarray | None = None

    def check_targets(self, y: Any) -> np.ndarray:
        arr = np.asarray(y)
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != 1:
            raise ValueError(
                f"{self.task_name} targets must be one label per row (shape [N]); got shape {arr.shape}."
            )
        miss = self.missing_mask(arr)
        if miss.any():
            i = int(np.argmax(miss))
            raise ValueError(
                f"{self.task_name} target is missing at row {i} ({shown(arr[i])!r}); drop the row, or use the "
                "'multitask' task, which masks missing labels out of the loss."
            )
        return arr

    def _indices(self, y: Any) -> np.ndarray:
        """Class index of each label; an unknown label is an error naming its row."""
        self._require_fitted("classes_")
        arr = self.check_targets(y)
        assert self.classes_ is not None
        # a dict lookup, not searchsorted: labels of another type (e.g. str vs int) must not crash the comparison
        lookup = {c.item() if hasattr(c, "item") else c: i for i, c in enumerate(self.classes_)}
        found = [lookup.get(v.item() if hasattr(v, "item") else v, -1) for v in arr]
        idx = np.asarray(found, dtype=np.int64)
        bad = idx < 0
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"{self.task_name} target at row {i} is {shown(arr[i])!r}, which is not one of the classes "
                f"learned from the training targets {self.classes_.tolist()}."
            )
        return idx

    @property
    def target_width(self) -> int:
        return 1

    def encode(self, y: Any) -> Tensor:
        """Class indices as float. Shapes: returns ``[N, 1]``."""
        return torch.as_tensor(self._indices(y), dtype=torch.float32).reshape(-1, 1)

    def predict_proba(self, outputs: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def fit_linear(self, X: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ridge-penalised logistic regression (its penalty chosen by CV on the log loss): the logit of
        the positive class (binary), or K logits (multiclass; softmax ignores a common shift)."""
        from mmclin.tasks.linear_models import fit_logistic

        model = fit_logistic(X, target.reshape(-1).astype(np.int64))
        coef, intercept = np.atleast_2d(model.coef_), np.atleast_1d(model.intercept_)
        if self.output_dim == 1:
            return coef.reshape(1, -1), intercept.reshape(1)
        full, bias = np.zeros((self.output_dim, X.shape[1])), np.zeros(self.output_dim)
        if coef.shape[0] == 1:  # scikit-learn's two-class form: one logit of classes_[1] against classes_[0]
            full[model.classes_[1]], bias[model.classes_[1]] = coef[0], intercept[0]
        else:
            full[model.classes_], bias[model.classes_] = coef, intercept
        return full, bias

    def predict(self, outputs: np.ndarray) -> np.ndarray:
        """The most probable class label, in the original label type. Shapes: ``[N]``."""
        self._require_fitted("classes_")
        assert self.classes_ is not None
        return self.classes_[np.argmax(self.predict_proba(outputs), axis=1)]

    def metrics(self, y_true: Any, outputs: np.ndarray, y_train: Any = None) -> dict[str, float]:
        """``auroc``, ``auprc`` (one-vs-rest, macro over the classes present in ``y_true``),
        ``accuracy``, ``f1`` (macro for multiclass), ``log_loss``. ``y_train`` is unused."""
        idx = self._indices(y_true)
        proba = self.predict_proba(outputs)
        k = proba.shape[1]
        onehot = np.eye(k, dtype=int)[idx]
        pred = np.argmax(proba, axis=1)
        if k == 2:  # binary: the positive class only, as sklearn does
            onehot, scores = onehot[:, 1:], proba[:, 1:]
            f1 = safe_metric(lambda: f1_score(idx, pred, zero_division=np.nan))
        else:
            scores = proba
            f1 = safe_metric(lambda: f1_score(idx, pred, labels=range(k), average="macro", zero_division=np.nan))
        return {
            "auroc": _nanmean(_one_vs_rest(onehot, scores, roc_auc_score)),
            "auprc": _nanmean(_one_vs_rest(onehot, scores, average_precision_score)),
            "accuracy": safe_metric(lambda: accuracy_score(idx, pred)),
            "f1": f1,
            "log_loss": safe_metric(lambda: log_loss(idx, proba, labels=list(range(k)))),
        }

    def undefined_metrics(self, y_true: Any) -> dict[str, str]:
        """AUROC, AUPRC (and F1 for binary) need ``MIN_PER_CLASS`` subjects in and out of each class scored
        (binary: of the positive class; multiclass: of each class present, absent ones being left out)."""
        idx = self._indices(y_true)
        assert self.classes_ is not None
        k = len(self.classes_)
        onehot = np.eye(k, dtype=int)[idx]
        names = [str(c) for c in self.classes_]
        if k == 2:
            thin, ranking = _thin_columns(onehot[:, 1:], names[1:], "class", absent_too=True), ["auroc", "auprc", "f1"]
        else:
            thin, ranking = _thin_columns(onehot, names, "class", absent_too=False), ["auroc", "auprc"]
        return dict.fromkeys(ranking, f"{', '.join(thin)}; {_rule('class')}") if thin else {}

    def score(self, y_true: Any, outputs: np.ndarray) -> float:
        """Accuracy (sklearn's classifier ``score``)."""
        return float(np.mean(self._indices(y_true) == np.argmax(self.predict_proba(outputs), axis=1)))

    def state_dict(self) -> dict[str, Any]:
        return {"classes": None if self.classes_ is None else self.classes_.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.classes_ = None if state.get("classes") is None else np.asarray(state["classes"])


@TASKS.register("binary")
class BinaryTask(_LabelTask):
    """Two classes: one logit ``z`` with ``P(y = classes_[1]) = sigmoid(z)``; BCE loss.

    ``y`` holds 0/1 (or bool) values, or any two labels (``classes_`` = the sorted labels;
    the second is the positive class). 0/1 targets keep ``classes_ = [0, 1]`` even when a
    training split holds one of them only.

    Options:
        pos_weight (float | None): weight of positive samples in the BCE (imbalanced data).

    ``predict`` -> labels ``[N]``; ``predict_proba`` -> ``[N, 2]`` in ``classes_`` order.
    """

    problem = "binary"
    option_defaults = {"pos_weight": None}

    def fit_targets(self, y: Any) -> "BinaryTask":
        arr = self.check_targets(y)
        classes = np.unique(arr)
        if len(classes) < 2:  # e.g. a filter that kept only the controls: nothing to tell apart
            raise ValueError(f"binary training targets hold one class only ({classes.tolist()} in all {len(arr)} rows); "
                             "training needs rows of both classes")
        if set(classes.tolist()) <= {0, 1}:
            classes = np.array([0, 1], dtype=arr.dtype if arr.dtype != object else None)
        if len(classes) != 2:
            raise ValueError(
                f"binary targets must hold exactly two classes; found {len(classes)}: "
                f"{classes.tolist()[:10]}. Use 'multiclass' for more than two."
            )
        self.classes_ = classes
        return self

    @property
    def output_dim(self) -> int:
        return 1

    def loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Binary cross-entropy on the logit.

        Shapes:
            outputs ``[B, 1]``, target ``[B, 1]`` or ``[B]`` (0/1) -> scalar.
        """
        pw = self.options["pos_weight"]
        pos_weight = None if pw is None else torch.tensor(float(pw), device=outputs.device)
        return F.binary_cross_entropy_with_logits(
            outputs.reshape(-1), target.reshape(-1).to(outputs.dtype), pos_weight=pos_weight
        )

    def predict_proba(self, outputs: np.ndarray) -> np.ndarray:
        p1 = expit(self.as_numpy(outputs).reshape(-1))
        return np.stack([1.0 - p1, p1], axis=1)

    @classmethod
    def example_targets(cls, n: int, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        y = np.array(["alive", "dead"])[rng.integers(0, 2, n)]
        y[:2] = ["alive", "dead"]
        return y


@TASKS.register("multiclass")
class MulticlassTask(_LabelTask):
    """K exclusive classes: K logits, softmax, cross-entropy.

    ``classes_`` are the sorted distinct labels of the training targets, so the head has
    ``K = len(classes_)`` outputs; a label never seen in training is an error.

    Options:
        label_smoothing (float, default 0.0): passed to ``F.cross_entropy``.

    ``predict`` -> labels ``[N]``; ``predict_proba`` -> ``[N, K]`` in ``classes_`` order.
    """

    problem = "multiclass"
    option_defaults = {"label_smoothing": 0.0}

    def fit_targets(self, y: Any) -> "MulticlassTask":
        classes = np.unique(self.check_targets(y))
        if len(classes) < 2:
            raise ValueError(f"multiclass targets must hold at least two classes; found {classes.tolist()}.")
        self.classes_ = classes
        return self

    @property
    def output_dim(self) -> int:
        self._require_fitted("classes_")
        assert self.classes_ is not None
        return len(self.classes_)

    def loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy.

        Shapes:
            outputs ``[B, K]``, target ``[B, 1]`` or ``[B]`` class indices (any dtype) -> scalar.
        """
        return F.cross_entropy(
            outputs, target.reshape(-1).long(), label_smoothing=float(self.options["label_smoothing"])
        )

    def predict_proba(self, outputs: np.ndarray) -> np.ndarray:
        return softmax(self.as_numpy(outputs), axis=1)

    @classmethod
    def example_targets(cls, n: int, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        labels = np.array(["a", "b", "c"])
        y = labels[rng.integers(0, 3, n)]
        y[: min(n, 3)] = labels[: min(n, 3)]
        return y


@TASKS.register("multilabel")
class MultilabelTask(Task):
    """K non-exclusive 0/1 labels: K logits, BCE per label (mean over labels and rows).

    ``y`` is an ``[N, K]`` 0/1 (or bool) array, or a pandas/polars DataFrame of K 0/1 columns.

    Options:
        labels (list[str] | None): label names; default the DataFrame's columns, else
        ``label_0 ... label_{K-1}``.

    ``predict`` -> 0/1 int ``[N, K]``; ``predict_proba`` -> ``[N, K]`` per-label probabilities.
    A row with any missing label is masked as a whole inside a multitask.
    """

    problem = "multilabel"
    primary_metric = "auroc"
    option_defaults = {"labels": None}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.labels_: list[str] | None = None

    def check_targets(self, y: Any) -> np.ndarray:
        arr = np.asarray(y.to_numpy() if hasattr(y, "columns") else y)
        if arr.ndim != 2:
            raise ValueError(f"multilabel targets must be a 2-D [N, K] 0/1 array; got shape {arr.shape}.")
        if self.labels_ is not None and arr.shape[1] != len(self.labels_):
            raise ValueError(
                f"multilabel targets have {arr.shape[1]} columns but the task was fitted on "
                f"{len(self.labels_)} labels {self.labels_}."
            )
        if arr.dtype == object:
            ok = np.vectorize(lambda v: isinstance(v, (bool, int, float, np.number)) and v in (0, 1))(arr)
        else:
            ok = np.isin(arr, [0, 1]) if arr.dtype.kind in "biuf" else np.zeros(arr.shape, dtype=bool)
        if not ok.all():
            i, k = (int(v) for v in np.argwhere(~ok)[0])
            raise ValueError(f"multilabel targets must be 0/1; row {i}, column {k} is {shown(arr[i, k])!r}.")
        return arr.astype(np.int64)

    def fit_targets(self, y: Any) -> "MultilabelTask":
        arr = self.check_targets(y)
        names = self.options["labels"]
        if names is None and hasattr(y, "columns"):
            names = [str(c) for c in y.columns]
        if names is None:
            names = [f"label_{k}" for k in range(arr.shape[1])]
        if len(names) != arr.shape[1]:
            raise ValueError(f"option 'labels' names {len(names)} labels but the targets have {arr.shape[1]} columns.")
        self.labels_ = list(names)
        return self

    @property
    def output_dim(self) -> int:
        self._require_fitted("labels_")
        assert self.labels_ is not None
        return len(self.labels_)

    @property
    def target_width(self) -> int:
        return self.output_dim

    def encode(self, y: Any) -> Tensor:
        """Shapes: returns float ``[N, K]``."""
        self._require_fitted("labels_")
        return torch.as_tensor(self.check_targets(y), dtype=torch.float32)

    def loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Mean BCE over rows and labels.

        Shapes:
            outputs ``[B, K]``, target ``[B, K]`` 0/1 -> scalar.
        """
        return F.binary_cross_entropy_with_logits(outputs, target.to(outputs.dtype))

    def predict_proba(self, outputs: np.ndarray) -> np.ndarray:
        return expit(self.as_numpy(outputs))

    def predict(self, outputs: np.ndarray) -> np.ndarray:
        return (self.predict_proba(outputs) >= 0.5).astype(np.int64)

    def metrics(self, y_true: Any, outputs: np.ndarray, y_train: Any = None) -> dict[str, float]:
        """``auroc`` / ``auprc`` (macro over labels defined in ``y_true``), ``auroc/<label>``,
        ``accuracy`` (subset accuracy), ``f1`` (macro), ``log_loss`` (mean over labels)."""
        y = self.check_targets(y_true)
        proba = self.predict_proba(outputs)
        pred = (proba >= 0.5).astype(np.int64)
        aurocs = _one_vs_rest(y, proba, roc_auc_score)
        out = {
            "auroc": _nanmean(aurocs),
            "auprc": _nanmean(_one_vs_rest(y, proba, average_precision_score)),
            "accuracy": safe_metric(lambda: accuracy_score(y, pred)),
            "f1": safe_metric(lambda: f1_score(y, pred, average="macro", zero_division=np.nan)),
            "log_loss": _nanmean(
                [safe_metric(lambda: log_loss(y[:, k], proba[:, k], labels=[0, 1])) for k in range(y.shape[1])]
            ),
        }
        assert self.labels_ is not None
        out.update({f"auroc/{name}": v for name, v in zip(self.labels_, aurocs)})
        return out

    def undefined_metrics(self, y_true: Any) -> dict[str, str]:
        """A label's AUROC needs ``MIN_PER_CLASS`` subjects with and without it; the macro AUROC / AUPRC need
        that of every label present."""
        y = self.check_targets(y_true)
        assert self.labels_ is not None
        out: dict[str, str] = {}
        for k, name in enumerate(self.labels_):
            thin = _thin_columns(y[:, [k]], [str(name)], "label", absent_too=True)
            if thin:
                out[f"auroc/{name}"] = f"{thin[0]}; {_rule('label')}"
        thin = _thin_columns(y, [str(n) for n in self.labels_], "label", absent_too=False)
        if thin:
            out.update(dict.fromkeys(["auroc", "auprc"], f"{', '.join(thin)}; {_rule('label')}"))
        return out

    def score(self, y_true: Any, outputs: np.ndarray) -> float:
        """Subset accuracy (sklearn's ``score`` for multilabel classifiers)."""
        return float(accuracy_score(self.check_targets(y_true), self.predict(outputs)))

    def state_dict(self) -> dict[str, Any]:
        return {"labels": self.labels_}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.labels_ = None if state.get("labels") is None else list(state["labels"])

    @classmethod
    def example_targets(cls, n: int, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 2, (n, 3))
        y[0], y[1] = 0, 1
        return y
