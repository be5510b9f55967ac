"""A data root keeps manifest / frame paths inside it: '..', absolute paths and symlinks that lead out are
refused with an error naming the modality, column, row, path and root; relative paths are taken under
the root; without a root nothing changes."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from conftest import requires
from mmclin.cohort import ModalitySpec
from mmclin.persistence.paths import PathOutsideRootError, apply_data_root, option_root, resolve_under_root


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def layout(tmp_path):
    """``root/`` with ``ok.pt``, ``sub/in.pt``, a symlink ``root/leak.pt -> outside/secret.pt``, a symlink
    ``root/alias.pt -> root/sub/in.pt``, and ``outside/secret.pt`` next to the root."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    for p in (root / "ok.pt", root / "sub" / "in.pt", outside / "secret.pt"):
        torch.save(torch.randn(3, 4), p)
    (root / "leak.pt").symlink_to(outside / "secret.pt")
    (root / "alias.pt").symlink_to(root / "sub" / "in.pt")
    return root, outside


ESCAPES = [("dot-dot", lambda root, out: "../outside/secret.pt"),
           ("dot-dot inside a longer path", lambda root, out: "sub/../../outside/secret.pt"),
           ("absolute path outside", lambda root, out: str(out / "secret.pt")),
           ("symlink pointing outside", lambda root, out: "leak.pt"),
           ("absolute path through the symlink", lambda root, out: str(root / "leak.pt"))]


@pytest.mark.parametrize("case,path", ESCAPES, ids=[c[0] for c in ESCAPES])
def test_resolve_under_root_refuses_escapes(layout, case, path):
    root, outside = layout
    p = path(root, outside)
    with pytest.raises(PathOutsideRootError, match=rf"^modality 'm', column 'c', row 2: path '{p}' resolves to "
                                                   rf"'{outside / 'secret.pt'}' which is outside the data root '{root}'"):
        resolve_under_root(p, root, "modality 'm', column 'c', row 2")
    assert issubclass(PathOutsideRootError, ValueError)


def test_resolve_under_root_accepts_paths_inside(layout):
    root, _ = layout
    assert resolve_under_root("ok.pt", root) == root.resolve() / "ok.pt"
    assert resolve_under_root("sub/../ok.pt", root) == root.resolve() / "ok.pt"  # '..' that stays inside is fine
    assert resolve_under_root(str(root / "sub" / "in.pt"), root) == root.resolve() / "sub" / "in.pt"
    assert resolve_under_root("alias.pt", root) == root.resolve() / "sub" / "in.pt"  # symlink within the root
    assert resolve_under_root("sub/not_yet.pt", root) == root.resolve() / "sub" / "not_yet.pt"  # existence: the reader's job
    with pytest.raises(FileNotFoundError, match=r"row 0: the data root '.*nowhere' is not an existing directory"):
        resolve_under_root("ok.pt", root / "nowhere", "row 0")


def test_no_root_leaves_paths_unchanged(layout):
    root, outside = layout
    for p in ("../outside/secret.pt", str(outside / "secret.pt"), "leak.pt"):
        assert resolve_under_root(p, None) == Path(p)  # not resolved, not checked


