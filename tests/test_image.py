"""Radiology images: DICOM / NIfTI / PNG reading on real files shipped in pydicom and nilearn,
resampling and normalisation, the ``image`` featurizer + CNN encoder learning a planted signal."""
from __future__ import annotations


import numpy as np
import polars as pl
import pytest
import torch

from conftest import importorskip, requires
from mmclin.datasets.radiology import crop_or_pad, normalise_intensity, preprocess, read_image

pytestmark = requires("pydicom")  # the [imaging] extra
pydicom = importorskip("pydicom")

from mmclin.datasets.radiology import pydicom_test_file  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_dicom_ct_is_in_hounsfield_units_with_its_spacing():
    v = read_image(pydicom_test_file("CT_small.dcm"))
    raw = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
    assert v.modality == "CT" and v.array.shape == (1, 128, 128)
    np.testing.assert_allclose(v.array[0], raw.pixel_array * float(raw.RescaleSlope) + float(raw.RescaleIntercept))
    assert v.spacing[1:] == pytest.approx((0.661468, 0.661468))
    x = preprocess(v, (64, 64), spacing=(1.3, 1.3))
    assert x.shape == (1, 64, 64) and -1 <= x.min() and x.max() <= 1  # CT window scaled to [-1, 1]


def test_dicom_series_directory_is_stacked_in_patient_order(tmp_path):
    src = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
    for i, z in enumerate([10.0, -5.0, 2.5]):  # written out of order on purpose
        ds = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.InstanceNumber = i
        arr = src.pixel_array.copy()
        arr[:] = int(z * 10)
        ds.PixelData = arr.tobytes()
        ds.save_as(tmp_path / f"s{i}.dcm")
    v = read_image(tmp_path)
    assert v.array.shape == (3, 128, 128)
    assert v.array[:, 0, 0].tolist() == pytest.approx([-50 - 1024, 25 - 1024, 100 - 1024])  # sorted by z, HU
    assert v.spacing[0] == pytest.approx(7.5)


@requires("nibabel", "nilearn")
def test_nifti_mni152_volume_resampled_to_3d_tensor():
    pytest.importorskip("nibabel")
    from mmclin.datasets.radiology import mni152_t1

    try:
        path = mni152_t1()
    except FileNotFoundError:
        pytest.skip("nilearn (MNI152 template) not installed")
    v = read_image(path)
    assert v.array.shape == (189, 233, 197) and v.spacing == (1.0, 1.0, 1.0)
    x = preprocess(v, (32, 40, 32), spacing=(6.0, 6.0, 6.0))
    assert x.shape == (1, 32, 40, 32)
    brain = x[0, 16] > 0
    assert 0.1 < brain.mean() < 0.9  # the brain sits in the middle, background around it
    with pytest.raises(ValueError, match="2-D but the modality asks for 3-D"):
        preprocess(read_image(pydicom_test_file("MR_small.dcm")), (8, 8, 8))


def test_png_and_bad_inputs(tmp_path):
    from PIL import Image

    Image.fromarray((np.arange(64 * 48) % 256).reshape(48, 64).astype(np.uint8)).save(tmp_path / "a.png")
    v = read_image(tmp_path / "a.png")
    assert v.array.shape == (1, 48, 64) and v.modality == "PNG"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_image(tmp_path / "nope.dcm")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="unknown format"):
        read_image(tmp_path / "x.txt")
    (tmp_path / "fake.dcm").write_text("not dicom")
    with pytest.raises(ValueError, match="not a DICOM file"):
        read_image(tmp_path / "fake.dcm")
    assert crop_or_pad(np.ones((2, 5)), (4, 3)).sum() == 6
    z = normalise_intensity(np.random.default_rng(0).normal(100, 5, (1, 32, 32)), "MR")
    assert abs(z.mean()) < 1e-5 and abs(z.std() - 1) < 1e-3


