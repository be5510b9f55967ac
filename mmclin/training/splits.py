"""Subject-level splits: hold-out, validation carve-out and K folds, stratified where it helps."""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
from sklearn.model_selection import GroupKFold, GroupShuffleSplit, KFold, StratifiedGroupKFold, StratifiedKFold, train_test_split


def stratify_labels(y: Any, problem: str) -> np.ndarray | None:
    """Labels to stratify on: the event indicator for survival, the class for classification."""
    if isinstance(y, dict):
        return None
    arr = np.asarray(y)
    if problem == "survival":
        return np.asarray(arr[arr.dtype.names[0]], dtype=int)
    if problem in ("binary", "multiclass") and arr.ndim == 1:
        _, inv, counts = np.unique(arr.astype(str), return_inverse=True, return_counts=True)
        return inv if counts.min() >= 2 else None
    return None


def _n(y: Any) -> int:
    return len(next(iter(y.values()))) if isinstance(y, dict) else len(y)


def validation_split(y: Any, problem: str, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Carve a validation set out of the training rows (for early stopping only)."""
    idx = np.arange(_n(y))
    n_val = int(round(fraction * len(idx)))
    if fraction <= 0 or n_val < 2 or len(idx) - n_val < 2:
        return idx, np.array([], dtype=int)
    strat = stratify_labels(y, problem)
    try:
        tr, va = train_test_split(idx, test_size=n_val, random_state=seed, stratify=strat)
    except ValueError:  # a class too rare to stratify
        tr, va = train_test_split(idx, test_size=n_val, random_state=seed)
    return np.sort(tr), np.sort(va)


def holdout_split(y: Any, problem: str, test_size: float, seed: int, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(_n(y))
    if groups is not None:
        tr, te = next(GroupShuffleSplit(1, test_size=test_size, random_state=seed).split(idx, groups=groups))
        return tr, te
    strat = stratify_labels(y, problem)
    try:
        tr, te = train_test_split(idx, test_size=test_size, random_state=seed, stratify=strat)
    except ValueError:
        tr, te = train_test_split(idx, test_size=test_size, random_state=seed)
    return np.sort(tr), np.sort(te)


def cv_splits(y: Any, problem: str, k: int, seed: int, groups: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """K subject-level folds: stratified by event/class, grouped when ``groups`` is given."""
    idx = np.arange(_n(y))
    strat = stratify_labels(y, problem)
    if groups is not None:
        splitter = StratifiedGroupKFold(k, shuffle=True, random_state=seed) if strat is not None else GroupKFold(k)
        yield from splitter.split(idx, strat, groups)
    elif strat is not None and np.bincount(strat).min() >= k:
        yield from StratifiedKFold(k, shuffle=True, random_state=seed).split(idx, strat)
    else:
        yield from KFold(k, shuffle=True, random_state=seed).split(idx)