def test_slide_featurizer_with_a_root(layout, monkeypatch):
    from mmclin.encoders.slide_mil import SlideFeaturizer

    root, outside = layout
    spec = ModalitySpec(name="wsi", kind="slide", columns=["bag"], options={"root": str(root)})
    f = SlideFeaturizer(spec).fit(pl.DataFrame({"bag": ["ok.pt", str(root / "sub" / "in.pt"), None]}))
    assert f.bag_paths(pl.DataFrame({"bag": ["ok.pt"]})) == [str(root.resolve() / "ok.pt")]
    for bad in ("../outside/secret.pt", "leak.pt", str(outside / "secret.pt")):
        with pytest.raises(PathOutsideRootError, match=rf"modality 'wsi', column 'bag', row 1: path '{bad}' .*outside the data root '{root}'"):
            f.transform(pl.DataFrame({"bag": ["ok.pt", bad]}))
    (root / "x.bag").mkdir()
    (root / "x.bag" / "features.safetensors").symlink_to(outside / "secret.pt")
    with pytest.raises(PathOutsideRootError, match=r"row 0, bag directory 'x.bag': path '.*x.bag/features.safetensors' "
                                                   r"resolves to '.*outside/secret.pt' which is outside the data root"):
        f.transform(pl.DataFrame({"bag": ["x.bag"]}))
    with pytest.raises(FileNotFoundError, match=r"row 0: file 'gone.pt' does not exist \(looked for '.*root/gone.pt' under the data root\)"):
        f.transform(pl.DataFrame({"bag": ["gone.pt"]}))
    # no root: relative paths are relative to the working directory, '..' included, as before
    monkeypatch.chdir(root / "sub")
    plain = SlideFeaturizer(ModalitySpec(name="wsi", kind="slide", columns=["bag"])).fit(
        pl.DataFrame({"bag": ["in.pt", "../../outside/secret.pt"]}))
    assert plain.bag_paths(pl.DataFrame({"bag": ["../../outside/secret.pt"]})) == ["../../outside/secret.pt"]


