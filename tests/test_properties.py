"""Property-based tests of the frame -> batch path: random schemas, random missingness.

For any frame: the featurized table validates, presence masks equal "not all cells null",
missing masks equal the nulls, and every row's values come back in its own row.
"""
import numpy as np
import polars as pl
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmclin.cohort import ModalitySpec
from mmclin.training.data import featurize, fit_featurizers

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def frames(draw):
    n = draw(st.integers(2, 30))
    n_num = draw(st.integers(0, 4))
    n_cat = draw(st.integers(0 if n_num else 1, 3))
    n_gene = draw(st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    null_rate = draw(st.floats(0.0, 0.6))
    cols = {}
    for j in range(n_num):
        vals = rng.normal(draw(st.floats(-1e3, 1e3)), draw(st.floats(0.0, 1e3)), n)
        cols[f"num{j}"] = [None if rng.random() < null_rate else float(v) for v in vals]
    for j in range(n_cat):
        cols[f"cat{j}"] = [None if rng.random() < null_rate else str(rng.integers(0, 4)) for _ in range(n)]
    absent_genes = rng.random(n) < draw(st.floats(0.0, 0.7))
    for j in range(n_gene):
        cols[f"g{j}"] = [None if absent_genes[i] or rng.random() < null_rate / 3 else float(rng.normal()) for i in range(n)]
    frame = pl.DataFrame(cols, schema={**{c: pl.Float64 for c in cols if c[0] in "ng"}, **{c: pl.String for c in cols if c.startswith("cat")}})
    tab_cols = [c for c in frame.columns if c.startswith(("num", "cat"))]
    gene_cols = [c for c in frame.columns if c.startswith("g")]
    return frame, tab_cols, gene_cols


def _fit_or_skip(frame, specs):
    """Training needs every column observed once; draws without that are rejected, as a user gets an error."""
    for s in specs:
        for c in s.columns:
            if frame[c].null_count() == frame.height:
                return None
    return fit_featurizers(frame, specs)


@SETTINGS
@given(frames(), st.permutations(range(30)))
def test_frame_to_batch_round_trip(data, perm):
    frame, tab_cols, gene_cols = data
    specs = [ModalitySpec(name="clinical", kind="tabular", columns=tab_cols),
             ModalitySpec(name="genes", kind="genomics", columns=gene_cols)]
    feats = _fit_or_skip(frame, specs)
    if feats is None:
        return
    table = featurize(frame, feats)  # validates the batch contract
    for s in specs:
        expected = frame.select(pl.any_horizontal([pl.col(c).is_not_null() for c in s.columns])).to_series().to_numpy()
        assert table.present[s.name].numpy().tolist() == expected.tolist()
    tab = feats["clinical"]
    num = table.inputs["clinical"]["numeric"].numpy()
    miss = table.inputs["clinical"]["numeric_missing"].numpy()
    for j, c in enumerate(tab.numeric):
        col = frame[c].to_numpy().astype(float)
        assert miss[:, j].tolist() == np.isnan(col).tolist()
        back = num[:, j] * tab.std[j] + tab.mean[j]
        np.testing.assert_allclose(back[~np.isnan(col)], col[~np.isnan(col)], rtol=1e-4, atol=1e-3 * (1 + abs(tab.mean[j])))
        assert np.isfinite(num[:, j]).all()
    genes = table.inputs["genes"]
    assert torch.isfinite(genes["values"]).all()
    assert genes["missing"].numpy().tolist() == np.isnan(frame.select(gene_cols).to_numpy().astype(float)).tolist()
    # a permuted frame gives the same rows, permuted: no subject's data lands in another row
    order = [p for p in perm if p < frame.height] + list(range(len(perm), frame.height))
    permuted = featurize(frame[order], feats)
    for m in table.inputs:
        for k, t in table.inputs[m].items():
            assert torch.equal(permuted.inputs[m][k], t[order])
        assert torch.equal(permuted.present[m], table.present[m][order])


@st.composite
def event_frames(draw):
    """Subjects with no list, an empty list or up to 12 events; times encode the subject (i * 100 + j)."""
    n = draw(st.integers(2, 25))
    lengths = draw(st.lists(st.one_of(st.none(), st.integers(0, 12)), min_size=n, max_size=n))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    cells = []
    for i, k in enumerate(lengths):
        if k is None:
            cells.append(None)
            continue
        times = rng.permutation(k) + 100.0 * i  # unordered within a subject
        cells.append([{"time": float(t), "code": f"c{rng.integers(0, 3)}",
                       "value": None if rng.random() < 0.2 else float(rng.normal())} for t in times])
    dtype = pl.List(pl.Struct({"time": pl.Float64, "code": pl.String, "value": pl.Float64}))
    return pl.DataFrame({"ev": pl.Series(cells, dtype=dtype)}), lengths, draw(st.integers(1, 8))


@SETTINGS
@given(event_frames(), st.permutations(range(25)), st.integers(1, 25))
def test_event_lists_to_batch(data, perm, batch_size):
    frame, lengths, max_events = data
    if not any(lengths):
        return  # nothing to fit on: the user gets an error (tests/test_bad_inputs_events.py)
    spec = ModalitySpec(name="labs", kind="irregular_series", columns=["ev"], options={"max_events": max_events})
    feats = fit_featurizers(frame, [spec])
    table = featurize(frame, feats)  # validates
    f = feats["labs"]
    assert table.present["labs"].tolist() == [bool(k) for k in lengths]  # no list or an empty one: absent
    order = torch.tensor([p for p in perm if p < frame.height])
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = table.batch(idx)
        batch.validate()
        padded = batch.inputs["labs"]
        for b, i in enumerate(idx.tolist()):
            kept = min(lengths[i] or 0, max_events)
            mask = padded["mask"][b]
            assert int(mask.sum()) == kept and bool(mask[:kept].all())
            times = padded["time"][b][mask].double().numpy() * f.time_scale + f.time_shift
            # this subject's most recent events, in time order, and nobody else's
            expected = 100.0 * i + np.arange((lengths[i] or 0) - kept, lengths[i] or 0)
            np.testing.assert_allclose(times, expected, atol=1e-5 * max(1.0, abs(f.time_scale)))
