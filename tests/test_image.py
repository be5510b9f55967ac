"""Radiology images: DICOM / NIfTI / PNG reading on real files shipped in pydicom and nilearn,
resampling and normalisation, the ``image`` featurizer + CNN encoder learning a planted signal."""
from __future__ import annotations


import numpy as np
import polars as pl
import pytest
import torch

from conftest import requires
from mmclin.datasets.radiology import crop_or_pad, normalise_intensity, preprocess, read_image

try:
    import pydicom  # the [imaging] extra: the reading tests need it, the checkpoint tests do not
except ImportError:
    pydicom = None

from mmclin.datasets.radiology import pydicom_test_file  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@requires("pydicom")
def test_dicom_ct_is_in_hounsfield_units_with_its_spacing():
    v = read_image(pydicom_test_file("CT_small.dcm"))
    raw = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
    assert v.modality == "CT" and v.array.shape == (1, 128, 128)
    np.testing.assert_allclose(v.array[0], raw.pixel_array * float(raw.RescaleSlope) + float(raw.RescaleIntercept))
    assert v.spacing[1:] == pytest.approx((0.661468, 0.661468))
    x = preprocess(v, (64, 64), spacing=(1.3, 1.3))
    assert x.shape == (1, 64, 64) and -1 <= x.min() and x.max() <= 1  # CT window scaled to [-1, 1]


@requires("pydicom")
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


@requires("pydicom")
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


@requires("pydicom")
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


@requires("pydicom")
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


@requires("pydicom")
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


@requires("pydicom")
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


# --- pretrained backbones from a local checkpoint (no pydicom, no network) ---------------------
def _torchvision_resnet18_state(dims: int = 2, in_channels: int = 3, seed: int = 0) -> dict:
    """A state dict in torchvision's ``resnet18`` layout (what ``torchvision.models.resnet18().state_dict()``
    holds, 1000-class ``fc`` included), random weights and non-trivial BatchNorm statistics."""
    from mmclin.encoders.image_backbones import ResNet18

    torch.manual_seed(seed)
    net = ResNet18(dims=dims, in_channels=in_channels)
    state = {}
    for k, v in net.state_dict().items():
        if k.endswith("running_var"):
            v = torch.rand_like(v) + 0.5
        elif k.endswith(("running_mean", "bn1.bias", "bn2.bias")):
            v = torch.randn_like(v) * 0.1
        elif k.endswith(("bn1.weight", "bn2.weight")) or k.endswith("downsample.1.weight"):
            v = torch.rand_like(v) + 0.5
        state[k] = v.clone()
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    return state


def _reference_resnet18(state: dict, x: torch.Tensor) -> torch.Tensor:
    """The resnet18 feature maps computed from the weights with torch.nn.functional alone."""
    import torch.nn.functional as F

    dims = x.dim() - 2
    conv = {2: F.conv2d, 3: F.conv3d}[dims]
    pool = {2: F.max_pool2d, 3: F.max_pool3d}[dims]

    def bn(h, p):
        return F.batch_norm(h, state[p + ".running_mean"], state[p + ".running_var"], state[p + ".weight"],
                            state[p + ".bias"], False, 0.0, 1e-5)

    h = pool(F.relu(bn(conv(x, state["conv1.weight"], stride=2, padding=3), "bn1")), 3, 2, 1)
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}"
            stride = 2 if layer > 1 and block == 0 else 1
            out = F.relu(bn(conv(h, state[p + ".conv1.weight"], stride=stride, padding=1), p + ".bn1"))
            out = bn(conv(out, state[p + ".conv2.weight"], padding=1), p + ".bn2")
            short = bn(conv(h, state[p + ".downsample.0.weight"], stride=stride), p + ".downsample.1") \
                if p + ".downsample.0.weight" in state else h
            h = F.relu(out + short)
    return h


def _images(n: int, size, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, 2, dtype=torch.bool)
    mask[1, 1] = False
    return {"image": torch.randn(n, 2, 1, *size, generator=g), "view": torch.tensor([[0, 1]] * n), "mask": mask}


