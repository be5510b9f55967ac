"""The MLP-tower encoders: the tabular one is exactly an MLP over [values, missing flags, one-hot], and both learn."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mmclin import MultimodalClassifier, make_synthetic_cohort
from mmclin.encoders.tabular_mlp import TabularMLPEncoder


def test_tabular_mlp_is_an_mlp_over_the_one_hot_row():
    torch.manual_seed(0)
    enc = TabularMLPEncoder(n_numeric=3, cardinalities=[4, 3], hidden=(16,), d_model=8, dropout=0.0).eval()
    x = enc.example_input(7)
    one_hot = torch.cat([F.one_hot(x["categorical"][:, 0], 4), F.one_hot(x["categorical"][:, 1], 3)], 1).float()
    row = torch.cat([x["numeric"], x["numeric_missing"].float(), one_hot], 1)
    w1 = torch.cat([enc.numeric_in.weight, enc.categorical_in.weight.T], 1)   # the first Linear over the whole row
    expected = torch.relu(torch.relu(row @ w1.T + enc.numeric_in.bias) @ enc.tower[1].weight.T + enc.tower[1].bias)
    torch.testing.assert_close(enc(x).tokens[:, 0], expected)


def test_a_missing_value_is_not_a_zero():
    """The missing flag is an input: a missing cell and an observed 0 (the training mean) give different tokens."""
    enc = TabularMLPEncoder(n_numeric=2, cardinalities=[], hidden=(8,), d_model=4, dropout=0.0).eval()
    zeros = torch.zeros(1, 2)
    observed = enc({"numeric": zeros, "numeric_missing": torch.tensor([[False, False]]), "categorical": torch.zeros(1, 0, dtype=torch.long)})
    missing = enc({"numeric": zeros, "numeric_missing": torch.tensor([[True, False]]), "categorical": torch.zeros(1, 0, dtype=torch.long)})
    assert not torch.allclose(observed.tokens, missing.tokens)


def test_the_mlp_towers_learn_the_planted_signal():
    from sklearn.metrics import roc_auc_score

    c = make_synthetic_cohort(n_subjects=600, seed=1)
    enc = {"tabular": "tabular_mlp", "genomics": "genomics_mlp"}
    specs = [s.model_copy(update={"encoder": enc[s.kind]}) if s.kind in enc else s for s in c.modalities]
    assert any(s.encoder in enc.values() for s in specs)
    tr, te = np.arange(450), np.arange(450, 600)
    clf = MultimodalClassifier(modalities=specs, max_epochs=30, random_state=0).fit(c.frame[tr], c.y[tr])
    auroc = roc_auc_score(c.y[te], clf.predict_proba(c.frame[te])[:, 1])
    assert auroc > 0.75, auroc


def test_fill_missing_skips_nothing_it_should_fill():
    """The no-missing shortcut gives the same values and gradients as the select; with a missing cell the
    learned fill is used there and gets the gradient of that cell only."""
    from mmclin.encoders.base import fill_missing

    values = torch.randn(4, 3, requires_grad=True)
    fill = torch.nn.Parameter(torch.tensor([7.0, 8.0, 9.0]))
    none = torch.zeros(4, 3, dtype=torch.bool)
    out = fill_missing(values, none, fill)
    assert torch.equal(out, values)
    out.sum().backward()
    assert fill.grad is None and torch.equal(values.grad, torch.ones(4, 3))
    some = none.clone()
    some[2, 1] = True
    out = fill_missing(values, some, fill)
    assert out[2, 1].item() == 8.0 and torch.equal(out[~some], values[~some])
    out.sum().backward()
    assert fill.grad.tolist() == [0.0, 1.0, 0.0]
