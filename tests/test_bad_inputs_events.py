"""Bad inputs for events, notes and multi-table cohorts: each gives a clear error (type + message
naming the table / file / column / row and what was expected), or is handled and reported
(a count at WARNING or INFO, never silently dropped). Companion of test_bad_inputs.py."""
from __future__ import annotations

import datetime as dt
import gzip
import logging

import numpy as np
import polars as pl
import pytest

from mmclin import ModalitySpec, MultimodalClassifier
from mmclin.datasets import events_to_frame, notes_to_frame
from mmclin.datasets.events import first_invalid_utf8
from mmclin.datasets.meds import read_meds
from mmclin.datasets.mimic import read_mimic_iv
from mmclin.training.data import featurize, fit_featurizers

NOTES = pl.List(pl.Struct({"time": pl.Float64, "text": pl.String}))
SUBJECTS = pl.DataFrame({"subject_id": [1, 2, 3], "prediction_time": [10.0, 10.0, 10.0]})
EVENTS = pl.DataFrame({"subject_id": [1, 1, 2], "time": [1.0, 2.0, 3.0], "code": ["HR", "LAC", "HR"],
                       "numeric_value": [80.0, 2.0, 90.0]})
NOTES_LONG = pl.DataFrame({"subject_id": [1, 2], "time": [1.0, 2.0], "text": ["stable", "febrile"]})


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _datasets_records(caplog) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "mmclin.datasets"]


# ------------------------------------------------------------------------ builder errors
def _latin1_notes(tmp):
    return notes_to_frame(_write(tmp / "notes.csv", b"subject_id,time,text\n1,1.0,ok\n2,2.0,caf\xe9 au lait\n"),
                          SUBJECTS)


def _latin1_events_gz(tmp):
    path = tmp / "labs.csv.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(b"subject_id,time,code,numeric_value\n1,1.0,HR,80\n1,2.0,\xff\xfeHR,81\n")
    return events_to_frame(path, SUBJECTS)


def _text_not_string(tmp):
    return notes_to_frame(NOTES_LONG.with_columns(pl.Series("text", [1, 2])), SUBJECTS)


def _text_binary(tmp):
    return notes_to_frame(NOTES_LONG.with_columns(pl.col("text").cast(pl.Binary)), SUBJECTS)


def _unparseable_time(tmp):
    path = _write(tmp / "ev.csv", b"subject_id,time,code,numeric_value\n1,2100-01-01 10:00:00,HR,80\n"
                                  b"1,yesterday,HR,81\n")
    subjects = SUBJECTS.with_columns(pl.lit(dt.datetime(2100, 1, 2)).alias("prediction_time"))
    return events_to_frame(path, subjects)


def _unparseable_note_time(tmp):
    notes = pl.DataFrame({"subject_id": [1, 2], "time": ["2100-01-01 10:00:00", "n/a"], "text": ["a", "b"]})
    return notes_to_frame(notes, SUBJECTS.with_columns(pl.lit(dt.datetime(2100, 1, 2)).alias("prediction_time")))


def _non_numeric_value(tmp):
    path = _write(tmp / "ev.csv", b"subject_id,time,code,numeric_value\n1,1.0,HR,80\n1,2.0,TROP,<0.01\n")
    return events_to_frame(path, SUBJECTS)


def _non_numeric_wide(tmp):
    wide = pl.DataFrame({"subject_id": [1, 1], "time": [1.0, 2.0], "HR": [80.0, 81.0], "GCS": ["15", "E4V5M6"]})
    return events_to_frame(wide, SUBJECTS, layout="wide", value_columns=["HR", "GCS"])


def _id_dtype_mismatch(tmp):
    return events_to_frame(EVENTS.with_columns(pl.col("subject_id").cast(pl.String)), SUBJECTS)


def _missing_column_in_file(tmp):
    EVENTS.rename({"code": "concept"}).write_parquet(tmp / "ev.parquet")
    return events_to_frame(tmp / "ev.parquet", SUBJECTS)


def _no_prediction_time(tmp):
    return events_to_frame(EVENTS, SUBJECTS.with_columns(pl.when(pl.col("subject_id") == 3).then(None)
                                                         .otherwise(pl.col("prediction_time")).alias("prediction_time")))


