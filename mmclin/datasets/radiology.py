"""Radiology images: DICOM files and series, NIfTI volumes, PNG/JPEG; resampling and per-modality
intensity normalisation.

``read_image`` returns a :class:`Volume` (array ``[D, H, W]`` in physical orientation order
slice/row/column, spacing in mm, the imaging modality). ``preprocess`` resamples it to a
target spacing, normalises intensities (CT: a Hounsfield window; MR and others: robust
percentile z-scoring; photographs/PNGs: scaled to [0, 1] then z-scored), and crops/pads to a
fixed shape, so every image of a modality becomes a same-sized tensor.
"""
from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NIFTI_SUFFIXES = (".nii", ".nii.gz")
PNG_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass
class Volume:
    """Shapes: array ``[D, H, W]`` float32 (``D = 1`` for a 2-D image); spacing ``(dz, dy, dx)`` mm."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    modality: str
    path: str = ""


def _need(pkg: str) -> ImportError:
    return ImportError(f"reading this image needs {pkg!r}: pip install 'mmclin[imaging]'")


def _dicom_slice(ds: object, path: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):  # type: ignore[operator]
        raise ValueError(f"DICOM file {path!r} has no pixel data (no PixelData element; modality "
                         f"{getattr(ds, 'Modality', '?')!r}, SOP class {getattr(ds, 'SOPClassUID', '?')!s}); "
                         "expected an image (CT, MR, CR, DX ...), not a report, structure set or truncated file")
    try:
        arr = ds.pixel_array.astype(np.float32)  # type: ignore[attr-defined]
    except Exception as e:
        raise ValueError(f"DICOM file {path!r}: cannot decode pixel data ({e})") from e
    if arr.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 3:  # colour: luminance
        arr = arr @ np.array([0.299, 0.587, 0.114], np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    arr = arr * slope + intercept  # stored values -> Hounsfield units for CT
    dy, dx = (float(v) for v in getattr(ds, "PixelSpacing", [1.0, 1.0]))
    dz = float(getattr(ds, "SpacingBetweenSlices", None) or getattr(ds, "SliceThickness", None) or 1.0)
    return arr, (dz, dy, dx)


def read_image(path: str | Path, root: str | Path | None = None) -> Volume:
    """Read a DICOM file, a directory holding one DICOM series, a NIfTI volume, or a PNG/JPEG.

    ``root``: a data root; the files of a series directory must then resolve under it too (a
    symlink inside the directory cannot lead out of it). A corrupt or truncated file raises a
    ValueError naming it, not the decoding library's error.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image {str(p)!r} does not exist")
    try:
        return _read_image(p, root)
    except (ValueError, OSError, ImportError):
        raise
    except Exception as e:  # a decoder's own error type (nibabel ImageFileError, pydicom, struct, EOF ...)
        raise ValueError(f"image {str(p)!r}: cannot read it ({type(e).__name__}: {e}); the file is corrupt, "
                         "truncated, or not in the format its name says") from e


def _read_image(p: Path, root: str | Path | None) -> Volume:
    name = p.name.lower()
    if p.is_dir() or name.endswith((".dcm", ".dicom")):
        try:
            import pydicom
        except ImportError as e:
            raise _need("pydicom") from e
        files = sorted(p.glob("*")) if p.is_dir() else [p]
        slices, skipped = [], []
        for f in files:
            if p.is_dir() and root is not None:
                from mmclin.persistence.paths import resolve_under_root

                resolve_under_root(f, root, f"DICOM series directory {str(p)!r}")
            if f.is_file():
                try:
                    slices.append((pydicom.dcmread(f), str(f)))
                except pydicom.errors.InvalidDicomError:
                    if not p.is_dir():
                        raise ValueError(f"{str(f)!r} is not a DICOM file (no DICOM preamble/header)") from None
                    skipped.append(f.name)
                except Exception as e:
                    raise ValueError(f"DICOM file {str(f)!r}: cannot parse it ({type(e).__name__}: {e}); "
                                     "the file is corrupt or truncated") from e
        if skipped and slices:  # e.g. a README or DICOMDIR next to the slices
            warnings.warn(f"DICOM series directory {str(p)!r}: {len(skipped)} file(s) that are not DICOM were "
                          f"skipped: {skipped[:5]}", stacklevel=3)
        if not slices:
            raise ValueError(f"DICOM series directory {str(p)!r} holds no DICOM files")
        # order slices along the patient axis (position, else instance number)
        slices.sort(key=lambda s: (float(s[0].ImagePositionPatient[2]) if "ImagePositionPatient" in s[0]
                                   else float(getattr(s[0], "InstanceNumber", 0) or 0)))
        arrays, spacing = [], (1.0, 1.0, 1.0)
        for ds, f in slices:
            arr, spacing = _dicom_slice(ds, f)
            arrays.append(arr if arr.ndim == 3 else arr[None])  # multi-frame files are already [F, H, W]
        shapes = {a.shape[1:] for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"DICOM series {str(p)!r}: slices have different sizes {sorted(shapes)}")
        if len(slices) > 1 and all("ImagePositionPatient" in s[0] for s in slices):
            z = [float(s[0].ImagePositionPatient[2]) for s in slices]
            dz = float(np.median(np.diff(z))) if len(z) > 1 else spacing[0]
            spacing = (abs(dz) or spacing[0], spacing[1], spacing[2])
        return Volume(np.concatenate(arrays).astype(np.float32), spacing, str(getattr(slices[0][0], "Modality", "OT")), str(p))
    if name.endswith(NIFTI_SUFFIXES):
        try:
            import nibabel as nib
        except ImportError as e:
            raise _need("nibabel") from e
        try:
            img = nib.load(str(p))
            arr = np.asarray(img.dataobj, dtype=np.float32)
        except Exception as e:  # gzip / header / short-read errors from nibabel
            raise ValueError(f"NIfTI file {str(p)!r}: cannot read it ({type(e).__name__}: {e}); "
                             "the file is corrupt or truncated") from e
        if arr.ndim == 4 and arr.shape[3] == 1:
            arr = arr[..., 0]
        elif arr.ndim == 4:  # a time series or several channels: one volume is used, and that is said
            warnings.warn(f"NIfTI file {str(p)!r} holds {arr.shape[3]} volumes (shape {arr.shape}); only the first "
                          "is used (split the file to use another)", stacklevel=2)
            arr = arr[..., 0]
        if arr.ndim != 3:
            raise ValueError(f"NIfTI file {str(p)!r}: expected a 3-D volume, got shape {arr.shape}")
        zooms = img.header.get_zooms()[:3]
        # NIfTI is (x, y, z); mmclin volumes are (z, y, x)
        return Volume(np.ascontiguousarray(arr.transpose(2, 1, 0)), (float(zooms[2]), float(zooms[1]), float(zooms[0])), "MR", str(p))
    if name.endswith(PNG_SUFFIXES):
        from PIL import Image

        try:
            with Image.open(p) as im:
                arr = np.asarray(im.convert("L"), dtype=np.float32)
        except Exception as e:  # PIL's UnidentifiedImageError / "image file is truncated"
            raise ValueError(f"image {str(p)!r}: cannot decode it as {p.suffix.lstrip('.').upper()} "
                             f"({type(e).__name__}: {e}); the file is corrupt, truncated, or not an image") from e
        return Volume(arr[None], (1.0, 1.0, 1.0), "PNG", str(p))
    raise ValueError(f"image {str(p)!r}: unknown format; expected DICOM (.dcm or a series directory), NIfTI (.nii, .nii.gz) or PNG/JPEG")


