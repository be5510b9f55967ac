"""A grid of patches over the tissue, at a chosen microns-per-pixel or magnification."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from mmclin.wsi.reading import SlideReader


@dataclass(frozen=True)
class PatchSettings:
    """How patches are cut.

    Args:
        patch_size: patch side in pixels at the target resolution (what the backbone sees).
        mpp: target microns per pixel (0.5 ~ 20x). ``magnification`` instead sets
            ``mpp = slide_mpp * objective_power / magnification``; one of them.
        magnification: target magnification (e.g. 20).
        stride: grid step at the target resolution (default: ``patch_size``, no overlap).
        min_tissue: fraction of a patch's area that must be tissue on the mask.
        thumbnail_size: longer side of the thumbnail used for the tissue mask and heatmaps.
    """

    patch_size: int = 224
    mpp: float | None = 0.5
    magnification: float | None = None
    stride: int | None = None
    min_tissue: float = 0.5
    thumbnail_size: int = 1024

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PatchGrid:
    """Patches kept on a slide.

    Shapes:
        coords: ``[N, 2]`` int64, top-left ``(x, y)`` in level-0 pixels.
        tissue: ``[N]`` float32, tissue fraction of each patch.
    """

    coords: np.ndarray
    tissue: np.ndarray
    size0: int  # patch side in level-0 pixels
    level: int  # pyramid level read from
    read_size: int  # patch side read at ``level`` (resized to patch_size when different)
    patch_size: int
    downsample: float  # target / level-0 pixel size
    mpp: float | None

    def __len__(self) -> int:
        return int(self.coords.shape[0])


def target_downsample(reader: SlideReader, settings: PatchSettings) -> tuple[float, float | None]:
    """Downsample from level 0 to the target resolution, and the resulting mpp."""
    if settings.magnification is not None:
        power = reader._slide.properties.get("tiffslide.objective-power") or reader._slide.properties.get("openslide.objective-power")
        if power in (None, ""):
            raise ValueError(f"slide {str(reader.path)!r}: no objective power in the file; give PatchSettings(mpp=...) instead of magnification")
        ds = float(power) / float(settings.magnification)
        return ds, (reader.mpp * ds if reader.mpp else None)
    if settings.mpp is None:
        return 1.0, reader.mpp
    if reader.mpp is None:
        raise ValueError(f"slide {str(reader.path)!r} records no microns per pixel; pass SlideReader(mpp=...) "
                         "or set PatchSettings(mpp=None) to patch at level 0")
    return settings.mpp / reader.mpp, settings.mpp


def patch_grid(reader: SlideReader, mask: np.ndarray, settings: PatchSettings) -> PatchGrid:
    """All grid patches whose tissue fraction on ``mask`` is at least ``settings.min_tissue``.

    Shapes:
        mask: ``[h, w]`` bool on the thumbnail (any aspect-preserving size).
    """
    ds, mpp = target_downsample(reader, settings)
    if ds < 1.0 - 1e-3:
        raise ValueError(f"slide {str(reader.path)!r}: target {mpp} um/px is finer than the scan ({reader.mpp} um/px)")
    W, H = reader.dimensions
    size0 = int(round(settings.patch_size * ds))
    step0 = int(round((settings.stride or settings.patch_size) * ds))
    xs = np.arange(0, W - size0 + 1, step0)
    ys = np.arange(0, H - size0 + 1, step0)
    gx, gy = np.meshgrid(xs, ys)
    coords = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.int64)
    # tissue fraction per patch via an integral image of the mask
    h, w = mask.shape
    sx, sy = w / W, h / H
    integral = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    x0 = np.clip(np.floor(coords[:, 0] * sx).astype(int), 0, w)
    y0 = np.clip(np.floor(coords[:, 1] * sy).astype(int), 0, h)
    x1 = np.clip(np.maximum(np.ceil((coords[:, 0] + size0) * sx).astype(int), x0 + 1), 0, w)
    y1 = np.clip(np.maximum(np.ceil((coords[:, 1] + size0) * sy).astype(int), y0 + 1), 0, h)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    frac = (integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]) / area
    keep = frac >= settings.min_tissue
    level = reader.best_level(ds)
    read_size = int(round(size0 / reader.level_downsamples[level]))
    return PatchGrid(coords[keep], frac[keep].astype(np.float32), size0, level, read_size,
                     settings.patch_size, ds, mpp)


def read_patches(reader: SlideReader, grid: PatchGrid, index: np.ndarray) -> np.ndarray:
    """Patches ``index`` of ``grid`` as uint8 ``[n, patch_size, patch_size, 3]``."""
    out = np.empty((len(index), grid.patch_size, grid.patch_size, 3), dtype=np.uint8)
    for j, i in enumerate(index):
        x, y = grid.coords[i]
        arr = reader.read(x, y, grid.level, (grid.read_size, grid.read_size))
        if grid.read_size != grid.patch_size:
            from PIL import Image

            arr = np.asarray(Image.fromarray(arr).resize((grid.patch_size, grid.patch_size), Image.BILINEAR))
        out[j] = arr
    return out
