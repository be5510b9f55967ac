"""Subject-level splits: hold-out, validation carve-out and K folds, stratified where it helps."""
from __future__ import annotations

import logging
from typing import Any, Iterator

import numpy as np
from sklearn.model_selection import GroupKFold, GroupShuffleSplit, KFold, StratifiedGroupKFold, StratifiedKFold, train_test_split

log = logging.getLogger("mmclin")


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


def validation_size(n: int, fraction: float, say: bool = False) -> int:
    """Validation rows of ``fraction`` (``trainer.val_fraction``) of ``n`` training rows: 0 when that would be fewer than
    2 (too few to stop early on; said as a warning with the counts when ``say``); a fraction that would leave fewer
    than 2 rows to train on is an error naming the key and both counts."""
    n_val = int(round(fraction * n)) if fraction > 0 else 0
    if n_val >= 2 and n - n_val < 2:
        raise ValueError(f"trainer.val_fraction {fraction:g} (val_fraction of the estimators) of {n} training rows "
                         f"leaves {n - n_val} training row(s) and {n_val} validation row(s): at least 2 training rows "
                         "are needed; lower it, or set it to 0 to train on all rows without early stopping")
    if fraction > 0 and n_val < 2:
        if say and n >= 2:
            log.warning("trainer.val_fraction %g of %d training rows gives %d validation row(s), too few to stop early "
                        "on (at least 2 are needed): training on all %d rows for trainer.max_epochs epochs without "
                        "validation", fraction, n, n_val, n)
        return 0
    return n_val


def validation_split(y: Any, problem: str, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Carve a validation set out of the training rows (for early stopping only; sizes: :func:`validation_size`)."""
    idx = np.arange(_n(y))
    n_val = validation_size(len(idx), fraction)
    if n_val == 0:
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
