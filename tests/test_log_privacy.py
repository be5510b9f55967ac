"""Logs, warnings and console output never carry note text or patient values.

Errors raised to the user may quote the offending value (the user's own data at their own
terminal); logs and warnings are written to files, CI output and tracking servers, so they
name counts, columns and row indices only. Each test plants unique sentinels in the data,
runs the public entry points with every log record captured at DEBUG, and asserts that no
sentinel reaches a record at INFO or above, a warning, stdout or stderr.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import polars as pl
import pytest

from mmclin import ModalitySpec, MultimodalClassifier
from mmclin.datasets import events_to_frame, notes_to_frame

TEXT = "ZEBRA-SENTINEL-91"
VALUE = 123456.789
CATEGORY = "OKAPI-SENTINEL-47"
NOTES = pl.List(pl.Struct({"time": pl.Float64, "text": pl.String}))
EVENTS = pl.List(pl.Struct({"time": pl.Float64, "code": pl.String, "value": pl.Float64}))
SENTINELS = (TEXT, "123456.789", "123456.79", "1.234568e+05", "123457", CATEGORY)


def _leaks(caplog, captured, caught) -> list[str]:
    """Every place a sentinel showed up: records at INFO+, warnings, stdout, stderr."""
    places = [f"log {r.name} {r.levelname}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.INFO]
    places += [f"warning: {w.message}" for w in caught]
    places += [f"stdout: {captured.out}", f"stderr: {captured.err}"]
    return [p for p in places if any(s in p for s in SENTINELS)]


@pytest.fixture
def capture_all(caplog):
    caplog.set_level(logging.DEBUG)  # every logger, mmclin's included
    caplog.set_level(logging.DEBUG, logger="mmclin")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def _cohort(n: int = 48, seed: int = 0) -> tuple[pl.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    a = rng.normal(size=n) + y
    b = rng.normal(size=n)
    b[3] = VALUE  # a sentinel patient value in a tabular column
    words = ["stable", "improving", "febrile", "septic", "resting"]
    notes, labs = [], []
    for i in range(n):
        labs.append([{"time": -3.0, "code": "HR", "value": float(80 + 10 * y[i])},
                     {"time": -1.0, "code": "LAC", "value": VALUE if i == 5 else 1.5}])
        text = f"patient {words[(i + int(y[i])) % 5]} overnight"
        if i % 4 == 0:
            text += f" {TEXT}"
        cell = [{"time": -2.0, "text": text}, {"time": -1.0, "text": "   "}]  # an empty note, dropped
        notes.append(None if i % 7 == 5 else cell)
    frame = pl.DataFrame({"a": a, "b": b, "ward": [["icu", "med"][i % 2] for i in range(n)], "notes": notes,
                          "labs": labs},
                         schema={"a": pl.Float64, "b": pl.Float64, "ward": pl.String, "notes": NOTES, "labs": EVENTS})
    return frame, y


def test_fit_predict_explain_never_log_note_text_or_values(capture_all, capfd, caplog):
    frame, y = _cohort()
    specs = [ModalitySpec(name="clinical", kind="tabular", columns=["a", "b", "ward"], categorical=["ward"]),
             ModalitySpec(name="notes", kind="notes", columns=["notes"], options={"n_features": 2**8, "d_model": 8}),
             ModalitySpec(name="labs", kind="irregular_series", columns=["labs"], options={"d_model": 8})]
    clf = MultimodalClassifier(modalities=specs, max_epochs=2, batch_size=16, val_fraction=0.25, num_threads=1,
                               random_state=0, verbose=True).fit(frame, y)  # progress bar output checked too
    test = frame.head(8).with_columns(pl.lit(CATEGORY).alias("ward"))  # unseen category: a warning fires
    proba = clf.predict_proba(test)
    expl = clf.explain(test, levels=("modality", "feature", "time", "note"), n_steps=4)
    assert proba.shape == (8, 2) and expl.modality.height > 0 and expl.feature.height > 0
    assert {"note", "time"} <= set(expl.other)  # the note- and time-level explanations ran too
    # the unseen category was reported (so the check below looks at a real warning), as a count only
    assert any("8 row(s) have categories not seen in training" in str(w.message) for w in capture_all), \
        [str(w.message) for w in capture_all]
    assert _leaks(caplog, capfd.readouterr(), capture_all) == []


def test_events_and_notes_builders_log_counts_not_values(capture_all, capfd, caplog):
    subjects = pl.DataFrame({"subject_id": [1, 2, 3], "prediction_time": [10.0, 10.0, 10.0]})
    events = pl.DataFrame({"subject_id": [1, 1, 2, 7, 2, None],
                           "time": [1.0, 12.0, 2.0, 1.0, None, 3.0],  # one after the cutoff, one undated
                           "code": ["HR", "HR", "LAC", "HR", "HR", "HR"],
                           "numeric_value": [VALUE, VALUE, 2.0, VALUE, VALUE, VALUE]})
    out = events_to_frame(events, subjects, name="labs")
    assert out["labs"][0].to_list() == [{"time": -9.0, "code": "HR", "value": VALUE}]
    notes = pl.DataFrame({"subject_id": [1, 1, 2, 8, 3], "time": [1.0, 11.0, 2.0, 1.0, 4.0],
                          "text": [TEXT, f"late {TEXT}", " ", TEXT, ""]})
    out = notes_to_frame(notes, subjects)
    assert out["notes"].to_list() == [[{"time": -9.0, "text": TEXT}], None, None]
    messages = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "mmclin.datasets"]
    # what was left out is reported (counts at INFO/WARNING) ...
    assert any(lv == "INFO" and "1 event(s) after the prediction time" in m for lv, m in messages), messages
    assert any(lv == "WARNING" and "null 'time'" in m for lv, m in messages), messages
    assert any(lv == "WARNING" and "null 'subject_id'" in m for lv, m in messages), messages
    assert any(lv == "INFO" and "2 note(s) with empty or whitespace-only text" in m for lv, m in messages), messages
    assert any(lv == "INFO" and "1 note(s) after the prediction time" in m for lv, m in messages), messages
    # ... and no value or text with it
    assert _leaks(caplog, capfd.readouterr(), capture_all) == []


def test_the_sentinels_would_be_caught(capture_all, capfd, caplog):
    """The check itself can fail: a log line or warning quoting a value is found."""
    logging.getLogger("mmclin.test").info("value %s", VALUE)
    warnings.warn(f"text {TEXT}")
    print(CATEGORY)
    assert len(_leaks(caplog, capfd.readouterr(), capture_all)) == 3
