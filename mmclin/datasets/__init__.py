"""Cohorts: built-in real ones (scikit-survival bundled data) and synthetic ones with planted signal."""
from mmclin.cohort import Cohort
from mmclin.datasets.builtin import COHORTS, list_cohorts, load_cohort
from mmclin.datasets.synthetic import make_synthetic_cohort
from mmclin.datasets.events import events_to_frame, notes_to_frame
from mmclin.datasets.event_store import events_to_store, notes_to_store
from mmclin.datasets.meds import meds_split_indices, read_meds, read_meds_labels, write_meds_predictions
from mmclin.datasets.synthetic_icu import make_icu_tables, make_synthetic_icu
from mmclin.datasets.slides import extract_bags, make_planted_slide_set
from mmclin.datasets.tcga import load_tcga_layout

__all__ = ["COHORTS", "Cohort", "list_cohorts", "load_cohort", "make_synthetic_cohort",
           "extract_bags", "make_planted_slide_set", "load_tcga_layout",
           "events_to_frame", "events_to_store", "notes_to_frame", "notes_to_store", "make_icu_tables", "make_synthetic_icu",
           "read_meds", "read_meds_labels", "meds_split_indices", "write_meds_predictions"]


def __getattr__(name: str):
    # attention and heatmaps of a fitted model are explanations (mmclin.explain) since 0.2; the old names still work
    if name in ("slide_attention", "export_heatmaps"):
        from mmclin._compat import moved_attribute

        return moved_attribute("mmclin.datasets", name, "mmclin.explain.attention")
    raise AttributeError(f"module 'mmclin.datasets' has no attribute {name!r}")