def normalise_intensity(arr: np.ndarray, modality: str, ct_window: tuple[float, float] = (-1000.0, 1000.0)) -> np.ndarray:
    """CT: clip to the HU window and scale to [-1, 1] (HU are absolute, keep them comparable);
    others: clip to the 1st-99th percentile and z-score (MR intensities have no absolute scale)."""
    if modality.upper() == "CT":
        lo, hi = ct_window
        return (np.clip(arr, lo, hi) - (lo + hi) / 2) / ((hi - lo) / 2)
    lo, hi = np.percentile(arr, [1, 99])
    arr = np.clip(arr, lo, hi)
    std = arr.std()
    return (arr - arr.mean()) / (std if std > 0 else 1.0)


def resample(arr: np.ndarray, spacing: tuple[float, ...], target: tuple[float, ...] | None) -> np.ndarray:
    """Linear resampling to ``target`` spacing (mm per voxel, same axis order); None keeps the grid."""
    if target is None:
        return arr
    from scipy import ndimage

    factors = [s / t for s, t in zip(spacing, target)]
    if arr.shape[0] == 1:
        factors[0] = 1.0  # a 2-D image stays one slice
    return ndimage.zoom(arr, factors, order=1)


def crop_or_pad(arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Centre crop / zero pad (after normalisation, so 0 is the mean intensity) to ``shape``."""
    out = np.zeros(shape, dtype=np.float32)
    src, dst = [], []
    for n, m in zip(arr.shape, shape):
        if n >= m:
            a = (n - m) // 2
            src.append(slice(a, a + m))
            dst.append(slice(0, m))
        else:
            a = (m - n) // 2
            src.append(slice(0, n))
            dst.append(slice(a, a + n))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def preprocess(vol: Volume, size: tuple[int, ...], spacing: tuple[float, ...] | None = None,
               ct_window: tuple[float, float] = (-1000.0, 1000.0)) -> np.ndarray:
    """Resample, normalise and crop/pad a volume.

    ``size`` of length 2 gives a 2-D image ``[1, H, W]`` (a volume contributes its middle slice,
    after resampling in-plane); length 3 gives ``[1, D, H, W]``.

    Shapes:
        -> ``[1, *size]`` float32 (one channel).
    """
    arr, sp = vol.array, vol.spacing
    if len(size) == 2:
        if arr.shape[0] > 1:
            arr = arr[arr.shape[0] // 2: arr.shape[0] // 2 + 1]
        arr = resample(arr, sp, None if spacing is None else (sp[0], *spacing[-2:]))
        arr = normalise_intensity(arr, vol.modality, ct_window)[0]
    elif len(size) == 3:
        if arr.shape[0] == 1:
            raise ValueError(f"image {vol.path!r} is 2-D but the modality asks for 3-D volumes of size {size}; "
                             "use a 2-D size (e.g. options={'size': [128, 128]})")
        arr = normalise_intensity(resample(arr, sp, spacing), vol.modality, ct_window)
    else:
        raise ValueError(f"size must have 2 (H, W) or 3 (D, H, W) entries, got {size}")
    return crop_or_pad(arr.astype(np.float32), tuple(size))[None]


def package_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing it (nothing is downloaded)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found in the installed {package!r} package")
    return path


def pydicom_test_file(name: str) -> Path:
    """A DICOM test file shipped in the pydicom wheel (``CT_small.dcm``, ``MR_small.dcm`` ...), read from
    disk: unlike ``pydicom.data.get_testdata_file`` this never tries to download."""
    return package_file("pydicom", "data", "test_files", name)


def mni152_t1() -> Path:
    """The MNI152 T1 template (NIfTI, 197 x 233 x 189) shipped in the nilearn wheel."""
    return package_file("nilearn", "datasets", "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