def _png(path, value=100):
    from PIL import Image

    arr = np.random.default_rng(value).integers(0, 255, (20, 20), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def test_image_featurizer_with_a_root(tmp_path, monkeypatch):
    from mmclin.encoders.image import ImageFeaturizer

    root, outside = tmp_path / "images", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    _png(root / "a.png")
    _png(outside / "b.png")
    spec = ModalitySpec(name="xray", kind="image", columns=["img"], options={"size": [16, 16], "root": str(root)})
    f = ImageFeaturizer(spec).fit(pl.DataFrame({"img": ["a.png"]}))
    ragged, present = f.transform(pl.DataFrame({"img": ["a.png", None]}))
    assert present.tolist() == [True, False] and ragged.lengths.tolist() == [1, 0]
    with pytest.raises(PathOutsideRootError, match=rf"modality 'xray', column 'img', row 1: path '../elsewhere/b.png' "
                                                   rf"resolves to '{outside / 'b.png'}' which is outside the data root '{root}'"):
        f.transform(pl.DataFrame({"img": ["a.png", "../elsewhere/b.png"]}))
    # the same frame without a root reads relative to the working directory, as before
    monkeypatch.chdir(root)
    plain = ImageFeaturizer(ModalitySpec(name="xray", kind="image", columns=["img"], options={"size": [16, 16]}))
    _, present = plain.fit(pl.DataFrame({"img": ["a.png", "../elsewhere/b.png"]})).transform(
        pl.DataFrame({"img": ["a.png", "../elsewhere/b.png"]}))
    assert present.tolist() == [True, True]


@requires("pydicom")
def test_dicom_series_directory_cannot_hold_a_symlink_out_of_the_root(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from mmclin.datasets.radiology import pydicom_test_file, read_image
    from mmclin.encoders.image import ImageFeaturizer

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "series").mkdir(parents=True)
    outside.mkdir()
    for d, z in ((root / "series", 0.0), (outside, 5.0)):
        ds = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.save_as(d / f"s{int(z)}.dcm")
    assert read_image(root / "series", root=root).array.shape == (1, 128, 128)
    os.symlink(outside / "s5.dcm", root / "series" / "s5.dcm")
    assert read_image(root / "series").array.shape == (2, 128, 128)  # no root: unchanged
    spec = ModalitySpec(name="ct", kind="image", columns=["series"], options={"size": [16, 16], "root": str(root)})
    with pytest.raises(PathOutsideRootError, match=r"modality 'ct', column 'series', row 0: DICOM series directory '.*series': "
                                                   r"path '.*s5.dcm' resolves to '.*outside/s5.dcm' which is outside the data root"):
        ImageFeaturizer(spec).fit(pl.DataFrame({"series": ["series"]}))


@requires("tiffslide")
def test_extract_bags_manifest_with_a_root(tmp_path):
    pytest.importorskip("tiffslide")
    from mmclin.datasets.slides import extract_bags

    root = tmp_path / "slides"
    root.mkdir()
    man = pl.DataFrame({"slide_path": ["../x.svs"]})
    with pytest.raises(PathOutsideRootError, match=r"manifest column 'slide_path', row 0: path '../x.svs' .*outside the data root"):
        extract_bags(man, tmp_path / "bags", root=root)
    with pytest.raises(FileNotFoundError, match=r"manifest column 'slide_path', row 0: slide 'y.svs' does not exist"):
        extract_bags(pl.DataFrame({"slide_path": ["y.svs"]}), tmp_path / "bags", root=root)


def test_apply_data_root_sets_path_modalities_only_and_keeps_their_own(tmp_path):
    specs = [ModalitySpec(name="clin", kind="tabular", columns=["age"]),
             ModalitySpec(name="ct", kind="image", columns=["ct"]),
             ModalitySpec(name="wsi", kind="slide", columns=["slide"], options={"root": "/own", "max_patches": 5})]
    out = apply_data_root(specs, tmp_path)
    assert out[0].options == {} and out[1].options == {"root": str(tmp_path)}
    assert out[2].options == {"root": "/own", "max_patches": 5}
    assert specs[1].options == {}  # specs are not mutated
    assert apply_data_root(specs, None) == specs
    with pytest.raises(ValueError, match="modality 'ct': option 'root' must be a directory path"):
        option_root({"root": 3}, "ct")


def test_data_config_root_field():
    from mmclin.config import DataConfig

    assert DataConfig(cohort="x").root is None
    assert DataConfig(cohort="x", root="/data").root == "/data"


def test_a_model_fits_and_predicts_with_a_rooted_slide_modality(tmp_path, monkeypatch):
    """'root' is a featurizer option: it must not reach the encoder's constructor; the frame's relative
    paths are found under the root whatever the working directory."""
    from mmclin import MultimodalClassifier

    root = tmp_path / "bags"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        torch.save(torch.from_numpy(rng.normal(i % 2, 1, (4, 3)).astype(np.float32)), root / f"s{i}.pt")
    frame = pl.DataFrame({"bag": [f"s{i}.pt" for i in range(8)]})
    spec = ModalitySpec(name="wsi", kind="slide", columns=["bag"], options={"root": str(root)})
    monkeypatch.chdir(tmp_path)
    clf = MultimodalClassifier(modalities=[spec], max_epochs=1, batch_size=4, num_threads=1, random_state=0)
    clf.fit(frame, np.arange(8) % 2)
    assert clf.predict_proba(frame).shape == (8, 2)
    with pytest.raises(PathOutsideRootError, match=r"modality 'wsi', column 'bag', row 0: path '../x.pt'"):
        clf.predict(pl.DataFrame({"bag": ["../x.pt"]}))


def test_config_data_root_reaches_the_featurizers(tmp_path, monkeypatch):
    """``data.root`` in an experiment config: the slide modality of a data.path frame is held to it."""
    from mmclin.config import validate_config
    from mmclin.interfaces.experiment import Experiment

    root = tmp_path / "bags"
    root.mkdir()
    for i in range(8):
        torch.save(torch.full((4, 3), float(i % 2)), root / f"s{i}.pt")
    outside = tmp_path / "secret.pt"
    torch.save(torch.zeros(4, 3), outside)
    paths = [f"s{i}.pt" for i in range(8)]
    paths[5] = "../secret.pt"
    pl.DataFrame({"bag": paths, "y": np.arange(8) % 2}).write_parquet(tmp_path / "c.parquet")
    raw = {"name": "rooted", "data": {"path": str(tmp_path / "c.parquet"), "target": ["y"], "root": str(root),
                                      "modalities": [{"name": "wsi", "kind": "slide", "columns": ["bag"]}]},
           "model": {"task": {"name": "binary"}}, "trainer": {"max_epochs": 1, "progress_bar": False},
           "tracking": {"enabled": False}}
    monkeypatch.chdir(tmp_path)
    exp = Experiment(validate_config(raw))
    assert exp.cohort.modalities[0].options["root"] == str(root)
    # row 5 of the file, though it is another row of the training subjects' frame
    with pytest.raises(PathOutsideRootError, match=r"modality 'wsi', column 'bag', row 5: path '../secret.pt'"):
        exp.fit(tmp_path / "out")
