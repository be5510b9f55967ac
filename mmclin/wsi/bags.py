"""Feature bags on disk: one directory per (slide, settings, backbone), written once, atomically.

Format (``<bag_dir>/<key>.bag/``), readable without mmclin:

- ``features.safetensors``: ``features`` float32 ``[N, D]``, ``coords`` int64 ``[N, 2]``
  (top-left ``x, y`` in level-0 pixels).
- ``coords.parquet``: ``x, y, tissue`` (one row per patch, same order).
- ``meta.json``: slide path, slide fingerprint, patch settings, backbone identity, ``patch_size_level0``,
  level read, slide dimensions and mpp, thumbnail size.
- ``thumbnail.png`` and ``tissue.png``: the thumbnail and its tissue mask (for QC and heatmaps).

``key`` is a SHA-256 of the slide's fingerprint (size + first/last MiB) + settings + backbone
identity, so a second run finds the bag and reuses it. While a slide is being embedded, chunks
are saved under ``<key>.partial/``; an interrupted run resumes from the last saved chunk. The
finished bag is assembled in a temporary directory and renamed into place (atomic on one
file system), so readers never see half a bag.

Bags from other pipelines load too: CLAM-style ``.h5`` (``features``, ``coords`` datasets)
and ``.pt`` (a tensor ``[N, D]`` or a dict with ``features``/``coords``; read with
``torch.load(weights_only=True)``), and a bare ``.safetensors`` with ``features``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmclin.wsi.backbones import Backbone, make_backbone
from mmclin.wsi.patching import PatchSettings, patch_grid, read_patches
from mmclin.wsi.reading import SlideReader
from mmclin.wsi.tissue import tissue_mask

BAG_SUFFIX = ".bag"
FORMAT_VERSION = 1


class NoTissueError(ValueError):
    """A slide on which the tissue mask keeps no patch: there is nothing to embed.

    The slide featurizer treats such a slide as absent for its subject (with a warning); called
    directly, :func:`extract_bag` raises it.
    """


@dataclass
class Bag:
    """A slide's patch features.

    Shapes:
        features: ``[N, D]`` float32. coords: ``[N, 2]`` int64 level-0 ``(x, y)`` or None.
    """

    features: np.ndarray
    coords: np.ndarray | None
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0])


def slide_fingerprint(path: Path, chunk: int = 1 << 20) -> str:
    """Size + first and last MiB: cheap for multi-GB slides, and changes when the file does."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(size - chunk, chunk))
            h.update(f.read(chunk))
    return h.hexdigest()


def bag_key(slide: Path, settings: PatchSettings, backbone: Backbone, mpp: float | None = None) -> str:
    payload = json.dumps({"v": FORMAT_VERSION, "slide": slide_fingerprint(slide), "settings": settings.to_dict(),
                          "backbone": backbone.identity, "mpp": mpp}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path)


