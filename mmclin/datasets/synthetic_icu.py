"""Synthetic ICU stays: 37 irregularly sampled variables, notes with planted phrases, known signal.

The variables are the 37 time series of the PhysioNet/CinC Challenge 2012 (names only; every
value here is generated). Each stay has an admission at hour 0, a prediction time at hour
``window`` (48 by default) and events recorded until ``window + after`` hours, so the data
*do* contain events after the prediction time: building the cohort through
:func:`mmclin.datasets.events_to_frame` must drop them.

Generative model (all draws from ``seed``), for stay ``i``:

* severity ``s_i ~ N(0, 1)``; variable ``v`` is observed ``Poisson(rate_v * events_per_stay / 200)``
  times over ``[0, window + after]`` h at uniform times, value
  ``mu_v + sd_v (loading_v * s_i + 0.5 * noise)``; ``Lactate``, ``HR``, ``RespRate`` load
  ``+0.8``, ``GCS``, ``MAP`` ``-0.8``, the rest ``0``.
* timing marker: every stay has exactly one ``MechVent`` event (value 1) inside the window,
  *late* (``window - 12 .. window`` h) for half of the stays, *early* (``0 .. 12`` h) for the
  other half. Values and counts are identical; only its time says which.
* notes: 0-3 nursing notes per stay at uniform times over ``[0, window + after]``, built
  from neutral template sentences; the phrase ``"signs of septic shock"`` is planted in one
  note inside the window for stays with ``phrase_i = 1`` (``Bernoulli(0.5)``). Notes after the
  prediction time of stays that died also say ``"patient expired"`` (a leak a correct
  pipeline never sees).
* outcome (in-hospital death): ``Bernoulli(sigmoid(eta))`` with
  ``eta = b0 + signal["values"] * s_i + signal["timing"] * 1.5 * (2 late_i - 1)
  + signal["notes"] * 1.5 * (2 phrase_i - 1) + signal["static"] * z(age_i)``,
  ``b0`` chosen for a ~30 % death rate at default settings.

    >>> c = make_synthetic_icu(n_stays=50, seed=0)
    >>> [(m.name, m.kind) for m in c.modalities]
    [('static', 'tabular'), ('timeseries', 'irregular_series'), ('notes', 'notes')]
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import polars as pl

from mmclin.cohort import Cohort, ModalitySpec

__all__ = ["make_synthetic_icu", "make_icu_tables", "ICU_VARIABLES"]

# name: (mean, sd, expected observations per 48 h at events_per_stay=200, loading on severity)
ICU_VARIABLES: dict[str, tuple[float, float, float, float]] = {
    "Albumin": (3.0, 0.6, 1.0, 0.0), "ALP": (110.0, 60.0, 1.0, 0.0), "ALT": (60.0, 40.0, 1.0, 0.0),
    "AST": (80.0, 50.0, 1.0, 0.0), "Bilirubin": (1.5, 1.0, 1.0, 0.0), "BUN": (25.0, 15.0, 3.0, 0.0),
    "Cholesterol": (160.0, 40.0, 0.5, 0.0), "Creatinine": (1.4, 0.9, 3.0, 0.0), "DiasABP": (60.0, 12.0, 14.0, 0.0),
    "FiO2": (0.55, 0.15, 4.0, 0.0), "GCS": (11.0, 3.0, 8.0, -0.8), "Glucose": (140.0, 45.0, 3.0, 0.0),
    "HCO3": (23.0, 4.0, 3.0, 0.0), "HCT": (31.0, 5.0, 4.0, 0.0), "HR": (87.0, 15.0, 20.0, 0.8),
    "K": (4.1, 0.6, 4.0, 0.0), "Lactate": (2.2, 1.3, 2.0, 0.8), "Mg": (2.0, 0.3, 3.0, 0.0),
    "MAP": (80.0, 14.0, 14.0, -0.8), "Na": (139.0, 4.5, 3.0, 0.0), "NIDiasABP": (58.0, 14.0, 8.0, 0.0),
    "NIMAP": (77.0, 15.0, 8.0, 0.0), "NISysABP": (118.0, 22.0, 8.0, 0.0), "PaCO2": (40.0, 8.0, 3.0, 0.0),
    "PaO2": (145.0, 70.0, 3.0, 0.0), "pH": (7.38, 0.07, 3.0, 0.0), "Platelets": (200.0, 90.0, 2.0, 0.0),
    "RespRate": (19.0, 5.0, 10.0, 0.8), "SaO2": (96.5, 2.5, 3.0, 0.0), "SysABP": (118.0, 20.0, 14.0, 0.0),
    "Temp": (37.0, 0.8, 12.0, 0.0), "TroponinI": (4.0, 6.0, 0.5, 0.0), "TroponinT": (1.0, 2.0, 0.5, 0.0),
    "Urine": (120.0, 90.0, 19.0, 0.0), "WBC": (12.0, 6.0, 2.0, 0.0), "Weight": (82.0, 22.0, 3.0, 0.0),
    "MechVent": (1.0, 0.0, 0.0, 0.0),  # only the planted timing marker
}
_FILLER = np.array([
    "patient resting comfortably in bed.", "family at bedside, questions answered.", "turned and repositioned q2h.",
    "tolerating tube feeds at goal.", "iv access patent, site clean.", "pain controlled with current regimen.",
    "lungs with coarse breath sounds bilaterally.", "skin intact, no new pressure areas.",
    "plan discussed on morning rounds.", "labs sent as ordered.", "foley draining clear yellow urine.",
    "afebrile overnight, vitals stable.", "continue current management.", "mobilised to chair with assistance.",
])
_PHRASE = "signs of septic shock"
_LEAK = "patient expired"
_SIGNAL_KEYS = ("values", "timing", "notes", "static")


def make_icu_tables(
    n_stays: int = 1000,
    events_per_stay: float = 200.0,
    window: float = 48.0,
    after: float = 24.0,
    signal: Mapping[str, float] | None = None,
    seed: int = 0,
) -> dict[str, pl.DataFrame]:
    """The long tables of :func:`make_synthetic_icu`: ``subjects``, ``events`` (MEDS layout,
    hours since admission) and ``notes``, plus the ground truth in ``truth``.

    Returns:
        ``{"subjects": (subject_id, prediction_time, age, gender, icu_type, died),
        "events": (subject_id, time, code, numeric_value), "notes": (subject_id, time, text),
        "truth": (subject_id, severity, late_marker, phrase, eta)}``; events and notes include
        records after each stay's prediction time.
    """
    weights = {k: 1.0 for k in _SIGNAL_KEYS}
    for k, v in dict(signal or {}).items():
        if k not in weights:
            raise KeyError(f"signal key {k!r} is not one of {list(_SIGNAL_KEYS)}")
        weights[k] = float(v)
    if n_stays < 2:
        raise ValueError(f"n_stays must be >= 2, got {n_stays}")
    if window <= 12 or after < 0:
        raise ValueError(f"window must be > 12 h and after >= 0, got window={window}, after={after}")
    rng = np.random.default_rng(seed)
    n = int(n_stays)
    ids = np.arange(1, n + 1, dtype=np.int64)
    severity = rng.standard_normal(n)
    late = rng.random(n) < 0.5
    phrase = rng.random(n) < 0.5
    age = np.clip(rng.normal(64, 16, n), 18, 95).round()
    gender = rng.choice(np.array(["F", "M"]), n)
    icu_type = rng.choice(np.array(["CCU", "CSRU", "MICU", "SICU"]), n)
    eta = (-1.1 + weights["values"] * severity + weights["timing"] * 1.5 * (2 * late - 1.0)
           + weights["notes"] * 1.5 * (2 * phrase - 1.0) + weights["static"] * (age - 64) / 16)
    died = rng.random(n) < 1.0 / (1.0 + np.exp(-eta))

    # measurements: counts per (stay, variable), then times and values, all vectorised
    names = list(ICU_VARIABLES)
    mu, sd, rate, load = (np.array([ICU_VARIABLES[v][j] for v in names]) for j in range(4))
    horizon = window + after
    lam = rate * (events_per_stay / 200.0) * horizon / 48.0
    counts = rng.poisson(np.broadcast_to(lam, (n, len(names))))
    stay_of = np.repeat(np.repeat(np.arange(n), len(names)), counts.ravel())
    var_of = np.repeat(np.tile(np.arange(len(names)), n), counts.ravel())
    times = rng.uniform(0.0, horizon, len(stay_of))
    values = mu[var_of] + sd[var_of] * (load[var_of] * severity[stay_of] + 0.5 * rng.standard_normal(len(stay_of)))
    # the timing marker: one MechVent event per stay, early or late inside the window
    marker_t = np.where(late, rng.uniform(window - 12.0, window, n), rng.uniform(0.0, 12.0, n))
    stay_of = np.concatenate([stay_of, np.arange(n)])
    var_of = np.concatenate([var_of, np.full(n, names.index("MechVent"))])
    times = np.concatenate([times, marker_t])
    values = np.concatenate([values, np.ones(n)])
    order = np.lexsort((times, stay_of))
    events = pl.DataFrame({
        "subject_id": ids[stay_of[order]],
        "time": times[order].round(3),
        "code": pl.Series(np.array(names)[var_of[order]]),
        "numeric_value": values[order].astype(np.float32),
    })

    # notes: neutral sentences; the planted phrase inside the window; a leak after it
    n_notes = rng.integers(0, 4, n)
    n_notes = np.where(phrase, np.maximum(n_notes, 1), n_notes)
    note_stay = np.repeat(np.arange(n), n_notes)
    note_t = rng.uniform(0.0, horizon, len(note_stay))
    first = np.r_[0, np.cumsum(n_notes)[:-1]][n_notes > 0]
    note_t[first] = rng.uniform(0.0, window, len(first))  # the first note of a stay lies inside the window
    body = [" ".join(rng.choice(_FILLER, 3, replace=False)) for _ in range(len(note_stay))]
    texts = np.array(body, dtype=object)
    plant = np.zeros(len(note_stay), dtype=bool)
    plant[first] = phrase[note_stay[first]]
    texts[plant] = [f"{t} {_PHRASE.capitalize()} noted." for t in texts[plant]]
    leak = (note_t > window) & died[note_stay]
    texts[leak] = [f"{t} {_LEAK.capitalize()}." for t in texts[leak]]
    notes = pl.DataFrame({"subject_id": ids[note_stay], "time": note_t.round(3),
                          "text": pl.Series(texts.tolist(), dtype=pl.String)}).sort(["subject_id", "time"])

    subjects = pl.DataFrame({
        "subject_id": ids, "prediction_time": np.full(n, float(window)), "age": age,
        "gender": gender, "icu_type": icu_type, "died": died.astype(np.int64),
    })
    truth = pl.DataFrame({"subject_id": ids, "severity": severity, "late_marker": late, "phrase": phrase, "eta": eta})
    return {"subjects": subjects, "events": events, "notes": notes, "truth": truth}


def make_synthetic_icu(
    n_stays: int = 1000,
    events_per_stay: float = 200.0,
    window: float = 48.0,
    after: float = 24.0,
    signal: Mapping[str, float] | None = None,
    max_events: int | None = None,
    seed: int = 0,
) -> Cohort:
    """A binary (in-hospital death) cohort of synthetic ICU stays built from :func:`make_icu_tables`
    through :func:`~mmclin.datasets.events_to_frame` / :func:`~mmclin.datasets.notes_to_frame`
    with the first ``window`` hours of each stay.

    Args:
        signal: ``{"values", "timing", "notes", "static"}`` weights (default 1 each; 0 = none).
        max_events: keep only each stay's most recent events (builder-level truncation).

    Returns:
        ``Cohort`` with columns ``subject_id, age, gender, icu_type, timeseries, notes, died``;
        modalities ``static`` (tabular), ``timeseries`` (irregular_series, times in hours
        relative to the prediction time), ``notes``; ``y`` int [n]; ``extra["truth"]`` the
        planted latent values and ``extra["tables"]`` the long tables.
    """
    from mmclin.datasets.events import events_to_frame, notes_to_frame

    tables = make_icu_tables(n_stays, events_per_stay, window, after, signal, seed)
    frame = events_to_frame(tables["events"], tables["subjects"], name="timeseries", window_start=None,
                            max_events=max_events)
    frame = notes_to_frame(tables["notes"], frame, name="notes")
    frame = frame.select("subject_id", "age", "gender", "icu_type", "timeseries", "notes", "died")
    y = frame["died"].to_numpy()
    specs = [
        ModalitySpec(name="static", kind="tabular", columns=["age", "gender", "icu_type"]),
        ModalitySpec(name="timeseries", kind="irregular_series", columns=["timeseries"]),
        ModalitySpec(name="notes", kind="notes", columns=["notes"]),
    ]
    truth = tables["truth"]
    return Cohort(
        name="synthetic_icu", frame=frame, modalities=specs, y=y, task="binary", id_column="subject_id",
        target_columns=["died"],
        description=(f"Synthetic ICU stays, {n_stays} subjects, first {window:g} h observed (events recorded until "
                     f"{window + after:g} h); 37 variables, notes with planted phrases; death rate {y.mean():.2f}."),
        source=f"mmclin.datasets.make_synthetic_icu(seed={seed})",
        licence="generated by mmclin (no third-party data)",
        extra={"truth": {c: truth[c].to_numpy() for c in truth.columns}, "tables": tables, "phrase": _PHRASE,
               "leak_phrase": _LEAK},
    )
