"""MEDS and MIMIC-IV readers on small fixtures written in the real column layouts."""
from __future__ import annotations

import datetime as dt
import gzip

import numpy as np
import polars as pl
import pytest

from mmclin import MultimodalClassifier
from mmclin.datasets.meds import read_meds
from mmclin.datasets.mimic import read_mimic_iv

T0 = dt.datetime(2150, 3, 1, 8, 0)


def h(hours: float) -> dt.datetime:
    return T0 + dt.timedelta(hours=hours)


@pytest.fixture()
def meds_root(tmp_path):
    root = tmp_path / "meds"
    (root / "data" / "train").mkdir(parents=True)
    (root / "metadata").mkdir()
    rows = [
        (1, None, "GENDER//F", None, None), (1, None, "AGE", 71.0, None),
        (1, h(1), "LAB//lactate", 4.0, None), (1, h(2), "VITAL//HR", 110.0, None), (1, h(30), "LAB//lactate", 9.0, None),
        (1, h(3), "NOTE//NURSING", None, "hypotensive, started pressors"), (1, h(40), "NOTE//DISCHARGE", None, "expired"),
        (2, None, "GENDER//M", None, None), (2, None, "AGE", 50.0, None),
        (2, h(5), "VITAL//HR", 75.0, None), (2, h(6), "DX//I10", None, None),
        (3, None, "GENDER//F", None, None), (3, h(2), "LAB//lactate", 1.1, None),
    ]
    schema = {"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float32,
              "text_value": pl.String}
    data = pl.DataFrame(rows, schema=schema, orient="row")
    data.filter(pl.col("subject_id") < 3).write_parquet(root / "data" / "train" / "0.parquet")
    data.filter(pl.col("subject_id") == 3).write_parquet(root / "data" / "1.parquet")
    pl.DataFrame({"subject_id": [1, 2, 3], "split": ["train", "train", "held_out"]}).write_parquet(
        root / "metadata" / "subject_splits.parquet")
    labels = pl.DataFrame({"subject_id": [1, 2, 3, 1], "prediction_time": [h(24), h(24), h(24), h(36)],
                           "boolean_value": [True, False, False, True]},
                          schema_overrides={"prediction_time": pl.Datetime("us")})
    return root, labels


def test_meds_reader(meds_root):
    root, labels = meds_root
    c = read_meds(root, labels, series={"labs": ["LAB//"], "vitals": ["VITAL//", "DX//"]})
    assert c.task == "binary" and c.y.tolist() == [1, 0, 0, 1]
    assert [(m.name, m.kind) for m in c.modalities] == [("static", "tabular"), ("labs", "irregular_series"),
                                                        ("vitals", "irregular_series"), ("notes", "notes")]
    f = c.frame
    assert f["sample_id"][0] == "1@2150-03-02T08:00:00" and f["subject_id"].to_list() == [1, 2, 3, 1]
    assert f["AGE"].to_list() == [71.0, 50.0, None, 71.0] and f["GENDER//F"].to_list() == [1.0, None, 1.0, 1.0]
    # the lactate at hour 30 is after the first prediction time (hour 24) but before the second (hour 36)
    assert [e["value"] for e in f["labs"][0]] == [4.0] and [e["value"] for e in f["labs"][3]] == [4.0, 9.0]
    assert f["labs"][0][0]["time"] == pytest.approx(-23.0)
    assert [e["code"] for e in f["vitals"][1]] == ["VITAL//HR", "DX//I10"] and f["vitals"][1][1]["value"] is None
    assert f["notes"][0].to_list() == [{"time": -21.0, "text": "hypotensive, started pressors"}]  # the discharge note is later
    assert f["notes"][2] is None and c.extra["split"].tolist() == ["train", "train", "held_out", "train"]
    with pytest.raises(ValueError, match="exactly one non-empty value column"):
        read_meds(root, labels.rename({"boolean_value": "label"}))


