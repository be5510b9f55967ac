"""Synthetic cohorts with a planted, known signal per modality and controllable missingness.

Generative model (every draw comes from ``seed``):

* modality ``m`` has ``p_m`` standard-normal latent features ``X_m``; its columns are
  ``f"{m}_{j}"``. Tabular modalities turn their last (up to) two features into categorical
  ``String`` columns (levels "A"/"B"/"C", never informative) and get scattered null cells
  (5 %) in columns other than ``{m}_0``; genomics columns are complete floats.
* Only the first ``k_m = min(3, p_m)`` features of a modality carry signal:
  ``eta = sum_m signal[m] * X_m[:, :k_m] @ beta[:k_m]`` with ``beta = (1, -0.8, 0.6)``
  (multilabel: one random unit-scale ``beta`` column per label).
* The outcome follows ``eta``: binary ``Bernoulli(sigmoid(eta))``; multiclass the quantile
  bin of ``eta + Logistic`` noise (balanced, ordered classes); multilabel independent
  ``Bernoulli(sigmoid(eta_l))``; regression ``eta + N(0, 1)``; survival Weibull times
  (shape 1.5, hazard ``∝ exp(eta)``, days) with independent exponential censoring.
* A modality is absent for an exact ``round(missing[m] * n)`` subjects, drawn without
  replacement with weights ``exp(2 * driver)``: driver 0 for ``"mcar"``, the standardised
  mean ``eta`` (sicker subjects more often missing it) for ``"mnar"``, the standardised
  always-observed column ``{anchor}_0`` of a never-absent tabular modality for ``"mar"``.
  No subject ever has all modalities absent.

Each modality's features come from their own stream (seeded by ``seed`` and the modality's
name), so adding or reordering modalities does not change another modality's values.

    >>> c = make_synthetic_cohort(n_subjects=100, missing={"genes": 0.3}, seed=1)
    >>> c.frame.shape, int((~c.extra["present"]["genes"]).sum())
    ((100, 42), 30)
"""
from __future__ import annotations

import difflib
import zlib
from collections import Counter
from collections.abc import Mapping

import numpy as np
import polars as pl

from mmclin.cohort import Cohort, ModalitySpec

__all__ = ["make_synthetic_cohort", "DEFAULT_MODALITIES", "SYNTHETIC_TASKS", "MISSING_MECHANISMS"]

DEFAULT_MODALITIES: dict[str, tuple[str, int]] = {"clinical": ("tabular", 8), "genes": ("genomics", 32)}
SYNTHETIC_TASKS = ("binary", "multiclass", "multilabel", "regression", "survival")
MISSING_MECHANISMS = ("mcar", "mar", "mnar")
SYNTHETIC_KINDS = ("tabular", "genomics")

_BETA = np.array([1.0, -0.8, 0.6])  # planted coefficients of the informative features
_N_CATEGORICAL = 2  # categorical columns per tabular modality (when it has room)
_CELL_NULL_RATE = 0.05  # scattered null cells inside present tabular rows
_TILT = 2.0  # MAR/MNAR: log-weight of absence per SD of the driver (strong enough to detect)
_WEIBULL_SHAPE = 1.5
_WEIBULL_SCALE_DAYS = 365.0


def _bad_choice(param: str, value: object, choices: tuple[str, ...]) -> ValueError:
    return ValueError(f"The {param!r} parameter of make_synthetic_cohort must be one of {choices}. Got {value!r} instead.")


def _per_modality(param: str, given: Mapping[str, float] | None, names: list[str], default: float) -> dict[str, float]:
    """Fill a per-modality mapping with ``default``; unknown keys raise with the closest name."""
    given = dict(given or {})
    for key in given:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise KeyError(f"{param!r} names modality {key!r}, which is not one of {names}.{hint}")
    return {m: float(given.get(m, default)) for m in names}


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in values.items())


def _modality_rng(seed: int, name: str) -> np.random.Generator:
    # Seeded by name, not by position: a modality's values do not depend on the others.
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _standardise(v: np.ndarray) -> np.ndarray:
    sd = v.std()
    return (v - v.mean()) / sd if sd > 0 else np.zeros_like(v)


