"""A catalogue of bad imaging inputs (slides, feature bags, DICOM / NIfTI / PNG): each gives a clear
error naming the modality, column, row and file and what was expected, or is handled and said
(a slide with no patches is absent for its subject, with a warning). Real files, written here."""
from __future__ import annotations

import os

import numpy as np
import polars as pl
import pytest
import torch

from conftest import importorskip, requires

pytestmark = requires("tifffile", "tiffslide", "pydicom", "nibabel", "h5py")  # the [wsi] and [imaging] extras
importorskip("tifffile")
importorskip("tiffslide")
pydicom = importorskip("pydicom")
nib = importorskip("nibabel")
h5py = importorskip("h5py")

from PIL import Image  # noqa: E402

from mmclin.cohort import ModalitySpec  # noqa: E402
from mmclin.datasets.radiology import pydicom_test_file  # noqa: E402
from mmclin.encoders.image import ImageCNNEncoder, ImageFeaturizer  # noqa: E402
from mmclin.encoders.slide_mil import ABMILEncoder, SlideFeaturizer, TransMILEncoder  # noqa: E402
from mmclin.wsi import write_pyramidal_tiff  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _noise(n: int) -> bytes:
    return np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()


def _noise_file(name, size):
    """A fixture maker: ``size`` random bytes saved as ``name``."""
    def make(t):
        (t / name).write_bytes(_noise(size))
        return t / name
    return make


def _tissue_tiff(path):
    """A small pyramidal TIFF: pink tissue-like noise on white glass."""
    rng = np.random.default_rng(0)
    img = np.full((256, 256, 3), 245, np.uint8)
    img[32:224, 32:224] = np.clip(rng.normal((200, 110, 160), 20, (192, 192, 3)), 0, 255).astype(np.uint8)
    return write_pyramidal_tiff(img, path, mpp=1.0, tile=64, levels=2)


# ---------------------------------------------------------------- slides and feature bags
# Each writer makes one bad input in tmp_path and returns its path; it sits in row 1 of the
# 'slide' column, after a good bag in row 0, so the message must name row 1.

_corrupt_svs = _noise_file("rand.svs", 5000)