def _expected_tokens(enc, state: dict, inputs: dict) -> torch.Tensor:
    x = inputs["image"][inputs["mask"]]
    h = _reference_resnet18(state, x.expand(-1, 3, *x.shape[2:]) if state["conv1.weight"].shape[1] == 3 else x).flatten(2)
    out = enc.proj(torch.cat([h.mean(2), h.amax(2)], 1)) + enc.view(inputs["view"][inputs["mask"]])
    return out


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_resnet18_starts_from_a_torchvision_checkpoint(tmp_path, fmt, monkeypatch):
    """The loaded weights are the ones used: tokens equal a functional resnet18 on the file's
    weights, with the RGB first layer applied to the grey image repeated on 3 channels."""
    import socket

    from mmclin.encoders.image import ImageCNNEncoder

    state = _torchvision_resnet18_state()
    path = tmp_path / f"resnet18.{fmt}"
    if fmt == "pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file
        save_file({f"module.{k}": v.contiguous() for k, v in state.items()}, str(path))  # DataParallel prefix

    def no_network(*args, **kwargs):
        raise AssertionError("the checkpoint must be read locally")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    enc = ImageCNNEncoder(size=[32, 32], n_views=2, d_model=8, backbone="resnet18", checkpoint=str(path)).eval()
    torch.testing.assert_close(enc.cnn.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(enc.cnn.layer3[0].bn1.running_var, state["layer3.0.bn1.running_var"])
    inputs = _images(3, (32, 32))
    out = enc(inputs)
    with torch.no_grad():
        torch.testing.assert_close(out.tokens[inputs["mask"]], _expected_tokens(enc, state, inputs), rtol=1e-4, atol=1e-4)
    # a randomly initialised resnet18 gives other tokens: the file's weights are what made them
    other = ImageCNNEncoder(size=[32, 32], n_views=2, d_model=8, backbone="resnet18").eval()
    other.proj.load_state_dict(enc.proj.state_dict())
    other.view.load_state_dict(enc.view.state_dict())
    assert (other(inputs).tokens - out.tokens).abs().max() > 1e-2


def test_resnet18_3d_from_a_monai_style_checkpoint_and_training_is_batch_independent(tmp_path):
    """A 3-D, one-channel checkpoint wrapped as {"state_dict": {"module.…": …}} (MedicalNet / MONAI
    style) loads; BatchNorm keeps the checkpoint's statistics in training too, so a sample's
    token does not depend on the batch, and the backbone can be frozen."""
    from mmclin.encoders.image import ImageCNNEncoder

    state = _torchvision_resnet18_state(dims=3, in_channels=1, seed=1)
    path = tmp_path / "resnet_18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items() if not k.startswith("fc.")}, "epoch": 3}, path)
    enc = ImageCNNEncoder(size=[16, 16, 16], d_model=8, n_views=2, backbone="resnet18", checkpoint=str(path)).train()
    inputs = _images(2, (16, 16, 16))
    out = enc(inputs)
    with torch.no_grad():
        torch.testing.assert_close(out.tokens[inputs["mask"]], _expected_tokens(enc, state, inputs), rtol=1e-4, atol=1e-4)
    single = enc({k: v[:1] for k, v in inputs.items()})
    torch.testing.assert_close(single.tokens[0], out.tokens[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(enc.cnn.bn1.running_mean, state["bn1.running_mean"])  # not updated by training
    frozen = ImageCNNEncoder(size=[16, 16, 16], d_model=8, backbone="resnet18", checkpoint=str(path), freeze_backbone=True)
    frozen(_images(2, (16, 16, 16))).tokens.sum().backward()
    assert all(p.grad is None for p in frozen.cnn.parameters()) and frozen.proj.weight.grad.abs().sum() > 0


def test_checkpoint_that_does_not_fit_is_refused_naming_file_and_keys(tmp_path):
    from mmclin.encoders.image import ImageCNNEncoder

    state = _torchvision_resnet18_state()
    bad = {k: v for k, v in state.items() if not k.startswith("layer4.1.")}
    bad["layer1.2.conv1.weight"] = torch.zeros(64, 64, 3, 3)  # a resnet34 block
    path = tmp_path / "resnet34ish.pth"
    torch.save(bad, path)
    with pytest.raises(ValueError) as err:
        ImageCNNEncoder(size=[32, 32], backbone="resnet18", checkpoint=str(path))
    msg = str(err.value)
    assert "resnet34ish.pth" in msg and "does not fit backbone 'resnet18'" in msg
    assert "missing keys: layer4.1.bn1.bias" in msg and "unexpected keys: layer1.2.conv1.weight" in msg
    shaped = dict(state, **{"conv1.weight": torch.zeros(64, 3, 5, 5)})
    torch.save(shaped, path)
    with pytest.raises(ValueError, match=r"mis-shaped: conv1.weight \(64, 1, 5, 5\) \(expected \(64, 1, 7, 7\)\)"):
        ImageCNNEncoder(size=[32, 32], backbone="resnet18", checkpoint=str(path))
    with pytest.raises(ValueError, match=r"does not fit backbone 'cnn'.*missing keys: 0.bias"):
        ImageCNNEncoder(size=[32, 32], checkpoint=str(path))  # a resnet file for the small CNN


class PickledObject:
    """An arbitrary class: unpickling it would run code from this module."""


def test_checkpoint_with_pickled_code_or_unknown_format_is_refused(tmp_path):
    from mmclin.encoders.image import ImageCNNEncoder

    path = tmp_path / "with_code.pt"
    torch.save({"conv1.weight": torch.zeros(1), "obj": PickledObject()}, path)  # a whole pickled object inside
    with pytest.raises(ValueError, match=r"with_code.pt.*weights_only=True\) refused it"):
        ImageCNNEncoder(size=[32, 32], backbone="resnet18", checkpoint=str(path))
    torch.save({"conv1.weight": torch.zeros(1), "epochs": 3}, path)  # loads, but is not a state dict
    with pytest.raises(ValueError, match=r"expected a state dict \(names -> tensors\), found keys \['conv1.weight', 'epochs'\]"):
        ImageCNNEncoder(size=[32, 32], backbone="resnet18", checkpoint=str(path))
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"w.onnx.*expected a .safetensors file or one of"):
        ImageCNNEncoder(size=[32, 32], backbone="resnet18", checkpoint=str(tmp_path / "w.onnx"))
    with pytest.raises(FileNotFoundError, match=r"nope.pth.*never downloaded"):
        ImageCNNEncoder(size=[32, 32], backbone="resnet18", checkpoint=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match=r"'backbone' must be one of \['cnn', 'resnet18'\], got 'resnet50'"):
        ImageCNNEncoder(size=[32, 32], backbone="resnet18".replace("18", "50"))


def test_resnet18_backbone_passes_the_encoder_checks(monkeypatch):
    from mmclin.encoders.image import ImageCNNEncoder
    from mmclin.testing.conformance import ENCODER_CHECKS

    monkeypatch.setattr(ImageCNNEncoder, "example", classmethod(
        lambda cls: cls(size=[32, 32], n_views=2, d_model=8, backbone="resnet18")))
    for check in ENCODER_CHECKS:
        check("image")


def test_checkpoint_option_reaches_the_encoder_from_the_modality_spec(tmp_path):
    """``ModalitySpec(options={"backbone": ..., "checkpoint": ...})`` is how a user asks for it."""
    from mmclin.cohort import ModalitySpec
    from mmclin.training.pretrain import build_encoders

    state = _torchvision_resnet18_state(seed=2)
    torch.save(state, tmp_path / "r18.pth")
    spec = ModalitySpec(name="rad", kind="image", columns=["ct"],
                        options={"size": [32, 32], "backbone": "resnet18", "checkpoint": str(tmp_path / "r18.pth")})
    enc = build_encoders([spec], {"rad": {"size": [32, 32], "n_views": 1}}, {})["rad"]
    torch.testing.assert_close(enc.cnn.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