BUILDER_CASES = [
    ("notes csv not utf-8", _latin1_notes, ValueError,
     r"notes file '.*notes\.csv' is not valid UTF-8: byte\(s\) E9 at byte offset 39, line 3; re-encode"),
    ("events csv.gz not utf-8", _latin1_events_gz, ValueError,
     r"events file '.*labs\.csv\.gz' is not valid UTF-8: byte\(s\) FF at byte offset 53 \(uncompressed\), line 3"),
    ("note text not a string", _text_not_string, ValueError, r"notes column 'text' has dtype Int64; expected text \(String\)"),
    ("note text binary", _text_binary, ValueError, r"column 'text' has dtype Binary; expected text \(String\) \(binary: decode"),
    ("unparseable event time", _unparseable_time, ValueError,
     r"events file '.*ev\.csv' column 'time' has dtype String: row 1 \('yesterday'\) is not a datetime"),
    ("unparseable note time", _unparseable_note_time, ValueError,
     r"notes column 'time' has dtype String: row 1 \('n/a'\) is not a datetime"),
    ("non-numeric value", _non_numeric_value, ValueError,
     r"events file '.*ev\.csv' column 'numeric_value' has dtype String \(row 1: '<0\.01' is not a number\); "
     r"expected numeric values \(text values belong in notes_to_frame\)"),
    ("non-numeric wide variable", _non_numeric_wide, ValueError,
     r"layout='wide': events column 'GCS' has dtype String \(row 1: 'E4V5M6' is not a number\)"),
    ("id dtypes differ between tables", _id_dtype_mismatch, ValueError,
     r"events column 'subject_id' has dtype String but subjects column 'subject_id' has dtype Int64; the ids cannot match"),
    ("file lacks a column", _missing_column_in_file, ValueError,
     r"events file '.*ev\.parquet' has no column 'code'; its columns are \['subject_id', 'time', 'concept', 'numeric_value'\]"),
    ("subject row without cutoff", _no_prediction_time, ValueError,
     r"subjects row 2 \(subject_id=3\) has no prediction time in column 'prediction_time'"),
]


@pytest.mark.parametrize("case,build,error,message", BUILDER_CASES, ids=[c[0] for c in BUILDER_CASES])
def test_builder_bad_input(case, build, error, message, tmp_path):
    with pytest.raises(error, match=message):
        build(tmp_path)


def test_first_invalid_utf8_across_chunk_boundary(tmp_path):
    # a valid 2-byte character split by the 1 MiB chunk boundary is not an error; a bad byte after it is
    data = b"a" * ((1 << 20) - 1) + "é".encode() + b"\nok\n\x80"
    assert first_invalid_utf8(_write(tmp_path / "x.csv", data)) == (len(data) - 1, 3, b"\x80")
    assert first_invalid_utf8(_write(tmp_path / "y.csv", "ünïcode\n".encode())) is None


# --------------------------------------------------------------- handled and reported
def test_events_of_unknown_subjects_are_reported_with_counts_not_ids(caplog):
    caplog.set_level(logging.INFO, logger="mmclin")
    events = pl.concat([EVENTS, pl.DataFrame({"subject_id": [41, 41, 42], "time": [1.0, 2.0, 1.0],
                                              "code": ["HR"] * 3, "numeric_value": [1.0, 2.0, 3.0]})])
    out = events_to_frame(events, SUBJECTS, name="labs")
    assert out["labs"].list.len().to_list() == [2, 1, None]  # subject 3 has no events: absent, not an error
    warnings = [m for lv, m in _datasets_records(caplog) if lv == "WARNING"]
    assert len(warnings) == 1 and "events for modality 'labs': 3 event(s) of 2 'subject_id' value(s) not in the " \
        "subjects frame were not used;" in warnings[0] and "41" not in warnings[0]


def test_subjects_without_events_are_absent_and_not_reported(caplog):
    caplog.set_level(logging.DEBUG, logger="mmclin")
    out = events_to_frame(EVENTS, SUBJECTS, name="labs")
    assert out["labs"][2] is None and _datasets_records(caplog) == []