def _planted_ct_set(tmp_path, n=48):
    """Real CT and MR slices; positives have a bright disc planted in the CT (labels are synthetic)."""
    base = pydicom.dcmread(pydicom_test_file("CT_small.dcm")).pixel_array.copy()
    mr = pydicom_test_file("MR_small.dcm")
    rng = np.random.default_rng(0)
    rows, y = [], []
    yy, xx = np.mgrid[:128, :128]
    for i in range(n):
        ds = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))  # fresh: copies share pixel data
        arr = np.roll(base, rng.integers(-10, 10, 2), (0, 1))
        if i % 2:
            cy, cx = rng.integers(40, 88, 2)
            arr[(yy - cy) ** 2 + (xx - cx) ** 2 < 64] = 2500  # a bright disc (stored value, ~1500 HU)
        ds.PixelData = arr.astype(base.dtype).tobytes()
        ds.save_as(tmp_path / f"ct{i}.dcm")
        rows.append({"id": i, "ct": str(tmp_path / f"ct{i}.dcm"), "mr": str(mr) if i % 3 else None})
        y.append(i % 2)
    return pl.DataFrame(rows), np.array(y)


def test_image_featurizer_two_views_ragged_and_errors(tmp_path):
    from mmclin.cohort import ModalitySpec
    from mmclin.encoders.image import ImageFeaturizer

    frame, _ = _planted_ct_set(tmp_path, n=6)
    spec = ModalitySpec(name="rad", kind="image", columns=["ct", "mr"], options={"size": [32, 32], "spacing": [2.0, 2.0]})
    f = ImageFeaturizer(spec).fit(frame)
    ragged, present = f.transform(frame)
    assert present.all() and ragged.lengths.tolist() == [1, 2, 2, 1, 2, 2]
    b = ragged.pad(torch.tensor([0, 1]))
    assert b["image"].shape == (2, 2, 1, 32, 32) and b["view"][1].tolist() == [0, 1] and b["mask"].tolist() == [[True, False], [True, True]]
    assert f.encoder_kwargs() == {"size": [32, 32], "n_views": 2}
    bad = frame.with_columns(pl.lit(str(tmp_path / "missing.dcm")).alias("ct"))
    with pytest.raises(FileNotFoundError, match=r"'rad', column 'ct', row 0.*missing.dcm"):
        f.transform(bad)


def test_image_model_learns_planted_disc(tmp_path):
    from sklearn.metrics import roc_auc_score

    from mmclin import MultimodalClassifier
    from mmclin.cohort import ModalitySpec

    frame, y = _planted_ct_set(tmp_path, n=96)
    spec = ModalitySpec(name="rad", kind="image", columns=["ct", "mr"], options={"size": [48, 48], "spacing": [2.0, 2.0]})
    tr, te = np.arange(64), np.arange(64, 96)
    # no validation carve-out: with 64 subjects the best-validation epoch is picked from a dozen samples
    clf = MultimodalClassifier(modalities=[spec], max_epochs=30, batch_size=16, learning_rate=3e-3, patience=None,
                               val_fraction=0.0, num_threads=1, random_state=0).fit(frame[tr], y[tr])
    assert roc_auc_score(y[te], clf.predict_proba(frame[te])[:, 1]) >= 0.9


@requires("nibabel", "nilearn")
def test_3d_volumes_through_featurizer_and_3d_cnn(tmp_path):
    pytest.importorskip("nibabel")
    from mmclin.cohort import ModalitySpec
    from mmclin.datasets.radiology import mni152_t1
    from mmclin.encoders.image import ImageCNNEncoder, ImageFeaturizer

    try:
        path = str(mni152_t1())
    except FileNotFoundError:
        pytest.skip("nilearn (MNI152 template) not installed")
    frame = pl.DataFrame({"scans": [[path, path], None, [path]]}, schema={"scans": pl.List(pl.String)})
    spec = ModalitySpec(name="mri", kind="image", columns=["scans"], options={"size": [16, 16, 16], "spacing": [12.0, 12.0, 12.0]})
    f = ImageFeaturizer(spec).fit(frame)
    ragged, present = f.transform(frame)
    assert present.tolist() == [True, False, True] and ragged.lengths.tolist() == [2, 0, 1]
    enc = ImageCNNEncoder(**f.encoder_kwargs(), d_model=8).eval()
    out = enc(ragged.pad(torch.arange(3)))
    assert out.tokens.shape == (3, 2, 8) and out.mask.tolist() == [[True, True], [False, False], [True, False]]
    torch.testing.assert_close(out.tokens[0, 0], out.tokens[2, 0])  # same scan, same token
