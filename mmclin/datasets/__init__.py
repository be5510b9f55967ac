"""Cohorts: built-in real ones (scikit-survival bundled data) and synthetic ones with planted signal."""
from mmclin.cohort import Cohort
from mmclin.datasets.builtin import COHORTS, list_cohorts, load_cohort
from mmclin.datasets.synthetic import make_synthetic_cohort
from mmclin.datasets.events import events_to_frame, notes_to_frame
from mmclin.datasets.synthetic_icu import make_icu_tables, make_synthetic_icu
from mmclin.datasets.slides import export_heatmaps, extract_bags, make_planted_slide_set, slide_attention
from mmclin.datasets.tcga import load_tcga_layout

__all__ = ["COHORTS", "Cohort", "list_cohorts", "load_cohort", "make_synthetic_cohort",
           "extract_bags", "export_heatmaps", "make_planted_slide_set", "slide_attention", "load_tcga_layout",
           "events_to_frame", "notes_to_frame", "make_icu_tables", "make_synthetic_icu"]
