"""The scikit-learn estimator contract (parameters, clone, tags, score) without importing scikit-learn at start-up.

Why not ``sklearn.base.BaseEstimator``: ``import sklearn`` costs about 1.4 s here (it pulls
scipy.stats and pandas), which alone is over the second a user should wait for
``from mmclin import MultimodalClassifier``. What scikit-learn's tools call on an estimator is
small and documented ("Developing scikit-learn estimators"): ``get_params`` / ``set_params``
(``clone``, ``GridSearchCV``), ``__sklearn_tags__`` (``is_classifier``, the meta-estimators) and
``score``. It is implemented here as scikit-learn does it, and scikit-learn is imported only
when one of those asks (tags, score, the not-fitted error); ``tests/test_estimators.py`` runs
``clone``, ``cross_val_score`` and ``GridSearchCV`` on the estimators.
"""
from __future__ import annotations

import inspect
from typing import Any


class EstimatorParams:
    """``get_params`` / ``set_params`` / ``repr`` from the constructor's signature, as ``BaseEstimator``."""

    _estimator_type: str | None = None

    @classmethod
    def _get_param_names(cls) -> list[str]:
        init = cls.__init__
        if init is object.__init__:
            return []
        params = [p for p in inspect.signature(init).parameters.values() if p.name != "self"]
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise RuntimeError(f"{cls.__name__}.__init__ must name its parameters (no *args / **kwargs): "
                                   "scikit-learn's clone rebuilds the estimator from them")
        return sorted(p.name for p in params)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        out = {}
        for name in self._get_param_names():
            value = getattr(self, name)
            if deep and hasattr(value, "get_params") and not isinstance(value, type):
                out.update((f"{name}__{k}", v) for k, v in value.get_params().items())
            out[name] = value
        return out

    def set_params(self, **params: Any) -> "EstimatorParams":
        valid = self._get_param_names()
        for key, value in params.items():
            name, sep, sub = key.partition("__")
            if name not in valid:
                raise ValueError(f"Invalid parameter {name!r} for estimator {type(self).__name__}. "
                                 f"Valid parameters are: {valid!r}.")
            if sep:
                getattr(self, name).set_params(**{sub: value})
            else:
                setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = {p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()}
        changed = {k: v for k, v in self.get_params(deep=False).items()
                   if k not in defaults or not _same(v, defaults[k])}
        shown = ", ".join(f"{k}={_short_repr(v)}" for k, v in changed.items())
        return f"{type(self).__name__}({shown})"

    def __sklearn_tags__(self) -> Any:
        from sklearn.utils import ClassifierTags, RegressorTags, Tags, TargetTags

        return Tags(estimator_type=self._estimator_type, target_tags=TargetTags(required=True),
                    classifier_tags=ClassifierTags() if self._estimator_type == "classifier" else None,
                    regressor_tags=RegressorTags() if self._estimator_type == "regressor" else None)


def check_fitted(estimator: Any, attribute: str) -> None:
    """scikit-learn's ``NotFittedError`` (``check_is_fitted``'s message) when ``attribute`` is not set yet."""
    if not hasattr(estimator, attribute):
        from sklearn.exceptions import NotFittedError

        raise NotFittedError(f"This {type(estimator).__name__} instance is not fitted yet. Call 'fit' with "
                             "appropriate arguments before using this estimator.")


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a is b or a == b)
    except Exception:  # arrays and frames compare element-wise
        return False


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
