"""hetero_graph: the per-subject heterogeneous token graph, its structure, and the prompted
completion of absent modalities (against its own set-model and zero-filling ablations)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from mmclin.batch import ModalityTokens
from mmclin.fusion.hetero_graph import NEAR, HeteroGraphFusion, hub
from mmclin.testing import conformance
from mmclin.testing.conformance import EXAMPLE_DIMS, FUSION_CHECKS, _mask_absent, example_tokens

torch.set_num_threads(1)


def _head(**kw):
    torch.manual_seed(0)
    return HeteroGraphFusion(EXAMPLE_DIMS, **{"d_model": 8, "n_heads": 2, **kw}).eval()


def _batch():
    tokens, present = example_tokens(6)
    for m in present:
        present[m][:] = True
    present["b_genes"][2] = False  # sample 2 lacks genes: its genes hub is a completion
    return _mask_absent(tokens, present), present


# --- the graph -----------------------------------------------------------------------------
@pytest.mark.parametrize("window", [1, 2])
def test_graph_has_token_nodes_windowed_intra_edges_and_hubs(window):
    head = _head(window=window)
    tokens, present = _batch()
    data, *_ = head.build_graph(tokens, present)
    data.validate()  # torch-geometric's own consistency check
    for m in head.modalities:
        real = tokens[m].mask & present[m].unsqueeze(1)
        assert data[m].num_nodes == int(real.sum()) and data[hub(m)].num_nodes == 6
        b, p = data[m].batch, data[m].pos
        expected = {(i, j) for i in range(len(b)) for j in range(len(b)) if b[i] == b[j] and abs(p[i] - p[j]) <= window}
        assert {tuple(e) for e in data[m, NEAR, m].edge_index.T.tolist()} == expected
        member = data[m, "member", hub(m)].edge_index
        assert torch.equal(member[1], b) and torch.equal(member[0], torch.arange(len(b)))
    assert data["b_genes"].batch.tolist().count(2) == 0 and not bool(data[hub("b_genes")].present[2])
    for et in data.edge_types:  # subjects are disjoint graphs
        ei = data[et].edge_index
        assert torch.equal(data[et[0]].batch[ei[0]], data[et[2]].batch[ei[1]])


def test_graph_is_not_a_set_model_identical_tokens_get_different_states():
    """Two equal tokens at the ends and in the middle of a sequence have different neighbourhoods,
    so their node states differ; in the set ablation every equal token gets the same state."""
    dims = {"seq": 4, "tab": 3}
    torch.manual_seed(1)
    seq = torch.randn(1, 5, 4)
    seq[0, [0, 2]] = seq[0, 4].clone()  # positions 0, 2 and 4 hold the same token
    tokens = {"seq": ModalityTokens(seq, torch.ones(1, 5, dtype=torch.bool)),
              "tab": ModalityTokens(torch.randn(1, 1, 3), torch.ones(1, 1, dtype=torch.bool))}
    present = {m: torch.ones(1, dtype=torch.bool) for m in dims}
    graph = HeteroGraphFusion(dims, d_model=8, n_heads=2).eval()
    data, *_ = graph.build_graph(tokens, present)
    h, _ = graph.intra_modality(data)
    assert (h["seq"][0] - h["seq"][2]).abs().max() > 1e-3 and (h["seq"][2] - h["seq"][4]).abs().max() > 1e-3
    torch.manual_seed(1)
    set_head = HeteroGraphFusion(dims, d_model=8, n_heads=2, structure="set").eval()
    data, *_ = set_head.build_graph(tokens, present)
    x = {m: data[m].x for m in dims}
    out = set_head.convs[0](x, {et: data[et].edge_index for et in set_head.edge_types})
    torch.testing.assert_close(out["seq"][0], out["seq"][2])
    torch.testing.assert_close(out["seq"][2], out["seq"][4])


@pytest.mark.parametrize("structure", ["graph", "set"])
def test_vectorised_batch_matches_pyg_batch_of_subject_graphs(structure):
    """The batched graph is PyG's disjoint union: Batch.from_data_list of per-subject graphs."""
    from torch_geometric.data import Batch

    head = _head(structure=structure)
    tokens, present = _batch()
    full, *_ = head.build_graph(tokens, present)
    singles = []
    for i in range(6):
        t_i = {m: ModalityTokens(t.tokens[i:i + 1], t.mask[i:i + 1]) for m, t in tokens.items()}
        p_i = {m: p[i:i + 1] for m, p in present.items()}
        g, *_ = head.build_graph(t_i, p_i)
        for t in g.node_types:
            del g[t].batch
        singles.append(g)
    batched = Batch.from_data_list(singles)
    for t in full.node_types:
        torch.testing.assert_close(batched[t].x, full[t].x, rtol=1e-4, atol=1e-5)
        assert torch.equal(batched[t].batch, full[t].batch)
    for et in full.edge_types:
        a = {tuple(e) for e in batched[et].edge_index.T.tolist()}
        assert a == {tuple(e) for e in full[et].edge_index.T.tolist()}