def test_duplicated_subject_rows(caplog):
    caplog.set_level(logging.INFO, logger="mmclin")
    # same id, different cutoffs: several predictions per subject, by design (no warning)
    several = pl.DataFrame({"subject_id": [1, 1], "prediction_time": [1.5, 10.0]})
    out = events_to_frame(EVENTS.filter(pl.col("subject_id") == 1), several, name="labs")
    assert out["labs"].list.len().to_list() == [1, 2]
    assert not [m for lv, m in _datasets_records(caplog) if lv == "WARNING"]
    # same id and cutoff twice: duplicate predictions, reported as a count
    twice = pl.concat([SUBJECTS, SUBJECTS.head(1)])
    out = events_to_frame(EVENTS, twice, name="labs")
    assert out.height == 4 and out["labs"][0].to_list() == out["labs"][3].to_list()
    assert any(lv == "WARNING" and "subjects: 1 row(s) repeat another row's 'subject_id' and prediction time" in m
               for lv, m in _datasets_records(caplog))


def test_duplicated_ids_in_the_cohort_frame_are_an_error():
    frame = pl.DataFrame({"subject_id": [1, 2, 2, 3], "a": [0.1, 0.2, 0.3, 0.4]})
    clf = MultimodalClassifier(modalities=[ModalitySpec(name="t", kind="tabular", columns=["a"])], id_column="subject_id",
                               max_epochs=1)
    with pytest.raises(ValueError, match=r"id column 'subject_id' has duplicated ids, e.g. \[2\]; the frame must have "
                                         "one row per subject"):
        clf.fit(frame, np.array([0, 1, 0, 1]))


def test_events_after_the_prediction_time_are_excluded_and_counted(caplog):
    caplog.set_level(logging.INFO, logger="mmclin")
    events = pl.DataFrame({"subject_id": [1, 1, 1, 2], "time": [1.0, 10.0, 10.5, 99.0], "code": ["HR"] * 4,
                           "numeric_value": [1.0, 2.0, 3.0, 4.0]})
    out = events_to_frame(events, SUBJECTS, name="labs")
    assert [e["value"] for e in out["labs"][0]] == [1.0, 2.0] and out["labs"][1] is None  # time == cutoff is kept
    infos = [m for lv, m in _datasets_records(caplog) if lv == "INFO"]
    assert infos == ["events for modality 'labs': 2 event(s) after the prediction time excluded before aggregation "
                     "(counted once per prediction row)"]


def test_events_with_null_ids_or_times_are_dropped_and_reported(caplog):
    caplog.set_level(logging.INFO, logger="mmclin")
    events = pl.DataFrame({"subject_id": [1, None, 1, 2, 2], "time": [1.0, 2.0, None, None, 3.0],
                           "code": ["HR"] * 5, "numeric_value": [1.0, 2.0, 3.0, 4.0, 5.0]})
    out = events_to_frame(events, SUBJECTS, name="labs")
    assert [e["value"] for e in out["labs"][0]] == [1.0] and [e["value"] for e in out["labs"][1]] == [5.0]
    warnings = [m for lv, m in _datasets_records(caplog) if lv == "WARNING"]
    assert "events for modality 'labs': 1 event(s) with a null 'subject_id' were dropped (first at events row 1)" in warnings
    assert any("2 event(s) with a null 'time' were dropped (first at events row 2)" in m for m in warnings), warnings


def test_events_before_admission(caplog):
    caplog.set_level(logging.INFO, logger="mmclin")
    t0 = dt.datetime(2100, 1, 1)
    subjects = pl.DataFrame({"subject_id": [1], "admit": [t0], "cut": [t0 + dt.timedelta(hours=24)]})
    events = pl.DataFrame({"subject_id": [1, 1, 1], "time": [t0 - dt.timedelta(hours=5), t0, t0 + dt.timedelta(hours=2)],
                           "code": ["HR"] * 3, "numeric_value": [1.0, 2.0, 3.0]})
    out = events_to_frame(events, subjects, name="labs", prediction_time="cut", window_start="admit",
                          relative_to="window_start")
    assert [e["time"] for e in out["labs"][0]] == [0.0, 2.0]  # the event before admission is not used: no negative times
    assert any("1 event(s) before the window start excluded" in m for _, m in _datasets_records(caplog))
    raw = events_to_frame(events, subjects, name="labs", prediction_time="cut", relative_to=None, time_unit="h")
    assert len(raw["labs"][0]) == 3  # without a window start nothing is cut before the prediction time


