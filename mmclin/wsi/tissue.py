"""Tissue detection on a slide thumbnail: Otsu threshold on saturation, then cleanup.

H&E tissue is coloured while glass background is near white/grey; saturation separates
them robustly across stain intensities (the heuristic of CLAM and histolab).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D array of values in [0, 1] (maximises between-class variance)."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between))])


def tissue_mask(thumbnail: np.ndarray, min_saturation: float = 0.05, min_area_fraction: float = 0.001,
                close_iterations: int = 2) -> np.ndarray:
    """Boolean tissue mask of a thumbnail.

    Args:
        thumbnail: RGB uint8 image.
        min_saturation: floor on the Otsu threshold, so a slide that is all glass yields no tissue.
        min_area_fraction: connected components smaller than this fraction of the image are dropped.
        close_iterations: binary closing/opening iterations (fills nuclei holes, removes dust).

    Shapes:
        thumbnail: ``[h, w, 3]`` uint8 -> mask ``[h, w]`` bool.
    """
    if thumbnail.ndim != 3 or thumbnail.shape[2] < 3:
        raise ValueError(f"tissue_mask expects an RGB thumbnail [h, w, 3], got shape {thumbnail.shape}")
    rgb = thumbnail[..., :3].astype(np.float32) / 255.0
    mx, mn = rgb.max(-1), rgb.min(-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    dark = mx < 0.1  # black pen / scanner borders are not tissue
    thr = max(otsu_threshold(sat.ravel()), min_saturation)
    mask = (sat > thr) & ~dark
    if close_iterations:
        mask = ndimage.binary_closing(mask, iterations=close_iterations)
        mask = ndimage.binary_opening(mask, iterations=1)
        holes = ndimage.binary_fill_holes(mask) & ~mask
        hl, hn = ndimage.label(holes)
        if hn:  # fill small holes (nuclei, fat) but keep real lumens/glass inside the tissue outline
            small = np.flatnonzero(np.bincount(hl.ravel())[1:] < 0.002 * mask.size) + 1
            mask |= np.isin(hl, small)
    labels, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(labels.ravel())[1:]
        keep = np.flatnonzero(sizes >= min_area_fraction * mask.size) + 1
        mask = np.isin(labels, keep)
    return mask