@pytest.mark.parametrize("options", [{"structure": "set"}, {"completion": False}, {"window": 0, "n_layers": 1}],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("check", FUSION_CHECKS, ids=lambda c: c.__name__)
def test_ablations_pass_the_fusion_contract(check, options, monkeypatch):
    base = HeteroGraphFusion.example_options()
    monkeypatch.setattr(HeteroGraphFusion, "example_options", classmethod(lambda cls: {**base, **options}))
    conformance.load_builtin_components()
    check("hetero_graph")


# --- completion ----------------------------------------------------------------------------
def _completion(head, tokens, present):
    data, *_ = head.build_graph(tokens, present)
    h, _ = head.intra_modality(data)
    return head.complete_hubs(data, h)


def test_completion_for_missing_modality_depends_on_present_ones_only():
    head = _head()
    tokens, present = _batch()
    j = head.modalities.index("b_genes")
    comp = _completion(head, tokens, present)
    # the completion changes when a *present* modality of sample 2 changes ...
    changed = dict(tokens)
    t = tokens["a_clinical"].tokens.clone()
    t[2] = torch.randn_like(t[2]) * 3.0  # not a constant shift: the projection starts with LayerNorm
    changed["a_clinical"] = ModalityTokens(t, tokens["a_clinical"].mask)
    comp2 = _completion(head, changed, present)
    assert not torch.allclose(comp2[2, j], comp[2, j], atol=1e-4)
    torch.testing.assert_close(comp2[3], comp[3])  # ... and only that sample's
    # ... but not when the absent modality's own tokens change
    garbage = dict(tokens)
    garbage["b_genes"] = ModalityTokens(torch.randn_like(tokens["b_genes"].tokens) * 100, tokens["b_genes"].mask)
    torch.testing.assert_close(_completion(head, garbage, present)[2, j], comp[2, j])
    # the hub a subject lacks is its completion when stage 2 starts: zero-filling gives another output
    out = head(tokens, present).pooled
    zero = _head(completion=False)
    zero.load_state_dict({k: v for k, v in head.state_dict().items() if k in zero.state_dict()})
    out0 = zero(tokens, present).pooled
    assert (out[2] - out0[2]).abs().max() > 1e-4
    torch.testing.assert_close(out[[0, 1, 3, 4, 5]], out0[[0, 1, 3, 4, 5]])  # nobody else lacks a modality


def test_completion_is_not_zero_and_differs_between_subjects():
    head = _head()
    tokens, present = example_tokens(6)
    for m in present:
        present[m][:] = True
    present["b_genes"][[2, 4]] = False
    comp = _completion(head, _mask_absent(tokens, present), present)[:, head.modalities.index("b_genes")]
    assert comp[[2, 4]].abs().sum(1).min() > 1e-3
    assert not torch.allclose(comp[2], comp[4], atol=1e-4)


def test_completion_loss_in_training_only():
    head = _head().train()
    tokens, present = example_tokens(6)
    out = head(_mask_absent(tokens, present), present)
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss) and out.aux_loss > 0
    assert head.eval()(_mask_absent(tokens, present), present).aux_loss is None
    assert _head(completion_weight=0.0).train()(_mask_absent(tokens, present), present).aux_loss is None
    zero = _head(completion=False).train()
    assert zero(_mask_absent(tokens, present), present).aux_loss is None
    assert not any("prompt" in n or n.startswith("complete.") for n, _ in zero.named_parameters())


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        HeteroGraphFusion(EXAMPLE_DIMS, d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="must not contain '__' or '@'"):
        HeteroGraphFusion({"a__b": 3, "c": 2})
    with pytest.raises(ValueError, match="must not contain '__' or '@'"):
        HeteroGraphFusion({"a@hub": 3, "a": 2})
    with pytest.raises(ValueError, match="'structure' must be one of \\['graph', 'set'\\], got 'sets'"):
        HeteroGraphFusion(EXAMPLE_DIMS, structure="sets")
    with pytest.raises(ValueError, match="'window' must be an integer >= 0, got -1"):
        HeteroGraphFusion(EXAMPLE_DIMS, window=-1)


