"""Symile / CLIP objectives, zero-shot retrieval, pretraining, fine-tuning, the auxiliary head."""
import itertools

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F

from mmclin import ModalitySpec
from mmclin.fusion.contrastive import clip_loss, mip, retrieval_metrics, retrieval_scores, symile_logits, symile_loss
from mmclin.training.pretrain import PretrainedEncoders, pretrain_encoders

torch.set_num_threads(1)
BITS = 3


def xor_frame(n: int, seed: int, missing: float = 0.0) -> pl.DataFrame:
    """Symile's XOR construction: a, b uniform bit vectors, c = a XOR b; every pair of
    modalities is independent, only the three together are dependent."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2, (n, BITS))
    b = rng.integers(0, 2, (n, BITS))
    cols = {}
    for name, v in (("a", a), ("b", b), ("c", a ^ b)):
        v = v.astype(float)
        if missing:  # whole modality absent for a random subset (never all three)
            drop = rng.random(n) < missing
            drop &= (np.arange(n) % 3) == "abc".index(name)
            v[drop] = np.nan
        for j in range(BITS):
            cols[f"{name}{j}"] = v[:, j]
    return pl.DataFrame(cols)


SPECS = [ModalitySpec(name=m, kind="genomics", columns=[f"{m}{j}" for j in range(BITS)]) for m in "abc"]
OPTIONS = {m: {"d_model": 32, "n_layers": 2, "dropout": 0.0} for m in "abc"}


def _pretrain(frame, objective, **kw):
    kw = {"negative_sampling": "n", "dim": 16, "encoder_options": OPTIONS, "max_epochs": 20, "batch_size": 128,
          "learning_rate": 3e-3, "seed": 0, **kw}
    return pretrain_encoders(frame, SPECS, objective=objective, **kw)


# --- the loss functions ----------------------------------------------------------------------
def test_mip_generalises_the_dot_product():
    x, y, z = torch.randn(3, 5, 4).unbind(0)
    torch.testing.assert_close(mip(x, y), (x * y).sum(1))
    torch.testing.assert_close(mip(x, y, z), torch.einsum("nd,nd,nd->n", x, y, z))


def test_n_squared_logits_are_every_pair_of_the_others():
    torch.manual_seed(0)
    x, y, z = torch.randn(3, 4, 6).unbind(0)
    logits, labels = symile_logits(x, [y, z], "n_squared")
    assert logits.shape == (4, 16)
    for i, j, k in itertools.product(range(4), repeat=3):
        torch.testing.assert_close(logits[i, j * 4 + k], (x[i] * y[j] * z[k]).sum())
    assert labels.tolist() == [0, 5, 10, 15]


def test_n_logits_have_positives_on_the_diagonal_and_shuffled_negatives():
    torch.manual_seed(0)
    x, y, z = torch.randn(3, 8, 6).unbind(0)
    g = torch.Generator().manual_seed(3)
    logits, labels = symile_logits(x, [y, z], "n", g)
    assert logits.shape == (8, 8) and labels.tolist() == list(range(8))
    torch.testing.assert_close(logits.diagonal(), mip(x, y, z))
    # each off-diagonal entry is MIP(x_i, y_p(j), z_q(j)) for the two seeded permutations
    g = torch.Generator().manual_seed(3)
    py, pz = torch.randperm(8, generator=g), torch.randperm(8, generator=g)
    expected = x @ (y[py] * z[pz]).T
    off = ~torch.eye(8, dtype=torch.bool)
    torch.testing.assert_close(logits[off], expected[off])


def test_symile_loss_matches_a_loop_reference_and_clip_for_two_modalities():
    torch.manual_seed(1)
    reps = [F.normalize(torch.randn(5, 4), dim=1) for _ in range(3)]
    ref = []
    for a in range(3):
        o = [reps[j] for j in range(3) if j != a]
        logits = torch.stack([torch.stack([(reps[a][i] * o[0][j] * o[1][k]).sum() for j in range(5) for k in range(5)])
                              for i in range(5)])
        ref.append(F.cross_entropy(2.0 * logits, torch.arange(5) * 5 + torch.arange(5)))
    torch.testing.assert_close(symile_loss(reps, 2.0, "n_squared"), torch.stack(ref).mean())
    # with two modalities, O(N) Symile with the positive on the diagonal is CLIP's InfoNCE (both directions)
    two = reps[:2]
    logits = two[0] @ two[1].T
    lab = torch.arange(5)
    clip_ref = (F.cross_entropy(logits, lab) + F.cross_entropy(logits.T, lab)) / 2
    torch.testing.assert_close(clip_loss(two), clip_ref)
    # and symile_loss itself, with either negative sampling, is that formula (M = 2 is CLIP)
    for sampling in ("n", "n_squared"):
        torch.testing.assert_close(symile_loss(two, 1.0, sampling, torch.Generator().manual_seed(0)), clip_ref)
        torch.testing.assert_close(symile_loss(two, 3.0, sampling), clip_loss(two, 3.0))


def test_two_modality_symile_has_no_floor_above_zero():
    """Perfectly aligned, well separated pairs: CLIP's loss goes to 0; a positive repeated among the
    negatives would hold it at ln 2 (shuffled "n") or ln N ("n_squared")."""
    reps = torch.eye(8) * 1.0
    for sampling in ("n", "n_squared"):
        loss = symile_loss([reps, reps], 50.0, sampling, torch.Generator().manual_seed(0))
        assert loss < 1e-6, (sampling, float(loss))


def test_bad_inputs_are_named():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="negative_sampling must be one of"):
        symile_logits(x, [x, x], "n_cubed")
    with pytest.raises(ValueError, match="representation 1 has shape"):
        symile_loss([x, torch.randn(5, 3), x])
    with pytest.raises(ValueError, match="'objective' parameter of pretrain_encoders"):
        pretrain_encoders(xor_frame(10, 0), SPECS, objective="symlie")
    with pytest.raises(ValueError, match="at least two modalities"):
        pretrain_encoders(xor_frame(10, 0), SPECS[:1])


def test_retrieval_metrics_count_ties_against_the_truth():
    scores = torch.zeros(4, 5)  # no information: the truth is never ranked above a tie
    m = retrieval_metrics(scores, torch.tensor([0, 1, 2, 3]), ks=(1, 5))
    assert m["accuracy"] == 0.0 and m["recall_at_5"] == 1.0
    scores = torch.eye(4, 5)
    assert retrieval_metrics(scores, torch.arange(4))["accuracy"] == 1.0


# --- the judged property: Symile sees the XOR that pairwise CLIP cannot ------------------------
def test_symile_retrieves_xor_modality_that_clip_cannot(capsys):
    train, test = xor_frame(2000, 0, missing=0.15), xor_frame(500, 1)
    symile = _pretrain(train, "symile").retrieve(test, "c")
    clip = _pretrain(train, "clip").retrieve(test, "c")
    chance = 1 / 2**BITS
    with capsys.disabled():
        print(f"\nXOR zero-shot retrieval of c from (a, b), {2**BITS} candidates: symile accuracy "
              f"{symile['accuracy']:.3f}, clip accuracy {clip['accuracy']:.3f}, chance {chance:.3f}")
    assert symile["accuracy"] > 0.9
    assert clip["accuracy"] < chance + 0.1
    assert symile["accuracy"] > clip["accuracy"] + 0.5


# --- pretraining, saving, fine-tuning ---------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    pre = _pretrain(xor_frame(300, 2, missing=0.2), "symile", max_epochs=2)
    return pre.save(tmp_path_factory.mktemp("pre") / "encoders"), pre


def test_save_load_round_trip(pretrained_dir):
    path, pre = pretrained_dir
    assert {p.name for p in path.iterdir()} == {"encoders.safetensors", "pretrain.json", "manifest.json"}
    loaded = PretrainedEncoders.load(path)
    frame = xor_frame(60, 5, missing=0.5)
    for m, r in pre.embed(frame).items():
        torch.testing.assert_close(loaded.embed(frame)[m], r)
    # an absent modality gets the learned missing representation, the same for every such row
    reps = loaded.embed(frame)
    absent = frame["a0"].is_nan().to_numpy()  # NaN cells count as absent
    assert absent.sum() >= 2 and torch.allclose(reps["a"][absent], reps["a"][absent][:1].expand(int(absent.sum()), -1))
    with pytest.raises(FileNotFoundError, match="not a pretrained-encoder directory"):
        PretrainedEncoders.load(path.parent)


def _labelled(n, seed):
    frame = xor_frame(n, seed)
    y = (frame["c0"].to_numpy() > 0.5).astype(int)
    return frame, y


def test_fine_tuning_starts_from_pretrained_encoders(pretrained_dir):
    from mmclin.config import ComponentConfig, ModelConfig, TrainerConfig
    from mmclin.training.core import fit_model

    path, pre = pretrained_dir
    frame, y = _labelled(64, 7)
    trainer = TrainerConfig(max_epochs=1, learning_rate=1e-12, weight_decay=0.0, val_fraction=0.0,
                            progress_bar=False, num_threads=1)
    model = ModelConfig(fusion=ComponentConfig(name="late", d_model=8), encoders=OPTIONS, pretrained=str(path))
    fitted = fit_model(frame, y, SPECS, model, trainer, ComponentConfig(name="binary"))
    for m in "abc":
        for k, v in pre.net.encoders[m].state_dict().items():
            torch.testing.assert_close(fitted.net.encoders[m].state_dict()[k], v, rtol=1e-5, atol=1e-6)
        assert fitted.featurizers[m].state_dict() == pre.featurizers[m].state_dict()  # not refitted
    scratch = fit_model(frame, y, SPECS, model.model_copy(update={"pretrained": None}), trainer, ComponentConfig(name="binary"))
    w = "nets.0.0.weight"
    assert not torch.allclose(scratch.net.encoders["a"].state_dict()[w], pre.net.encoders["a"].state_dict()[w])
    # the estimators take the same directory
    from sklearn.base import clone

    from mmclin import MultimodalClassifier

    clf = MultimodalClassifier(modalities=SPECS, fusion="concat", encoder_options=OPTIONS, pretrained=str(path),
                               max_epochs=1, learning_rate=1e-12, weight_decay=0.0, val_fraction=0.0).fit(frame, y)
    torch.testing.assert_close(clf.model_.net.encoders["c"].state_dict()[w], pre.net.encoders["c"].state_dict()[w])
    assert clone(clf).get_params()["pretrained"] == str(path)
    # mismatched encoder options are an error naming the modality
    bad = model.model_copy(update={"encoders": {**OPTIONS, "b": {"d_model": 16}}})
    with pytest.raises(ValueError, match="modality 'b': encoder options"):
        fit_model(frame, y, SPECS, bad, trainer, ComponentConfig(name="binary"))


def test_cli_pretrain_then_fit(tmp_path):
    import yaml

    from mmclin.interfaces.cli import main

    frame, y = _labelled(120, 3)
    frame.with_columns(pl.Series("label", y)).write_parquet(tmp_path / "xor.parquet")
    xor_frame(400, 4).write_parquet(tmp_path / "unlabeled.parquet")
    cfg = {"name": "xor", "output_dir": str(tmp_path / "out"),
           "data": {"path": str(tmp_path / "xor.parquet"), "target": ["label"],
                    "modalities": [s.model_dump(mode="json", exclude_none=True) for s in SPECS]},
           "model": {"task": {"name": "binary"}, "fusion": {"name": "concat", "d_model": 8}, "encoders": OPTIONS},
           "trainer": {"max_epochs": 2, "progress_bar": False},
           "pretrain": {"path": str(tmp_path / "unlabeled.parquet"), "max_epochs": 2, "dim": 8},
           "tracking": {"uri": f"sqlite:///{tmp_path / 'mlruns.db'}"}}
    (tmp_path / "xor.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["pretrain", str(tmp_path / "xor.yaml")]) == 0
    out = tmp_path / "out" / "xor" / "pretrained"
    assert (out / "encoders.safetensors").exists() and PretrainedEncoders.load(out).dim == 8
    assert main(["fit", str(tmp_path / "xor.yaml"), "--no-tracking", "--set", f"model.pretrained={out}"]) == 0
    assert main(["pretrain", str(tmp_path / "xor.yaml"), "--no-tracking", "--set", "pretrain.objective=clp"]) == 2

    import mlflow

    mlflow.set_tracking_uri(cfg["tracking"]["uri"])
    runs = mlflow.search_runs(experiment_names=["mmclin"])
    assert "metrics.zeroshot_c_accuracy" in runs.columns and "metrics.pretrain_loss" in runs.columns


# --- Symile as an auxiliary loss next to a supervised task --------------------------------------
def test_symile_head_returns_aux_loss_in_training(boring_binary):
    from mmclin.fusion.symile import SymileFusion
    from mmclin.testing.conformance import EXAMPLE_DIMS, _mask_absent, example_tokens

    torch.manual_seed(0)
    head = SymileFusion(EXAMPLE_DIMS, d_model=8, dim=4, aux_weight=0.5).train()
    tokens, present = example_tokens(6)
    out = head(_mask_absent(tokens, present), present)
    assert out.aux_loss is not None and out.aux_loss > 0
    assert head.eval()(_mask_absent(tokens, present), present).aux_loss is None
    # behaviour: training on the auxiliary loss alone aligns each subject's representations across modalities
    # (zero-shot retrieval of the right subject), which the head's initial representations do not
    head = SymileFusion(EXAMPLE_DIMS, d_model=8, dim=8, aux_weight=1.0).train()
    torch.manual_seed(1)
    shared = torch.randn(64, 4)  # one latent per subject, seen by every modality through its own projection
    aligned = {m: type(tokens[m])((shared @ torch.randn(4, d) + 0.05 * torch.randn(64, d)).unsqueeze(1),
                                  torch.ones(64, 1, dtype=torch.bool))
               for m, d in sorted(EXAMPLE_DIMS.items())}
    everyone = {m: torch.ones(64, dtype=torch.bool) for m in head.modalities}

    def retrieval() -> float:
        with torch.no_grad():
            reps = head.eval()(aligned, everyone).per_step
        a, b, cand = (reps[m] for m in head.modalities)
        scores = retrieval_scores([a, b], cand, "symile")  # MIP(a_i, b_i, c_j), as Symile scores a tuple
        return float((scores.argmax(1) == torch.arange(64)).float().mean())

    before = retrieval()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(400):
        opt.zero_grad()
        head.train()(aligned, everyone).aux_loss.backward()
        opt.step()
    after = retrieval()
    assert after > 0.7 and after > before + 0.5, (before, after)  # chance: 1/64
    with pytest.raises(ValueError, match="'objective' parameter of the symile fusion head"):
        SymileFusion(EXAMPLE_DIMS, objective="clap")

    from mmclin import MultimodalClassifier

    c = boring_binary
    clf = MultimodalClassifier(modalities=c.modalities, fusion="symile", fusion_options={"aux_weight": 0.2},
                               max_epochs=2, batch_size=32, num_threads=1, random_state=0).fit(c.frame, c.y)
    assert np.isfinite(clf.predict_proba(c.frame)).all()


def test_retrieval_scores_shapes():
    q = [torch.randn(3, 4), torch.randn(3, 4)]
    cand = torch.randn(7, 4)
    assert retrieval_scores(q, cand, "symile").shape == (3, 7)
    torch.testing.assert_close(retrieval_scores(q, cand, "clip"), q[0] @ cand.T + q[1] @ cand.T)