def _draw_absent(fractions: dict[str, float], drivers: dict[str, np.ndarray], rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Exact-size absence sets (Gumbel top-k = weighted sampling without replacement), then
    swaps so that no subject loses every modality while each modality keeps its exact count."""
    names = sorted(fractions)
    keys = np.stack([_TILT * drivers[m] + rng.gumbel(size=n) for m in names], axis=1)  # [n, M]
    absent = np.zeros((n, len(names)), dtype=bool)
    for j, m in enumerate(names):
        absent[np.argsort(-keys[:, j], kind="stable")[: round(fractions[m] * n)], j] = True
    for i in np.flatnonzero(absent.all(axis=1)):
        # Give back the modality this subject was least "due" to lose, and take it instead from
        # the subject with the highest key among those who keep another modality anyway.
        for j in np.argsort(keys[i]):
            donors = ~absent[:, j] & ((~absent).sum(axis=1) >= 2)
            if donors.any():
                r = np.flatnonzero(donors)[np.argmax(keys[donors, j])]
                absent[i, j], absent[r, j] = False, True
                break
        else:  # unreachable when sum(1 - fraction) >= 1 (checked by the caller): pigeonhole
            raise RuntimeError("could not keep one modality present for every subject")
    return {m: absent[:, j] for j, m in enumerate(names)}


def _outcome(task: str, eta: np.ndarray, n_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, list[pl.Series]]:
    """Targets from the linear predictor ``eta`` [n, n_out]: (y, frame columns)."""
    n = eta.shape[0]
    sigmoid = 1.0 / (1.0 + np.exp(-eta))
    if task == "binary":
        y = (rng.random(n) < sigmoid[:, 0]).astype(np.int64)
        return y, [pl.Series("label", y)]
    if task == "multiclass":
        z = eta[:, 0] + rng.logistic(size=n)
        y = np.digitize(z, np.quantile(z, np.arange(1, n_classes) / n_classes)).astype(np.int64)
        return y, [pl.Series("label", y)]
    if task == "multilabel":
        y = (rng.random(eta.shape) < sigmoid).astype(np.int64)
        return y, [pl.Series(f"label_{j}", y[:, j]) for j in range(y.shape[1])]
    if task == "regression":
        y = eta[:, 0] + rng.normal(size=n)
        return y, [pl.Series("target", y)]
    # survival: Weibull proportional hazards, S(t) = exp(-(t/scale)^shape * exp(eta)).
    t_event = _WEIBULL_SCALE_DAYS * (rng.exponential(size=n) * np.exp(-eta[:, 0])) ** (1.0 / _WEIBULL_SHAPE)
    t_censor = rng.exponential(2.0 * np.median(t_event), size=n)  # independent of everything else
    y = np.empty(n, dtype=[("event", bool), ("time", float)])
    y["event"], y["time"] = t_event <= t_censor, np.minimum(t_event, t_censor)
    return y, [pl.Series("event", y["event"]), pl.Series("time", y["time"])]


def make_synthetic_cohort(
    n_subjects: int = 500,
    modalities: Mapping[str, tuple[str, int]] | None = None,
    task: str = "binary",
    signal: Mapping[str, float] | None = None,
    missing: Mapping[str, float] | None = None,
    missing_mechanism: str = "mcar",
    n_classes: int = 3,
    seed: int = 0,
) -> Cohort:
    """A one-row-per-subject cohort with a known signal per modality and chosen missingness.

    Args:
        n_subjects: rows.
        modalities: ``{name: (kind, n_features)}``, kind ``"tabular"`` or ``"genomics"``
            (default ``{"clinical": ("tabular", 8), "genes": ("genomics", 32)}``).
        task: ``"binary" | "multiclass" | "multilabel" | "regression" | "survival"``.
        signal: ``{modality: weight}`` scaling its planted effect; 0 = pure noise (default 1).
        missing: ``{modality: fraction}`` of subjects for whom the whole modality is absent
            (all its cells null); needs ``sum(1 - fraction) >= 1`` so everyone keeps one.
        missing_mechanism: ``"mcar"``, ``"mar"`` (needs a never-absent tabular modality) or
            ``"mnar"`` (sicker subjects, i.e. higher ``eta``, more often miss a modality).
        n_classes: classes (multiclass) or labels (multilabel).
        seed: everything is deterministic given it.

    Returns:
        ``Cohort`` with id column ``patient_id``; ``y`` is int [n] (binary, multiclass),
        int [n, n_classes] (multilabel), float [n] (regression) or a structured array with
        fields ``("event", "time")`` (survival). ``extra`` holds ``informative_columns``
        (``{modality: [columns]}``, empty for signal 0), ``present`` (``{modality: bool[n]}``),
        ``coefficients`` (``{modality: [k_m, n_out]}``, already times the signal, rows =
        ``{m}_0..{m}_{k_m-1}``), ``linear_predictor`` ([n, n_out]), ``signal``, ``missing``,
        ``missing_mechanism``, ``mar_driver`` and ``seed``.
    """
    mods = dict(DEFAULT_MODALITIES if modalities is None else modalities)
    if not mods:
        raise ValueError("'modalities' is empty: give e.g. {'clinical': ('tabular', 8)}")
    for m, spec in mods.items():
        kind, p = spec
        if kind not in SYNTHETIC_KINDS:
            raise ValueError(f"modality {m!r}: synthetic kind must be one of {SYNTHETIC_KINDS}, got {kind!r}")
        if int(p) != p or p < 1:
            raise ValueError(f"modality {m!r}: n_features must be a positive integer, got {p!r}")
    if task not in SYNTHETIC_TASKS:
        raise _bad_choice("task", task, SYNTHETIC_TASKS)
    if missing_mechanism not in MISSING_MECHANISMS:
        raise _bad_choice("missing_mechanism", missing_mechanism, MISSING_MECHANISMS)
    if n_subjects < 2:
        raise ValueError(f"'n_subjects' must be at least 2, got {n_subjects}")
    if task in ("multiclass", "multilabel") and n_classes < 2:
        raise ValueError(f"'n_classes' must be at least 2 for task {task!r}, got {n_classes}")
    names = sorted(mods)  # generation order is by name, so the dict's order cannot matter
    weights = _per_modality("signal", signal, names, 1.0)
    fractions = _per_modality("missing", missing, names, 0.0)
    bad = {m: f for m, f in fractions.items() if not 0.0 <= f < 1.0}
    if bad:
        raise ValueError(f"'missing' fractions must be in [0, 1), got {bad}")
    if sum(1.0 - f for f in fractions.values()) < 1.0:
        raise ValueError(
            f"'missing' fractions {fractions} leave too few present cells for every subject to keep one "
            "modality: need sum(1 - fraction) >= 1; lower some fractions or add a modality"
        )

    n = int(n_subjects)
    rng = np.random.default_rng(seed)  # outcome and missingness
    n_out = n_classes if task == "multilabel" else 1
    if n_out == 1:
        beta = _BETA[:, None]
    else:  # one random direction per label, scaled like _BETA so signal strength is comparable
        beta = rng.normal(size=(len(_BETA), n_out))
        beta *= np.linalg.norm(_BETA) / np.linalg.norm(beta, axis=0)

    latent, cell_null, eta, coefs = {}, {}, np.zeros((n, n_out)), {}
    for m in names:
        kind, p = mods[m]
        mrng = _modality_rng(seed, m)
        latent[m] = mrng.standard_normal((n, int(p)))
        # Tabular: scattered null cells, never in column 0 (the always-observed column for MAR).
        null = mrng.random((n, int(p))) < _CELL_NULL_RATE
        null[:, 0] = False
        cell_null[m] = null if kind == "tabular" else np.zeros_like(null)
        k = min(len(_BETA), int(p))
        coefs[m] = weights[m] * beta[:k]
        eta += latent[m][:, :k] @ coefs[m]

    y, target_cols = _outcome(task, eta, n_classes, rng)

    mar_driver = None
    if missing_mechanism == "mar":
        anchors = [m for m in names if mods[m][0] == "tabular" and fractions[m] == 0.0]
        if not anchors:
            raise ValueError(
                "missing_mechanism='mar' needs a tabular modality that is never absent (missing fraction 0) "
                f"to drive the absence of the others; got modalities {mods} and missing {fractions}"
            )
        mar_driver = f"{anchors[0]}_0"
        driver = _standardise(latent[anchors[0]][:, 0])
    elif missing_mechanism == "mnar":
        driver = _standardise(eta.mean(axis=1))
    else:
        driver = np.zeros(n)
    absent = _draw_absent(fractions, {m: driver for m in names}, rng, n)

    width = max(4, len(str(n)))
    columns = [pl.Series("patient_id", [f"SYN-{i:0{width}d}" for i in range(1, n + 1)])]
    specs = []
    for m, (kind, p) in mods.items():  # frame columns follow the caller's order
        p = int(p)
        k = min(len(_BETA), p)
        n_cat = min(_N_CATEGORICAL, p - k) if kind == "tabular" else 0
        cols = [f"{m}_{j}" for j in range(p)]
        for j, c in enumerate(cols):
            null = absent[m] | cell_null[m][:, j]
            if j >= p - n_cat:  # categorical from a non-informative latent: 50 % / 30 % / 20 %
                levels = np.array(["A", "B", "C"], dtype=object)[np.digitize(latent[m][:, j], [0.0, 0.84])]
                levels[null] = None
                columns.append(pl.Series(c, levels.tolist(), dtype=pl.String))
            else:
                columns.append(pl.Series(c, np.where(null, np.nan, latent[m][:, j]), nan_to_null=True))
        specs.append(ModalitySpec(name=m, kind=kind, columns=cols, categorical=cols[p - n_cat:] if kind == "tabular" else None))
    columns += target_cols
    clash = [name for name, count in Counter(s.name for s in columns).items() if count > 1]
    if clash:
        raise ValueError(f"column name(s) {sorted(clash)} are used twice; rename the modality")

    return Cohort(
        name="synthetic",
        frame=pl.DataFrame(columns),
        modalities=specs,
        y=y,
        task=task,
        id_column="patient_id",
        target_columns=[s.name for s in target_cols],
        description=(
            f"Synthetic {task} cohort, {n} subjects; modalities "
            + ", ".join(f"{m}:{k}({p})" for m, (k, p) in mods.items())
            + f"; planted signal {_fmt(weights)}; absent {_fmt(fractions)} ({missing_mechanism})."
        ),
        source=f"mmclin.datasets.make_synthetic_cohort(seed={seed})",
        licence="generated by mmclin (no third-party data)",
        extra={
            "informative_columns": {m: [f"{m}_{j}" for j in range(len(coefs[m]))] if weights[m] != 0 else [] for m in names},
            "present": {m: ~absent[m] for m in names},
            "coefficients": coefs,
            "linear_predictor": eta,
            "signal": weights,
            "missing": fractions,
            "missing_mechanism": missing_mechanism,
            "mar_driver": mar_driver,
            "seed": seed,
        },
    )