# --- behaviour on planted cohorts (the head trained directly, full batch) -------------------
def _fit(tokens, present, y, seed, steps, **options):
    """Head + a linear logit, Adam on the full batch; returns ``predict(tokens, present)``."""
    torch.manual_seed(seed)
    head = HeteroGraphFusion({m: t.tokens.shape[-1] for m, t in tokens.items()},
                             **{"d_model": 16, "n_heads": 2, "dropout": 0.0, "n_layers": 1, **options})
    logit = torch.nn.Linear(16, 1)
    opt = torch.optim.Adam([*head.parameters(), *logit.parameters()], lr=1e-2)
    head.train()
    for _ in range(steps):
        out = head(tokens, present)
        loss = F.binary_cross_entropy_with_logits(logit(out.pooled)[:, 0], y)
        loss = loss + (out.aux_loss if out.aux_loss is not None else 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()

    @torch.no_grad()
    def predict(tokens, present, graph=None):
        out = head.propagate(graph) if graph is not None else head(tokens, present)
        return logit(out.pooled)[:, 0].numpy()
    predict.head = head
    return predict


def adjacency_cohort(n: int, seed: int, T: int = 8):
    """Signal only in the relation between tokens: each sequence holds one token A and one token
    B among fillers C/D; the label is whether A and B are neighbours. The bag of tokens has the
    same distribution in both classes, so a set model is at chance. A second modality is noise."""
    g = torch.Generator().manual_seed(seed)
    sym = torch.randint(2, 4, (n, T), generator=g)
    y = torch.rand(n, generator=g) < 0.5
    pa = torch.randint(0, T, (n,), generator=g)
    for i in range(n):
        a = int(pa[i])
        if y[i]:
            pb = a + 1 if a < T - 1 else a - 1
        else:
            far = [p for p in range(T) if abs(p - a) > 1]
            pb = far[int(torch.randint(len(far), (1,), generator=g))]
        sym[i, a], sym[i, pb] = 0, 1
    seq = F.one_hot(sym, 4).float() + 0.1 * torch.randn(n, T, 4, generator=g)
    tokens = {"noise": ModalityTokens(torch.randn(n, 1, 3, generator=g), torch.ones(n, 1, dtype=torch.bool)),
              "seq": ModalityTokens(seq, torch.ones(n, T, dtype=torch.bool))}
    return tokens, {m: torch.ones(n, dtype=torch.bool) for m in tokens}, y.float()


def _rewire_within_subjects(edge_index, batch, seed):
    """The same edges between other nodes: node ids shuffled within each subject."""
    g = torch.Generator().manual_seed(seed)
    order = torch.argsort(batch.double() + torch.rand(len(batch), generator=g, dtype=torch.double))
    perm = torch.empty_like(order)
    perm[torch.arange(len(batch))] = order
    return perm[edge_index]


def test_structure_matters_beats_set_ablation_and_rewiring_destroys_it():
    """On the adjacency cohort, over 3 seeds: the graph model (window 1) learns the planted
    relation (AUROC > 0.9 on new subjects), its set ablation does not (< 0.65, margin > 0.3
    in every seed), and rewiring the trained model's intra-modality edges at random within
    each subject brings it back to chance (< 0.65). Measured: graph 1.00/1.00/1.00, set
    0.43-0.52, rewired 0.48-0.52."""
    for seed in range(3):
        tr, te = adjacency_cohort(256, seed), adjacency_cohort(400, 100 + seed)
        graph = _fit(*tr, seed, steps=60)
        set_model = _fit(*tr, seed, steps=60, structure="set")
        auc_graph = roc_auc_score(te[2], graph(*te[:2]))
        auc_set = roc_auc_score(te[2], set_model(*te[:2]))
        data, *_ = graph.head.build_graph(*te[:2])
        et = ("seq", NEAR, "seq")
        data[et].edge_index = _rewire_within_subjects(data[et].edge_index, data["seq"].batch, seed)
        auc_rewired = roc_auc_score(te[2], graph(None, None, graph=data))
        assert auc_graph > 0.9 and auc_set < 0.65 and auc_graph - auc_set > 0.3, (seed, auc_graph, auc_set)
        assert auc_rewired < 0.65, (seed, auc_rewired)
    # the set ablation cannot see order at all: shuffling the tokens leaves it unchanged
    shuffled = {m: ModalityTokens(t.tokens[:, torch.randperm(t.tokens.shape[1])], t.mask) for m, t in te[0].items()}
    np.testing.assert_allclose(set_model(shuffled, te[1]), set_model(*te[:2]), rtol=1e-4, atol=1e-5)
    assert np.abs(graph(shuffled, te[1]) - graph(*te[:2])).max() > 0.1


def latent_cohort(n: int, seed: int, missing_if_positive: float, missing_if_negative: float):
    """A 2-d latent ``z`` decides the label; ``b`` (4 tokens) sees ``z`` almost without noise,
    ``a`` (1 token) through more noise, ``c`` is noise. ``b`` is absent with a probability that
    depends on the label (missing not at random when the two differ)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g)
    y = (z.sum(1) + 0.3 * torch.randn(n, generator=g) > 0).float()
    wb, wa = torch.randn(2, 6, generator=torch.Generator().manual_seed(7)), torch.randn(2, 5, generator=torch.Generator().manual_seed(8))
    feats = {"a": (z @ wa).unsqueeze(1) + 0.5 * torch.randn(n, 1, 5, generator=g),
             "b": (z @ wb).unsqueeze(1).expand(n, 4, 6) + 0.1 * torch.randn(n, 4, 6, generator=g),
             "c": torch.randn(n, 2, 3, generator=g)}
    p_missing = torch.where(y > 0, missing_if_positive, missing_if_negative)
    present = {"a": torch.ones(n, dtype=torch.bool), "b": torch.rand(n, generator=g) >= p_missing,
               "c": torch.ones(n, dtype=torch.bool)}
    tokens = {m: ModalityTokens(x, present[m].unsqueeze(1).expand(x.shape[:2]).clone()) for m, x in feats.items()}
    return tokens, present, y


def test_completion_beats_zero_filling_under_mnar_test_missingness():
    """Trained on complete subjects; tested where ``b`` is missing for 70% of positives and 40%
    of negatives. Same data and seeds for both; over 3 seeds the completion gives a higher AUROC
    on the subjects lacking ``b`` in every seed (margin > 0.08) and on the whole MNAR test set on
    average (margin > 0.02). Measured: lacking b 0.84-0.88 vs 0.55-0.71; all 0.87-0.92 vs
    0.81-0.85. (With 20% MCAR absence in training the zero-filled hub, which still receives the
    present hubs' messages, does nearly as well: the advantage is for unseen absence.)"""
    gaps_missing, gaps_all = [], []
    for seed in range(3):
        tr = latent_cohort(256, seed, 0.0, 0.0)
        te_tokens, te_present, te_y = latent_cohort(400, 100 + seed, 0.7, 0.4)
        lacking = ~te_present["b"].numpy()
        scores = {}
        for completion in (True, False):
            predict = _fit(*tr, seed, steps=80, completion=completion)
            scores[completion] = predict(te_tokens, te_present)
        auc = {k: (roc_auc_score(te_y, s), roc_auc_score(te_y[lacking], s[lacking])) for k, s in scores.items()}
        gaps_all.append(auc[True][0] - auc[False][0])
        gaps_missing.append(auc[True][1] - auc[False][1])
        assert gaps_missing[-1] > 0.08, (seed, auc)
    assert np.mean(gaps_all) > 0.02, gaps_all


def test_estimator_learns_with_missing_genes():
    """End to end through the estimator on held-out subjects (measured 0.742; set ablation 0.709, concat 0.732)."""
    from mmclin import MultimodalClassifier
    from mmclin.datasets import make_synthetic_cohort

    c = make_synthetic_cohort(n_subjects=400, task="binary", missing={"genes": 0.3}, seed=3)
    tr, te = np.arange(300), np.arange(300, 400)
    clf = MultimodalClassifier(modalities=c.modalities, fusion="hetero_graph", fusion_options={"d_model": 16},
                               max_epochs=15, batch_size=32, num_threads=1, random_state=0, patience=None,
                               val_fraction=0.0).fit(c.frame[tr], c.y[tr])
    proba = clf.predict_proba(c.frame[te])
    assert proba.shape == (100, 2) and np.isfinite(proba).all()
    assert (~c.extra["present"]["genes"][te]).any()
    assert roc_auc_score(c.y[te], proba[:, 1]) > 0.68