def _write_csv_gz(frame: pl.DataFrame, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as fh:
        frame.write_csv(fh, datetime_format="%Y-%m-%d %H:%M:%S")


@pytest.fixture()
def mimic_root(tmp_path):
    root = tmp_path / "mimiciv"
    n = 12
    adm = pl.DataFrame({
        "subject_id": [100 + i for i in range(n)], "hadm_id": [2000 + i for i in range(n)],
        "admittime": [h(0)] * n,
        "dischtime": [h(10)] + [h(100)] * (n - 1),  # the first admission ends before hour 48: excluded
        "deathtime": [None] * (n - 4) + [h(90)] * 4,
        "admission_type": ["EW EMER."] * n, "admit_provider_id": ["P1"] * n, "admission_location": ["EMERGENCY ROOM"] * n,
        "discharge_location": ["HOME"] * (n - 4) + ["DIED"] * 4, "insurance": ["Medicare", "Other"] * (n // 2),
        "language": ["ENGLISH"] * n, "marital_status": ["SINGLE"] * n, "race": ["WHITE"] * n,
        "edregtime": [None] * n, "edouttime": [None] * n,
        "hospital_expire_flag": [0] * (n - 4) + [1] * 4,
    }, schema_overrides={"deathtime": pl.Datetime("us"), "edregtime": pl.Datetime("us"), "edouttime": pl.Datetime("us")})
    _write_csv_gz(adm, root / "hosp" / "admissions.csv.gz")
    pat = pl.DataFrame({"subject_id": adm["subject_id"], "gender": ["F", "M"] * (n // 2), "anchor_age": [60 + i for i in range(n)],
                        "anchor_year": [2148] * n, "anchor_year_group": ["2017 - 2019"] * n, "dod": [None] * n},
                       schema_overrides={"dod": pl.Date})
    _write_csv_gz(pat, root / "hosp" / "patients.csv.gz")
    died = adm["hospital_expire_flag"].to_numpy()
    rows = []
    for i in range(n):
        sid, hid = 100 + i, 2000 + i
        lactate = 6.0 if died[i] else 1.0
        rows.append((i * 10 + 1, sid, hid, 50813, h(2), h(3), str(lactate), lactate))
        rows.append((i * 10 + 2, sid, hid, 50813, h(46), h(50), "99", 99.0))  # drawn before hour 48, resulted after
        rows.append((i * 10 + 3, sid, None, 50912, h(20), h(21), "1.1", 1.1))  # no hadm_id: matched by time window
        rows.append((i * 10 + 4, sid, hid, 50813, h(-30), h(-29), "7.0", 7.0))  # before admission: outside the window
    lab = pl.DataFrame(rows, schema={"labevent_id": pl.Int64, "subject_id": pl.Int64, "hadm_id": pl.Int64, "itemid": pl.Int64,
                                     "charttime": pl.Datetime("us"), "storetime": pl.Datetime("us"), "value": pl.String,
                                     "valuenum": pl.Float64}, orient="row").with_columns(
        specimen_id=pl.lit(1), order_provider_id=pl.lit(None, pl.String), valueuom=pl.lit("mmol/L"),
        ref_range_lower=pl.lit(0.5), ref_range_upper=pl.lit(2.0), flag=pl.lit(None, pl.String),
        priority=pl.lit("STAT"), comments=pl.lit(None, pl.String))
    _write_csv_gz(lab, root / "hosp" / "labevents.csv.gz")
    _write_csv_gz(pl.DataFrame({"itemid": [50813, 50912], "label": ["Lactate", "Creatinine"], "fluid": ["Blood"] * 2,
                                "category": ["Blood Gas", "Chemistry"]}), root / "hosp" / "d_labitems.csv.gz")
    chart = pl.DataFrame({"subject_id": adm["subject_id"], "hadm_id": adm["hadm_id"], "stay_id": [3000 + i for i in range(n)],
                          "caregiver_id": [1] * n, "charttime": [h(5)] * n, "storetime": [h(5.1)] * n, "itemid": [220045] * n,
                          "value": ["88"] * n, "valuenum": [88.0] * n, "valueuom": ["bpm"] * n, "warning": [0] * n})
    _write_csv_gz(chart, root / "icu" / "chartevents.csv.gz")
    _write_csv_gz(pl.DataFrame({"itemid": [220045], "label": ["Heart Rate"], "abbreviation": ["HR"], "linksto": ["chartevents"],
                                "category": ["Routine Vital Signs"], "unitname": ["bpm"], "param_type": ["Numeric"],
                                "lownormalvalue": [None], "highnormalvalue": [None]}), root / "icu" / "d_items.csv.gz")
    notes = {"radiology": ("RR", h(10), h(12), "Chest radiograph: bilateral opacities."),
             "discharge": ("DS", h(95), h(99), "Discharge summary: the patient expired.")}
    for kind, (nt, ct, st, text) in notes.items():
        _write_csv_gz(pl.DataFrame({"note_id": [f"{s}-{nt}-1" for s in adm["subject_id"]], "subject_id": adm["subject_id"],
                                    "hadm_id": adm["hadm_id"], "note_type": [nt] * n, "note_seq": [1] * n,
                                    "charttime": [ct] * n, "storetime": [st] * n, "text": [text] * n}),
                      root / "note" / f"{kind}.csv.gz")
    return root


def test_mimic_iv_reader(mimic_root):
    c = read_mimic_iv(mimic_root, prediction_hours=48)
    f = c.frame
    assert c.extra["n_excluded"] == 1 and f.height == 11 and "1 admission(s) excluded" in c.description
    assert [(m.name, m.kind) for m in c.modalities] == [("static", "tabular"), ("labs", "irregular_series"),
                                                        ("chart", "irregular_series"), ("notes", "notes")]
    assert f["hadm_id"][0] == 2001 and f["age"][0] == 61.0 + 2150 - 2148
    labs = f["labs"][0].to_list()
    # storetime orders and cuts: the hour-46 draw resulted at hour 50 is not used; the pre-admission lab is outside
    assert [e["code"] for e in labs] == ["LAB//50813//Lactate", "LAB//50912//Creatinine"]
    assert [e["time"] for e in labs] == pytest.approx([-45.0, -27.0])
    assert f["chart"][0].to_list() == [{"time": pytest.approx(-42.9), "code": "CHART//220045//Heart Rate", "value": 88.0}]
    assert f["notes"][0].to_list() == [{"time": -36.0, "text": "Chest radiograph: bilateral opacities."}]  # no discharge summary
    assert c.y.tolist() == [0] * 7 + [1] * 4
    charttime = read_mimic_iv(mimic_root, time_field="charttime")  # by charttime the hour-46 draw would be used
    assert [e["value"] for e in charttime.frame["labs"][0]][-1] == 99.0
    clf = MultimodalClassifier(modalities=c.modalities, max_epochs=2, batch_size=8, val_fraction=0, random_state=0)
    assert np.isfinite(clf.fit(f, c.y).predict_proba(f)).all()


def test_mimic_iv_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="MIMIC-IV file 'admissions' not found"):
        read_mimic_iv(tmp_path)