def _truncated_tif(t):
    data = _tissue_tiff(t / "full.tif").read_bytes()
    (t / "trunc.tif").write_bytes(data[: len(data) // 3])  # header intact, tiles cut off
    return t / "trunc.tif"


def _png_as_slide(t):
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(t / "photo.png")
    return t / "photo.png"


def _csv_as_slide(t):
    (t / "table.csv").write_text("a,b\n1,2\n")
    return t / "table.csv"


def _h5_without_features(t):
    with h5py.File(t / "clam.h5", "w") as f:
        f["feats"] = np.zeros((3, 4), np.float32)
        f["coords"] = np.zeros((3, 2), np.int64)
    return t / "clam.h5"


def _pt_without_features(t):
    torch.save({"feats": torch.zeros(3, 4)}, t / "clam.pt")
    return t / "clam.pt"


_corrupt_h5 = _noise_file("rand.h5", 300)


_corrupt_pt = _noise_file("rand.pt", 300)


_corrupt_safetensors = _noise_file("rand.safetensors", 300)


def _incomplete_bag_dir(t):
    (t / "half.bag").mkdir()
    (t / "half.bag" / "meta.json").write_text("{}")
    return t / "half.bag"


def _features_1d(t):
    torch.save({"features": torch.zeros(5)}, t / "flat.pt")
    return t / "flat.pt"


def _nan_features(t):
    torch.save(torch.full((3, 4), float("nan")), t / "nan.pt")
    return t / "nan.pt"


ROW1 = r"modality 'wsi', column 'slide', row 1: "
SLIDE_CASES = [
    ("slide path does not exist", lambda t: t / "nope.svs", FileNotFoundError, ROW1 + r"file '.*nope.svs' does not exist"),
    ("random bytes named .svs", _corrupt_svs, ValueError,
     ROW1 + r"slide file '.*rand.svs': tiffslide cannot open it \(not a TIFF file.*expected an SVS or a tiled TIFF"),
    ("truncated TIFF", _truncated_tif, ValueError,
     ROW1 + r"slide file '.*trunc.tif': cannot decode the thumbnail .*probably truncated or corrupt"),
    ("PNG given as a slide", _png_as_slide, ValueError, ROW1 + r"slide file '.*photo.png': tiffslide cannot open it .*expected an SVS"),
    ("CSV given as a slide", _csv_as_slide, ValueError, ROW1 + r"slide file '.*table.csv': tiffslide cannot open it .*expected an SVS"),
    ("CLAM .h5 without 'features'", _h5_without_features, ValueError,
     ROW1 + r"feature bag '.*clam.h5': expected an HDF5 dataset 'features' \(CLAM layout\), found \['coords', 'feats'\]"),
    ("CLAM .pt dict without 'features'", _pt_without_features, ValueError,
     ROW1 + r"feature bag '.*clam.pt': a dict bag needs key 'features', found \['feats'\]"),
    ("corrupt .h5", _corrupt_h5, ValueError, ROW1 + r"feature bag '.*rand.h5': cannot read it .*corrupt or not a CLAM-style HDF5 file"),
    ("corrupt .pt", _corrupt_pt, ValueError, ROW1 + r"feature bag '.*rand.pt': cannot read it .*corrupt or not a torch file"),
    ("corrupt .safetensors", _corrupt_safetensors, ValueError,
     ROW1 + r"feature bag '.*rand.safetensors': cannot read it .*corrupt or not a safetensors file"),
    ("incomplete .bag directory", _incomplete_bag_dir, ValueError,
     ROW1 + r"feature bag '.*half.bag': an mmclin .bag directory needs \['features.safetensors'\]"),
    ("1-D features", _features_1d, ValueError, ROW1 + r"feature bag '.*flat.pt': features must be \[N, D\], got shape \(5,\)"),
    ("NaN features", _nan_features, ValueError, ROW1 + r"feature bag '.*nan.pt': features contain NaN or inf"),
]


def _slide_spec(t, **options):
    return ModalitySpec(name="wsi", kind="slide", columns=["slide"],
                        options={"bag_dir": str(t / "bags"), "patch_size": 32, "mpp": 2.0, "thumbnail_size": 256,
                                 "backbone": {"name": "smallcnn", "out_dim": 8}, **options})


def _good_bag(t, name="good.pt", n=5, d=4):
    torch.save({"features": torch.randn(n, d), "coords": torch.arange(2 * n).view(n, 2)}, t / name)
    return str(t / name)


@pytest.mark.parametrize("case,write,error,message", SLIDE_CASES, ids=[c[0] for c in SLIDE_CASES])
def test_slide_bad_input(tmp_path, case, write, error, message):
    frame = pl.DataFrame({"slide": [_good_bag(tmp_path), str(write(tmp_path))]})
    with pytest.raises(error, match=message):
        SlideFeaturizer(_slide_spec(tmp_path)).fit(frame)


def test_feature_width_disagreeing_between_subjects_names_both_files(tmp_path):
    frame = pl.DataFrame({"slide": [_good_bag(tmp_path, "a.pt", d=4), None, _good_bag(tmp_path, "b.pt", d=6)]})
    with pytest.raises(ValueError, match=r"modality 'wsi', column 'slide': bags have different feature widths: "
                                         r"4-dim at row 0 \('.*a.pt'\), 6-dim at row 2 \('.*b.pt'\); all bags must come from one backbone"):
        SlideFeaturizer(_slide_spec(tmp_path)).fit(frame)
    f = SlideFeaturizer(_slide_spec(tmp_path)).fit(frame.head(1))
    with pytest.raises(ValueError, match=r"modality 'wsi', column 'slide', row 2: bag '.*b.pt' has 6-dim features, expected 4"):
        f.transform(frame)


def _empty_pt(t):
    torch.save({"features": torch.zeros(0, 4), "coords": torch.zeros(0, 2, dtype=torch.long)}, t / "empty.pt")
    return t / "empty.pt"


def _empty_h5(t):
    with h5py.File(t / "empty.h5", "w") as f:
        f["features"] = np.zeros((0, 4), np.float32)
    return t / "empty.h5"


def _glass_only_slide(t):
    return write_pyramidal_tiff(np.full((256, 256, 3), 242, np.uint8), t / "glass.tif", mpp=1.0, tile=64, levels=2)


EMPTY_CASES = [("bag file with 0 rows (.pt)", _empty_pt, "a feature bag with 0 patches"),
               ("bag file with 0 rows (CLAM .h5)", _empty_h5, "a feature bag with 0 patches"),
               ("slide whose tissue mask finds no tissue", _glass_only_slide, r"no patch has >= 50% tissue")]


@pytest.mark.parametrize("case,write,why", EMPTY_CASES, ids=[c[0] for c in EMPTY_CASES])
@pytest.mark.parametrize("encoder", [ABMILEncoder, TransMILEncoder])
def test_empty_bag_is_the_modality_absent_for_that_subject_and_said(tmp_path, case, write, why, encoder):
    """A slide with no patches has nothing to attend over: like a null path (the presence-mask design),
    the subject's slide modality is absent; a warning names the row, file and reason."""
    empty = str(write(tmp_path))
    frame = pl.DataFrame({"slide": [_good_bag(tmp_path, n=3), empty, _good_bag(tmp_path, "g2.pt", n=2)]})
    with pytest.warns(UserWarning, match=rf"modality 'wsi', column 'slide': 1 slide\(s\) have no patches and are treated "
                                         rf"as absent .*row 1 \('.*{os.path.basename(empty)}': {why}"):
        f = SlideFeaturizer(_slide_spec(tmp_path)).fit(frame)
    with pytest.warns(UserWarning, match="row 1"):
        ragged, present = f.transform(frame)
    assert present.tolist() == [True, False, True] and ragged.lengths.tolist() == [3, 0, 2]
    batch = ragged.pad(torch.arange(3))
    enc = encoder(in_dim=f.feature_dim, d_model=8, **({"heads": 2} if encoder is TransMILEncoder else {})).eval()
    tokens = enc(batch)
    assert tokens.mask[:, 0].tolist() == [True, False, True]
    assert torch.isfinite(tokens.tokens).all()


def test_all_training_slides_empty_is_an_error(tmp_path):
    frame = pl.DataFrame({"slide": [str(_empty_pt(tmp_path)), None]})
    with pytest.warns(UserWarning), pytest.raises(
            ValueError, match=r"modality 'wsi', column 'slide': no training row has a slide with patches \(1 slide\(s\) "
                              r"have none, e.g. row 0: '.*empty.pt'\)"):
        SlideFeaturizer(_slide_spec(tmp_path)).fit(frame)


def test_extract_bags_manifest_glass_slide_gets_null_bag_and_a_warning(tmp_path):
    from mmclin.datasets.slides import extract_bags
    from mmclin.wsi import PatchSettings
    from mmclin.wsi.backbones import builtin_backbone
    from mmclin.wsi.bags import NoTissueError, extract_bag

    glass = _glass_only_slide(tmp_path)
    settings = PatchSettings(patch_size=32, mpp=2.0, thumbnail_size=256)
    with pytest.raises(NoTissueError, match="glass.tif'.*no patch has"):  # called directly: an error
        extract_bag(glass, tmp_path / "bags", settings, builtin_backbone(out_dim=8))
    man = pl.DataFrame({"id": [1, 2], "slide_path": [str(_tissue_tiff(tmp_path / "t.tif")), str(glass)]})
    with pytest.warns(UserWarning, match=r"manifest column 'slide_path': 1 slide\(s\) have no tissue patch .*row 1 \('.*glass.tif'\)"):
        out = extract_bags(man, tmp_path / "bags", settings=settings, backbone=builtin_backbone(out_dim=8))
    assert out["bag_path"].is_null().to_list() == [False, True]
    (tmp_path / "bad.svs").write_bytes(_noise(100))
    with pytest.raises(ValueError, match=r"manifest column 'slide_path', row 0: slide file '.*bad.svs': tiffslide cannot open it"):
        extract_bags(pl.DataFrame({"slide_path": [str(tmp_path / "bad.svs")]}), tmp_path / "bags", settings=settings,
                     backbone=builtin_backbone(out_dim=8))


# ---------------------------------------------------------------- radiology images

def _dicom_without_pixel_data(t):
    ds = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
    del ds.PixelData
    ds.save_as(t / "nopix.dcm")
    return t / "nopix.dcm"


def _truncated_dicom(t):
    data = pydicom_test_file("CT_small.dcm").read_bytes()
    (t / "trunc.dcm").write_bytes(data[: len(data) // 2])
    return t / "trunc.dcm"


_random_dicom = _noise_file("rand.dcm", 2000)


_random_nifti = _noise_file("rand.nii", 1000)


def _truncated_nifti_gz(t):
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32), np.eye(4)), t / "v.nii.gz")
    data = (t / "v.nii.gz").read_bytes()
    (t / "trunc.nii.gz").write_bytes(data[: len(data) // 2])
    return t / "trunc.nii.gz"


_random_png = _noise_file("rand.png", 500)


def _truncated_png(t):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(t / "full.png")
    data = (t / "full.png").read_bytes()
    (t / "trunc.png").write_bytes(data[: len(data) // 2])
    return t / "trunc.png"


def _nifti_2d(t):
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), t / "flat.nii")
    return t / "flat.nii"


_unknown_format = _noise_file("scan.raw", 64)


RAD_ROW1 = r"modality 'rad', column 'ct', row 1: "
IMAGE_CASES = [
    ("image path does not exist", lambda t: t / "nope.dcm", FileNotFoundError, RAD_ROW1 + r"image '.*nope.dcm' does not exist"),
    ("DICOM without PixelData", _dicom_without_pixel_data, ValueError,
     RAD_ROW1 + r"DICOM file '.*nopix.dcm' has no pixel data \(no PixelData element; modality 'CT'.*expected an image"),
    ("truncated DICOM", _truncated_dicom, ValueError, RAD_ROW1 + r"DICOM file '.*trunc.dcm': cannot decode pixel data \(.*less than expected"),
    ("random bytes named .dcm", _random_dicom, ValueError, RAD_ROW1 + r"'.*rand.dcm' is not a DICOM file"),
    ("random bytes named .nii", _random_nifti, ValueError, RAD_ROW1 + r"NIfTI file '.*rand.nii': cannot read it .*corrupt or truncated"),
    ("truncated .nii.gz", _truncated_nifti_gz, ValueError, RAD_ROW1 + r"NIfTI file '.*trunc.nii.gz': cannot read it .*corrupt or truncated"),
    ("random bytes named .png", _random_png, ValueError, RAD_ROW1 + r"image '.*rand.png': cannot decode it as PNG .*not an image"),
    ("truncated PNG", _truncated_png, ValueError, RAD_ROW1 + r"image '.*trunc.png': cannot decode it as PNG .*truncated"),
    ("2-D NIfTI", _nifti_2d, ValueError, RAD_ROW1 + r"NIfTI file '.*flat.nii': expected a 3-D volume, got shape \(8, 8\)"),
    ("unknown file type", _unknown_format, ValueError, RAD_ROW1 + r"image '.*scan.raw': unknown format; expected DICOM .*NIfTI .*PNG"),
]


@pytest.mark.parametrize("case,write,error,message", IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_image_bad_input(tmp_path, case, write, error, message):
    frame = pl.DataFrame({"ct": [str(pydicom_test_file("CT_small.dcm")), str(write(tmp_path))]})
    spec = ModalitySpec(name="rad", kind="image", columns=["ct"], options={"size": [16, 16]})
    with pytest.raises(error, match=message):
        ImageFeaturizer(spec).fit(frame)


def test_bad_image_in_a_list_column_and_in_a_second_view_names_that_column(tmp_path):
    good, bad = str(pydicom_test_file("CT_small.dcm")), str(_random_png(tmp_path))
    spec = ModalitySpec(name="rad", kind="image", columns=["views"], options={"size": [16, 16]})
    with pytest.raises(ValueError, match=r"modality 'rad', column 'views', row 0: image '.*rand.png': cannot decode"):
        ImageFeaturizer(spec).fit(pl.DataFrame({"views": [[good, bad]]}))
    spec = ModalitySpec(name="rad", kind="image", columns=["ct", "xray"], options={"size": [16, 16]})
    with pytest.raises(ValueError, match=r"modality 'rad', column 'xray', row 0: image '.*rand.png'"):
        ImageFeaturizer(spec).fit(pl.DataFrame({"ct": [good], "xray": [bad]}))


def test_2d_image_for_a_3d_model_is_an_error_naming_row_and_file(tmp_path):
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(12, 12, 12)).astype(np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    frame = pl.DataFrame({"ct": [str(tmp_path / "v.nii.gz"), str(pydicom_test_file("CT_small.dcm"))]})
    spec = ModalitySpec(name="rad", kind="image", columns=["ct"], options={"size": [8, 8, 8]})
    with pytest.raises(ValueError, match=r"modality 'rad', column 'ct', row 1: image '.*CT_small.dcm' is 2-D but the "
                                         r"modality asks for 3-D volumes of size \(8, 8, 8\); use a 2-D size"):
        ImageFeaturizer(spec).fit(frame)


def test_image_encoder_given_the_wrong_dimensionality(tmp_path):
    enc = ImageCNNEncoder(size=[16, 16], d_model=8, width=4, n_blocks=2)
    mask = torch.ones(2, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"image encoder: expected images \[B, T, 1, 16, 16\], got \(2, 1, 1, 16, 16, 16\)"):
        enc({"image": torch.zeros(2, 1, 1, 16, 16, 16), "view": torch.zeros(2, 1, dtype=torch.long), "mask": mask})


def test_image_option_size_of_wrong_length(tmp_path):
    spec = ModalitySpec(name="rad", kind="image", columns=["ct"], options={"size": [8, 8, 8, 8]})
    with pytest.raises(ValueError, match=r"modality 'rad': option 'size' must be \[H, W\] or \[D, H, W\], got \[8, 8, 8, 8\]"):
        ImageFeaturizer(spec).fit(pl.DataFrame({"ct": [str(pydicom_test_file("CT_small.dcm"))]}))


def test_dicom_series_directory_with_a_stray_file_warns_and_reads_the_slices(tmp_path):
    from mmclin.datasets.radiology import read_image

    for i, z in enumerate([0.0, 5.0]):
        ds = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.save_as(tmp_path / f"s{i}.dcm")
    (tmp_path / "README.txt").write_text("scanner notes")
    with pytest.warns(UserWarning, match=r"DICOM series directory '.*': 1 file\(s\) that are not DICOM were skipped: \['README.txt'\]"):
        v = read_image(tmp_path)
    assert v.array.shape == (2, 128, 128)


def test_slide_reader_names_the_file_and_region_of_a_tile_it_cannot_decode(tmp_path):
    from mmclin.wsi import SlideReader

    data = _tissue_tiff(tmp_path / "full.tif").read_bytes()
    (tmp_path / "trunc.tif").write_bytes(data[: len(data) // 3])
    with SlideReader(tmp_path / "trunc.tif") as r:
        with pytest.raises(ValueError, match=r"slide file '.*trunc.tif': cannot decode the region x=192, y=192, level 0, "
                                             r"size \(64, 64\) \(.*\); the file is probably truncated or corrupt"):
            r.read(192, 192, 0, (64, 64))


def test_4d_nifti_uses_the_first_volume_and_says_so(tmp_path):
    from mmclin.datasets.radiology import read_image

    vol = np.stack([np.full((4, 5, 6), float(k), np.float32) for k in range(3)], axis=-1)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "bold.nii.gz")
    with pytest.warns(UserWarning, match=r"bold.nii.gz' holds 3 volumes .* only the first is used"):
        out = read_image(tmp_path / "bold.nii.gz")
    assert out.array.shape == (6, 5, 4) and float(out.array.max()) == 0.0