@pytest.mark.parametrize("empty", ["", "   ", "\n\t", None], ids=["empty", "spaces", "newline-tab", "null"])
def test_empty_note_is_no_note(empty, caplog):
    caplog.set_level(logging.INFO, logger="mmclin")
    notes = pl.DataFrame({"subject_id": [1, 1, 2], "time": [1.0, 2.0, 1.0], "text": ["stable", empty, empty]},
                         schema={"subject_id": pl.Int64, "time": pl.Float64, "text": pl.String})
    out = notes_to_frame(notes, SUBJECTS)
    assert out["notes"].to_list() == [[{"time": -9.0, "text": "stable"}], None, None]  # subject 2: absent, not empty
    assert any("2 note(s) with empty or whitespace-only text dropped" in m for _, m in _datasets_records(caplog))
    # the featurizer applies the same rule to a frame built by hand
    spec = ModalitySpec(name="n", kind="notes", columns=["notes"], options={"n_features": 2**6})
    frame = pl.DataFrame({"notes": [[{"time": -1.0, "text": "stable"}, {"time": 0.0, "text": empty}],
                                    [{"time": -1.0, "text": empty}]]}, schema={"notes": NOTES})
    f = fit_featurizers(frame, [spec])["n"]
    table = featurize(frame, {"n": f})
    assert table.present["n"].tolist() == [True, False]
    assert table.batch(np.arange(2)).inputs["n"]["note_mask"].tolist() == [[True], [False]]


def test_all_training_notes_empty_is_an_error():
    spec = ModalitySpec(name="n", kind="notes", columns=["notes"])
    frame = pl.DataFrame({"notes": [[{"time": -1.0, "text": " "}], [{"time": -1.0, "text": ""}]]}, schema={"notes": NOTES})
    with pytest.raises(ValueError, match="modality 'n', column 'notes': every training note has empty or whitespace-only"):
        fit_featurizers(frame, [spec])


FEATURIZER_CASES = [
    ("note text not a string", ModalitySpec(name="n", kind="notes", columns=["notes"]),
     pl.DataFrame({"notes": [[{"time": 0.0, "text": 3}]]}),
     r"modality 'n', column 'notes': struct field 'text' has dtype Int64, expected text"),
    ("event value not a number", ModalitySpec(name="e", kind="irregular_series", columns=["ev"]),
     pl.DataFrame({"ev": [[{"time": 0.0, "code": "HR", "value": "high"}]]}),
     r"modality 'e', column 'ev': struct field 'value' has dtype String, expected number"),
    ("event without time", ModalitySpec(name="e", kind="irregular_series", columns=["ev"]),
     pl.DataFrame({"ev": [[{"time": 0.0, "code": "HR", "value": 1.0}], [{"time": None, "code": "HR", "value": 1.0}]]}),
     r"modality 'e', column 'ev', row 1: an event has no finite time"),
    ("events not built", ModalitySpec(name="e", kind="irregular_series", columns=["ev"]),
     pl.DataFrame({"ev": ["HR=80"]}),
     r"modality 'e', column 'ev': expected list\[struct\{time, code, value\}\].*events_to_frame"),
]


@pytest.mark.parametrize("case,spec,frame,message", FEATURIZER_CASES, ids=[c[0] for c in FEATURIZER_CASES])
def test_featurizer_bad_input(case, spec, frame, message):
    with pytest.raises(ValueError, match=message):
        fit_featurizers(frame, [spec])


