"""The notes featurizer, the hashed n-gram encoder (planted phrase) and the Hugging Face encoder offline."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.metrics import roc_auc_score

from conftest import requires
from mmclin import ModalitySpec, MultimodalClassifier
from mmclin.datasets import make_synthetic_icu
from mmclin.training.core import FittedModel
from mmclin.training.data import featurize, fit_featurizers

NOTES = pl.List(pl.Struct({"time": pl.Float64, "text": pl.String}))


def _frame(cells: list) -> pl.DataFrame:
    return pl.DataFrame({"notes": cells}, schema={"notes": NOTES})


def test_notes_featurizer_idf_from_training_and_most_recent_notes():
    train = _frame([[{"time": -2.0, "text": "no acute disease"}, {"time": -1.0, "text": "stable effusion"}],
                    [{"time": -3.0, "text": "no acute disease"}], None])
    spec = ModalitySpec(name="n", kind="notes", columns=["notes"], options={"max_notes": 1, "n_features": 2**10})
    f = fit_featurizers(train, [spec])["n"]
    test = _frame([[{"time": -5.0, "text": "old note"}, {"time": -1.0, "text": "pneumothorax"}], []])
    table = featurize(test, {"n": f})
    assert table.present["n"].tolist() == [True, False]
    b = table.batch(torch.arange(2)).inputs["n"]
    assert b["note_mask"].tolist() == [[True], [False]]  # only the most recent note of row 0
    assert b["note_time"][0, 0].item() == pytest.approx(0.0)  # -1 is the latest training time
    w = b["weight"][0, 0][b["term_mask"][0, 0]]
    assert w.norm().item() == pytest.approx(1.0, abs=1e-5)  # L2-normalised TF-IDF
    # an n-gram never seen in training carries the largest IDF; "acute" (in 2 of 2 kept training notes... ) less
    idf = f.text.idf
    assert idf.max() == pytest.approx(np.log(3 / 1) + 1) and idf.min() == pytest.approx(1.0)
    g = type(f)(spec).load_state_dict(json.loads(json.dumps(f.state_dict())))
    torch.testing.assert_close(featurize(test, {"n": g}).batch(torch.arange(2)).inputs["n"], b)


def test_notes_errors():
    spec = ModalitySpec(name="n", kind="notes", columns=["notes"])
    with pytest.raises(ValueError, match=r"modality 'n', column 'notes': expected list\[struct\{time, text\}\].*notes_to_frame"):
        fit_featurizers(pl.DataFrame({"notes": ["just text"]}), [spec])
    bad = _frame([[{"time": None, "text": "x"}]])
    with pytest.raises(ValueError, match="modality 'n', column 'notes', row 0: a note has no finite time"):
        fit_featurizers(bad, [spec])
    wrong = ModalitySpec(name="n", kind="notes", columns=["notes"], options={"model_path": "/models/x"})
    with pytest.raises(ValueError, match=r"option\(s\) \['model_path'\] do not apply to encoder 'notes'"):
        fit_featurizers(_frame([[{"time": 0.0, "text": "x"}]]), [wrong])
    hf = ModalitySpec(name="n", kind="notes", columns=["notes"], encoder="notes_hf")
    with pytest.raises(ValueError, match="needs options=\\{'model_path'"):
        fit_featurizers(_frame([[{"time": 0.0, "text": "x"}]]), [hf])


def test_notes_encoder_learns_a_planted_phrase():
    c = make_synthetic_icu(n_stays=500, events_per_stay=5, signal={"values": 0.0, "timing": 0.0, "static": 0.0, "notes": 1.5}, seed=2)
    spec = ModalitySpec(name="notes", kind="notes", columns=["notes"], options={"n_features": 2**14, "d_model": 32})
    tr, te = np.arange(350), np.arange(350, 500)
    clf = MultimodalClassifier(modalities=[spec], max_epochs=8, batch_size=64, learning_rate=3e-3, val_fraction=0.0,
                               patience=None, random_state=0).fit(c.frame[tr], c.y[tr])
    assert roc_auc_score(c.y[te], clf.predict_proba(c.frame[te])[:, 1]) > 0.8


# ----------------------------------------------------------------------- Hugging Face, offline
@pytest.fixture(scope="module")
def tiny_hf_model(tmp_path_factory):
    transformers = pytest.importorskip("transformers")  # the [notes-hf] extra; skipped only when not installed
    path = tmp_path_factory.mktemp("tiny_bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","]
    words += sorted(set(("signs of septic shock noted patient resting comfortably in bed family at bedside "
                         "questions answered turned and repositioned q2h afebrile overnight vitals stable "
                         "continue current management labs sent as ordered").split()))
    tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@requires("transformers")
@pytest.mark.parametrize("mode", ["frozen", "finetune"])
def test_notes_hf_from_a_local_path(tiny_hf_model, mode, tmp_path):
    c = make_synthetic_icu(n_stays=120, events_per_stay=5, seed=5)
    spec = ModalitySpec(name="notes", kind="notes", columns=["notes"], encoder="notes_hf",
                        options={"model_path": tiny_hf_model, "mode": mode, "max_length": 32, "d_model": 8})
    clf = MultimodalClassifier(modalities=[spec], max_epochs=2, batch_size=32, random_state=0).fit(c.frame, c.y)
    proba = clf.predict_proba(c.frame)
    assert proba.shape == (120, 2) and np.isfinite(proba).all()
    enc = clf.model_.net.encoders["notes"]
    n_trainable = sum(p.numel() for p in enc.parameters())
    assert (enc.transformer is not None) == (mode == "finetune") and n_trainable > 0
    loaded = FittedModel.load(clf.save(str(tmp_path / "m")))
    np.testing.assert_allclose(loaded.predict_outputs(c.frame), clf.model_.predict_outputs(c.frame), rtol=1e-5, atol=1e-6)
