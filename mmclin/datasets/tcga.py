"""A TCGA-style cohort layout -> one frame: clinical table + expression matrix + slide manifest.

The layout of TCGA / GDC downloads (and of the CMTA / MCAT / PORPOISE repositories):

- **clinical** (CSV/TSV/parquet or a frame): one row per case, a case id (``case_submitter_id``
  / ``bcr_patient_barcode``: ``TCGA-XX-XXXX``), survival as either ``event`` + ``time`` columns,
  or GDC's ``vital_status`` + ``days_to_death`` + ``days_to_last_follow_up``; other columns
  are clinical covariates.
- **expression** (CSV/TSV/parquet or a frame): genes x samples (first column gene names,
  one column per sample barcode ``TCGA-XX-XXXX-01A-...``) as GDC/cBioPortal ship it, or
  samples x genes (first column the barcode); ``orientation`` says which, ``"auto"`` guesses
  from where the barcodes are.
- **slides** (CSV/TSV/parquet or a frame): ``(barcode or case id, slide_path)``; the path is a
  slide file or a feature bag. Several slides per case: diagnostic (``-DX``) slides first,
  then the first in file order.

Sample barcodes map to cases by their first 12 characters; only primary-tumour samples
(sample type ``01``-``09``) are used for expression, one per case (the first in sorted order).
Cases are kept when they have a survival outcome; expression and slides may be absent (null).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from mmclin.cohort import Cohort, ModalitySpec, to_polars

BARCODE = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}", re.IGNORECASE)


def _read(obj: Any, what: str) -> pl.DataFrame:
    if isinstance(obj, (str, Path)):
        p = Path(obj)
        if not p.is_file():
            raise FileNotFoundError(f"TCGA {what} file {str(p)!r} does not exist")
        name = p.name.lower()
        if name.endswith(".parquet"):
            return pl.read_parquet(p)
        sep = "\t" if name.endswith((".tsv", ".txt", ".tsv.gz", ".txt.gz")) else ","
        return pl.read_csv(p, separator=sep, infer_schema_length=10000, null_values=["", "NA", "'--", "--", "[Not Available]"])
    return to_polars(obj)


def case_id(barcode: str) -> str:
    """``TCGA-A1-A0SB-01A-11R-A144-07`` -> ``TCGA-A1-A0SB``."""
    m = BARCODE.match(str(barcode))
    if not m:
        raise ValueError(f"{barcode!r} is not a TCGA barcode (expected 'TCGA-XX-XXXX...')")
    return m.group(0).upper()


def _is_tumour_sample(barcode: str) -> bool:
    parts = str(barcode).split("-")
    return len(parts) < 4 or (parts[3][:2].isdigit() and 1 <= int(parts[3][:2]) <= 9)


def _survival(clin: pl.DataFrame) -> pl.DataFrame:
    if {"event", "time"} <= set(clin.columns):
        return clin.with_columns(pl.col("event").cast(pl.Boolean), pl.col("time").cast(pl.Float64))
    need = {"vital_status", "days_to_death", "days_to_last_follow_up"}
    if not need <= set(clin.columns):
        raise ValueError(f"TCGA clinical table: survival needs columns 'event' + 'time', or {sorted(need)}; "
                         f"found {clin.columns[:12]}")
    dead = pl.col("vital_status").cast(pl.String).str.to_lowercase() == "dead"
    time = pl.when(dead).then(pl.col("days_to_death").cast(pl.Float64, strict=False)) \
        .otherwise(pl.col("days_to_last_follow_up").cast(pl.Float64, strict=False))
    return clin.with_columns(dead.alias("event"), time.alias("time")).drop(sorted(need))


def load_tcga_layout(clinical: Any, expression: Any = None, slides: Any = None, case_column: str | None = None,
                     orientation: str = "auto", covariates: list[str] | None = None, slide_column: str = "slide_path",
                     slide_options: dict[str, Any] | None = None, min_time: float = 1.0) -> Cohort:
    """Join clinical + expression + slides into one row per case (survival task).

    Returns a :class:`~mmclin.cohort.Cohort` whose frame has ``case_id``, the clinical
    covariates, one ``expression`` ``list[f32]`` column (genes in ``cohort.extra["genes"]``),
    ``slide_path``, ``event`` and ``time``; modalities ``clinical`` (tabular), ``genes``
    (genomics) and ``slide`` (slide, with ``slide_options``), each only when it has data.
    ``slide_options={"root": "/data/slides"}`` keeps the manifest's slide paths under that root
    (relative paths are taken under it; see :func:`mmclin.persistence.paths.resolve_under_root`).
    Follow-up times below ``min_time`` (0-day follow-up is common in TCGA) are raised to it.
    """
    clin = _read(clinical, "clinical")
    ids = [c for c in ([case_column] if case_column else ["case_submitter_id", "bcr_patient_barcode", "case_id", "patient_id"]) if c in clin.columns]
    if not ids:
        raise ValueError(f"TCGA clinical table: no case id column (looked for {case_column or 'case_submitter_id / bcr_patient_barcode / case_id / patient_id'}); columns: {clin.columns[:12]}")
    clin = clin.rename({ids[0]: "case_id"}) if ids[0] != "case_id" else clin
    bad = [b for b in clin["case_id"].to_list() if b is None or not BARCODE.match(str(b))]
    if bad:
        raise ValueError(f"TCGA clinical table, column {ids[0]!r}: {bad[0]!r} is not a TCGA case barcode")
    clin = _survival(clin.with_columns(pl.col("case_id").map_elements(case_id, return_dtype=pl.String)))
    clin = clin.unique("case_id", keep="first", maintain_order=True)
    missing = clin.filter(pl.col("time").is_null() | pl.col("event").is_null())
    clin = clin.filter(pl.col("time").is_not_null() & pl.col("event").is_not_null())
    clin = clin.with_columns(pl.col("time").clip(lower_bound=min_time))
    covariates = covariates if covariates is not None else [c for c in clin.columns if c not in ("case_id", "event", "time")]
    frame = clin.select(["case_id", *covariates, "event", "time"])
    modalities = []
    if covariates:
        modalities.append(ModalitySpec(name="clinical", kind="tabular", columns=covariates))
    extra: dict[str, Any] = {"dropped_without_outcome": missing["case_id"].to_list()}
    if expression is not None:
        expr = _read(expression, "expression")
        first = expr.columns[0]
        barcodes_in_columns = sum(bool(BARCODE.match(c)) for c in expr.columns[1:])
        if orientation == "auto":
            orientation = "genes_x_samples" if barcodes_in_columns > 0 else "samples_x_genes"
        if orientation == "genes_x_samples":
            genes = [str(g) for g in expr[first].to_list()]
            samples = [c for c in expr.columns[1:] if BARCODE.match(c)]
            values = expr.select(samples).to_numpy().astype(np.float32).T
        elif orientation == "samples_x_genes":
            samples = [str(s) for s in expr[first].to_list()]
            genes = expr.columns[1:]
            bad = [s for s in samples if not BARCODE.match(s)]
            if bad:
                raise ValueError(f"TCGA expression, column {first!r}: {bad[0]!r} is not a TCGA sample barcode")
            values = expr.select(genes).to_numpy().astype(np.float32)
        else:
            raise ValueError(f"orientation must be 'auto', 'genes_x_samples' or 'samples_x_genes', got {orientation!r}")
        order = sorted((s, i) for i, s in enumerate(samples) if _is_tumour_sample(s))
        rows: dict[str, int] = {}
        for s, i in order:
            rows.setdefault(case_id(s), i)
        ex = pl.DataFrame({"case_id": list(rows), "expression": [values[i].tolist() for i in rows.values()]},
                          schema={"case_id": pl.String, "expression": pl.List(pl.Float32)})
        frame = frame.join(ex, on="case_id", how="left")
        modalities.append(ModalitySpec(name="genes", kind="genomics", columns=["expression"]))
        extra["genes"] = list(genes)
    if slides is not None:
        man = _read(slides, "slide manifest")
        key = next((c for c in ("case_id", "case_submitter_id", "barcode", "slide_barcode", "slide_id", "file_name") if c in man.columns), None)
        if key is None or slide_column not in man.columns:
            raise ValueError(f"TCGA slide manifest needs a barcode/case column and {slide_column!r}; found {man.columns}")
        man = man.with_columns(pl.col(key).map_elements(case_id, return_dtype=pl.String).alias("_case"),
                               pl.col(key).cast(pl.String).str.contains("-DX").alias("_dx"))
        man = man.with_row_index("_i").sort(["_case", "_dx", "_i"], descending=[False, True, False]).unique("_case", keep="first")
        frame = frame.join(man.select(pl.col("_case").alias("case_id"), pl.col(slide_column).cast(pl.String).alias("slide_path")),
                           on="case_id", how="left")
        modalities.append(ModalitySpec(name="slide", kind="slide", columns=["slide_path"], options=slide_options or {}))
    from sksurv.util import Surv

    y = Surv.from_arrays(frame["event"].to_numpy(), frame["time"].to_numpy())
    return Cohort("tcga_layout", frame, modalities, y, "survival", "case_id", ["event", "time"],
                  description="TCGA-style clinical + expression + slide manifest", extra=extra)