# ------------------------------------------------------------------- MEDS and MIMIC files
def test_meds_shard_missing_a_column_is_named(tmp_path):
    (tmp_path / "data").mkdir()
    good = pl.DataFrame({"subject_id": [1], "time": [dt.datetime(2100, 1, 1)], "code": ["HR"], "numeric_value": [1.0]})
    good.write_parquet(tmp_path / "data" / "0.parquet")
    good.drop("code").write_parquet(tmp_path / "data" / "1.parquet")  # numeric_value is optional in MEDS; code is not
    labels = pl.DataFrame({"subject_id": [1], "prediction_time": [dt.datetime(2100, 1, 2)], "boolean_value": [True]})
    with pytest.raises(ValueError, match=r"MEDS events file '.*data/1\.parquet' lacks column\(s\) \['code'\]; "
                                         r"it has columns \['subject_id', 'time', 'numeric_value'\]"):
        read_meds(tmp_path, labels)
    (tmp_path / "data" / "0.parquet").unlink()
    (tmp_path / "data" / "1.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="MEDS data folder .* holds no .parquet files"):
        read_meds(tmp_path, labels)


def _mimic(tmp_path, admissions: bytes | None = None):
    hosp = tmp_path / "hosp"
    hosp.mkdir()
    _write(hosp / "admissions.csv", admissions or (
        b"subject_id,hadm_id,admittime,dischtime,deathtime,hospital_expire_flag\n"
        b"1,10,2100-01-01 00:00:00,2100-01-09 00:00:00,,0\n2,20,2100-01-01 00:00:00,2100-01-08 00:00:00,,1\n"))
    _write(hosp / "patients.csv", b"subject_id,gender,anchor_age,anchor_year\n1,F,60,2100\n2,M,70,2100\n")
    return tmp_path


def test_mimic_reader_works_on_the_fixture(tmp_path):
    c = read_mimic_iv(_mimic(tmp_path))
    assert c.frame["hadm_id"].to_list() == [10, 20] and c.y.tolist() == [0, 1]


MIMIC_CASES = [
    ("admissions lack a column", b"subject_id,hadm_id,admittime,dischtime,hospital_expire_flag\n1,10,2100-01-01 00:00:00,"
     b"2100-01-09 00:00:00,0\n", ValueError,
     r"'.*hosp/admissions\.csv' \(admissions\) lacks columns \['deathtime'\]; expected the MIMIC-IV layout with .*; "
     r"it has columns \['subject_id', 'hadm_id', 'admittime', 'dischtime', 'hospital_expire_flag'\]"),
    ("admissions not utf-8", b"subject_id,hadm_id,admittime,dischtime,deathtime,hospital_expire_flag,admission_location\n"
     b"1,10,2100-01-01 00:00:00,2100-01-09 00:00:00,,0,M\xe9decine\n", ValueError,
     r"MIMIC-IV file '.*hosp/admissions\.csv' is not valid UTF-8: byte\(s\) E9 at byte offset \d+, line 2"),
    ("unparseable admittime", b"subject_id,hadm_id,admittime,dischtime,deathtime,hospital_expire_flag\n"
     b"1,10,2100-01-01 00:00:00,2100-01-09 00:00:00,,0\n2,20,01/01/2100,2100-01-09 00:00:00,,0\n", ValueError,
     r"'.*admissions\.csv' \(admissions\) row 1: admittime '01/01/2100' is not a 'YYYY-MM-DD HH:MM:SS' datetime"),
    ("unparseable deathtime", b"subject_id,hadm_id,admittime,dischtime,deathtime,hospital_expire_flag\n"
     b"1,10,2100-01-01 00:00:00,2100-01-09 00:00:00,unknown,1\n", ValueError,
     r"\(admissions\) row 0: deathtime 'unknown' is not a 'YYYY-MM-DD HH:MM:SS' datetime"),
]


@pytest.mark.parametrize("case,admissions,error,message", MIMIC_CASES, ids=[c[0] for c in MIMIC_CASES])
def test_mimic_bad_files(case, admissions, error, message, tmp_path):
    with pytest.raises(error, match=message):
        read_mimic_iv(_mimic(tmp_path, admissions))


def test_mimic_labevents_missing_a_column_is_named(tmp_path):
    root = _mimic(tmp_path)
    _write(root / "hosp" / "labevents.csv", b"subject_id,hadm_id,itemid,charttime,value\n1,10,50813,2100-01-01 01:00:00,2\n")
    with pytest.raises(ValueError, match=r"'.*labevents\.csv' \(LAB\) lacks columns \['valuenum'\].*it has columns "
                                         r"\['subject_id', 'hadm_id', 'itemid', 'charttime', 'value'\]"):
        read_mimic_iv(root)