def extract_bag(slide: str | Path, bag_dir: str | Path, settings: PatchSettings | None = None,
                backbone: Any = None, mpp: float | None = None, chunk_size: int = 256,
                max_chunks: int | None = None) -> Path:
    """Embed one slide's tissue patches and write its bag; returns the bag directory.

    An existing bag with the same key is reused untouched. ``max_chunks`` stops after that many
    new chunks (used to test resumption); the call then raises ``InterruptedError``.
    """
    slide = Path(slide)
    settings = settings or PatchSettings()
    backbone = make_backbone(backbone)
    bag_dir = Path(bag_dir)
    bag_dir.mkdir(parents=True, exist_ok=True)
    with SlideReader(slide, mpp=mpp) as reader:
        key = bag_key(slide, settings, backbone, mpp)
        final = bag_dir / f"{key}{BAG_SUFFIX}"
        if (final / "meta.json").is_file():
            return final
        thumb = reader.thumbnail(settings.thumbnail_size)
        mask = tissue_mask(thumb)
        grid = patch_grid(reader, mask, settings)
        if len(grid) == 0:
            raise NoTissueError(f"slide {str(slide)!r}: no patch has >= {settings.min_tissue:.0%} tissue "
                             f"({int(mask.sum())} tissue pixels on a {mask.shape} thumbnail); lower min_tissue or check the slide")
        partial = bag_dir / f"{key}.partial"
        partial.mkdir(exist_ok=True)
        from safetensors.numpy import load_file, save_file

        n_chunks = -(-len(grid) // chunk_size)
        new = 0
        for c in range(n_chunks):
            out = partial / f"chunk_{c:06d}.safetensors"
            if out.is_file():
                continue  # resumed: this chunk was finished before the interruption
            if max_chunks is not None and new >= max_chunks:
                raise InterruptedError(f"stopped after {new} chunks of slide {str(slide)!r} (max_chunks)")
            idx = np.arange(c * chunk_size, min((c + 1) * chunk_size, len(grid)))
            feats = backbone.embed(read_patches(reader, grid, idx))
            tmp = out.with_suffix(".tmp")
            save_file({"features": np.ascontiguousarray(feats, dtype=np.float32)}, str(tmp))
            os.replace(tmp, out)
            new += 1
        features = np.concatenate([load_file(str(partial / f"chunk_{c:06d}.safetensors"))["features"] for c in range(n_chunks)])
        meta = {
            "format_version": FORMAT_VERSION, "key": key, "slide": str(slide.resolve()),
            "slide_fingerprint": slide_fingerprint(slide), "settings": settings.to_dict(),
            "backbone": backbone.identity, "n_patches": int(len(grid)), "feature_dim": int(features.shape[1]),
            "patch_size_level0": grid.size0, "level": grid.level, "read_size": grid.read_size,
            "slide_dimensions": list(reader.dimensions), "slide_mpp": reader.mpp, "target_mpp": grid.mpp,
            "thumbnail_shape": list(thumb.shape[:2]),
        }
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=bag_dir))
        try:
            save_file({"features": features.astype(np.float32), "coords": grid.coords.astype(np.int64)},
                      str(tmpdir / "features.safetensors"))
            import polars as pl

            pl.DataFrame({"x": grid.coords[:, 0], "y": grid.coords[:, 1], "tissue": grid.tissue}).write_parquet(tmpdir / "coords.parquet")
            _save_png(thumb, tmpdir / "thumbnail.png")
            _save_png((mask * 255).astype(np.uint8), tmpdir / "tissue.png")
            (tmpdir / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                os.rename(tmpdir, final)
            except OSError:  # another process finished the same bag first: keep theirs
                if not (final / "meta.json").is_file():
                    raise
                shutil.rmtree(tmpdir, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise
        shutil.rmtree(partial, ignore_errors=True)
        return final


def is_bag_path(path: str | Path) -> bool:
    p = str(path).lower()
    return p.endswith((BAG_SUFFIX, ".h5", ".hdf5", ".pt", ".pth", ".safetensors"))


def load_bag(path: str | Path) -> Bag:
    """Read a bag: an mmclin ``.bag`` directory, a CLAM-style ``.h5``/``.pt``, or a ``.safetensors``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"feature bag {str(path)!r} does not exist")
    try:
        feats, coords, meta = _read_bag(path)
    except (ValueError, ImportError):
        raise
    except Exception as e:  # a codec / unpickling / HDF5 error: name the file and what it should be
        import pickle

        if isinstance(e, pickle.UnpicklingError):  # torch's own text advises weights_only=False: unsafe on data files
            detail = "UnpicklingError: .pt bags are read with torch.load(weights_only=True), tensors and plain containers only"
        else:
            detail = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        raise ValueError(f"feature bag {str(path)!r}: cannot read it ({detail}); "
                         f"the file is corrupt or not a {_expected(path.name.lower())}") from e
    feats = np.asarray(feats)
    if feats.ndim == 3 and feats.shape[0] == 1:  # some pipelines save [1, N, D]
        feats = feats[0]
    if feats.ndim != 2:
        raise ValueError(f"feature bag {str(path)!r}: features must be [N, D], got shape {feats.shape}")
    if coords is not None:
        coords = np.asarray(coords).reshape(-1, 2).astype(np.int64)
        if coords.shape[0] != feats.shape[0]:
            raise ValueError(f"feature bag {str(path)!r}: {feats.shape[0]} feature rows but {coords.shape[0]} coords")
    if not np.isfinite(feats).all():
        raise ValueError(f"feature bag {str(path)!r}: features contain NaN or inf")
    return Bag(feats.astype(np.float32, copy=False), coords, meta, path)


_FORMATS = {BAG_SUFFIX: "mmclin .bag directory (features.safetensors + meta.json)", ".safetensors": "safetensors file",
            ".h5": "CLAM-style HDF5 file", ".hdf5": "CLAM-style HDF5 file",
            ".pt": "torch file (a tensor [N, D] or a dict with 'features')", ".pth": "torch file (a tensor [N, D] or a dict with 'features')"}


def _expected(name: str) -> str:
    return next((v for k, v in _FORMATS.items() if name.endswith(k)), "feature bag")


def _read_bag(path: Path) -> tuple[Any, Any, dict[str, Any]]:
    """``(features, coords or None, meta)`` as stored, per format; shapes are checked by the caller."""
    name = path.name.lower()
    coords = None
    meta: dict[str, Any] = {}
    if name.endswith(BAG_SUFFIX):
        missing = [f for f in ("features.safetensors", "meta.json") if not (path / f).is_file()]
        if missing:
            raise ValueError(f"feature bag {str(path)!r}: an mmclin .bag directory needs {missing} "
                             "(an interrupted copy, or not an mmclin bag)")
        from safetensors.numpy import load_file

        data = load_file(str(path / "features.safetensors"))
        feats, coords = data["features"], data.get("coords")
        meta = json.loads((path / "meta.json").read_text())
    elif name.endswith(".safetensors"):
        from safetensors.numpy import load_file

        data = load_file(str(path))
        if "features" not in data:
            raise ValueError(f"feature bag {str(path)!r}: expected a tensor named 'features', found {sorted(data)}")
        feats, coords = data["features"], data.get("coords")
    elif name.endswith((".h5", ".hdf5")):
        try:
            import h5py
        except ImportError as e:
            raise ImportError(f"reading {str(path)!r} needs h5py: pip install 'mmclin[wsi]'") from e
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise ValueError(f"feature bag {str(path)!r}: expected an HDF5 dataset 'features' (CLAM layout), found {list(f)}")
            feats = np.asarray(f["features"])
            coords = np.asarray(f["coords"]) if "coords" in f else None
            meta = {k: (v.item() if hasattr(v, "item") else v) for k, v in f["coords"].attrs.items()} if "coords" in f else {}
    elif name.endswith((".pt", ".pth")):
        import torch

        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            if "features" not in obj:
                raise ValueError(f"feature bag {str(path)!r}: a dict bag needs key 'features', found {sorted(obj)}")
            feats = obj["features"].numpy()
            coords = obj["coords"].numpy() if "coords" in obj else None
        elif isinstance(obj, torch.Tensor):
            feats = obj.numpy()
        else:
            raise ValueError(f"feature bag {str(path)!r}: expected a tensor [N, D] or a dict, got {type(obj).__name__}")
    else:
        raise ValueError(f"{str(path)!r} is not a feature bag; expected a .bag directory, .h5, .pt or .safetensors")
    return feats, coords, meta
