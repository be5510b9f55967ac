"""Out of core: the on-disk event store gives the model exactly what the in-memory path gives, is reused,
rebuilt when its inputs change, resumes after a kill, never lets a post-cutoff event in, and does not
hold the event table in memory."""
from __future__ import annotations

import datetime as dt
import json
import os
import tracemalloc

import numpy as np
import polars as pl
import pytest
import torch

from mmclin import MultimodalClassifier
from mmclin.cohort import ModalitySpec
from mmclin.datasets import event_store as es
from mmclin.datasets.event_store import event_source, events_to_store, open_event_store
from mmclin.datasets.meds import read_meds
from mmclin.training.data import featurize, fit_featurizers
from test_meds import SERIES, make_meds

T0 = dt.datetime(2150, 1, 1)


def _h(hours: float) -> dt.datetime:
    return T0 + dt.timedelta(hours=float(hours))


def tied_events(n_subjects: int = 30, seed: int = 0) -> pl.DataFrame:
    """Long events with panels (several codes at one time, in random order), repeated codes at one time with
    different values, code-only events and null values; numeric-time and datetime copies."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_subjects):
        for t in np.round(np.sort(rng.uniform(0, 60, rng.integers(1, 15))), 1):
            for code in rng.permutation(["LAB//a", "LAB//b", "LAB//c", "DX//x", "LAB//a"])[: rng.integers(1, 6)]:
                value = None if code.startswith("DX") or rng.random() < 0.1 else float(np.round(rng.normal(3, 1), 2))
                rows.append((10 * s + 7, _h(t), str(code), value))
    frame = pl.DataFrame(rows, schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String,
                                       "numeric_value": pl.Float64}, orient="row")
    return frame.sample(fraction=1.0, shuffle=True, seed=seed)  # not sorted at all


def _subjects(events: pl.DataFrame, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    ids = np.sort(events["subject_id"].unique().to_numpy())
    rows = [(int(i), _h(h), bool(rng.random() < 0.5)) for i in ids for h in (20, 45)] + [(999_999, _h(30), False)]
    return pl.DataFrame(rows, schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), "y": pl.Boolean},
                        orient="row")


def _same_batches(a, b, name_a: str, name_b: str, n: int) -> None:
    assert torch.equal(a.present[name_a], b.present[name_b])
    for idx in [torch.arange(n), torch.randperm(n, generator=torch.Generator().manual_seed(0))[: max(n // 2, 1)]]:
        pa, pb = a.batch(idx).inputs[name_a], b.batch(idx).inputs[name_b]
        assert pa.keys() == pb.keys()
        for k in pa:
            assert pa[k].dtype == pb[k].dtype and torch.equal(pa[k], pb[k]), k


@pytest.fixture(scope="module")
def meds_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("meds")
    labels = make_meds(root, n_subjects=40)
    labels.write_parquet(root / "labels.parquet")
    return root


@pytest.mark.parametrize("options", [{}, {"max_events": 5, "log_skewed": True, "min_code_count": 2,
                                     "max_notes": 1, "max_terms": 5}])
def test_store_gives_the_in_memory_inputs_bit_for_bit(meds_root, tmp_path, options):
    mem = read_meds(meds_root, meds_root / "labels.parquet", series=SERIES)
    ooc = read_meds(meds_root, meds_root / "labels.parquet", series=SERIES, store=tmp_path / "stores")
    assert [s.name for s in ooc.modalities] == [s.name for s in mem.modalities]
    assert ooc.frame.schema["labs"] == pl.Struct({"subject_id": pl.Int64, "prediction_time": pl.Datetime("us")})
    train = np.arange(0, mem.frame.height, 2)
    for name in [*SERIES, "notes"]:  # the notes too: hashed once into a notes store
        kind = "notes" if name == "notes" else "irregular_series"
        mine = {k: v for k, v in options.items() if (k in ("max_notes", "max_terms")) == (kind == "notes")}
        spec_m = ModalitySpec(name=name, kind=kind, columns=[name], options=mine)
        spec_o = next(s for s in ooc.modalities if s.name == name)
        spec_o = spec_o.model_copy(update={"options": {**spec_o.options, **mine}})
        fm = fit_featurizers(mem.frame[train], [spec_m])[name]
        fo = fit_featurizers(ooc.frame[train], [spec_o])[name]
        assert fm.state_dict() == fo.state_dict()  # vocabulary, per-code moments, time scale: fitted on train rows
        _same_batches(featurize(mem.frame, {name: fm}), featurize(ooc.frame, {name: fo}), name, name, mem.frame.height)


def test_store_predictions_equal_in_memory_predictions(meds_root, tmp_path):
    mem = read_meds(meds_root, meds_root / "labels.parquet", series=SERIES)
    ooc = read_meds(meds_root, meds_root / "labels.parquet", series=SERIES, store=tmp_path / "stores")
    kw = dict(max_epochs=2, batch_size=32, num_threads=1, random_state=0)
    a = MultimodalClassifier(modalities=mem.modalities, **kw).fit(mem.frame, mem.y)
    b = MultimodalClassifier(modalities=ooc.modalities, **kw).fit(ooc.frame, ooc.y)
    np.testing.assert_array_equal(a.predict_proba(mem.frame), b.predict_proba(ooc.frame))


@pytest.mark.parametrize("options", [{}, {"min_code_count": 170}], ids=["all-codes", "rare-codes-unknown"])
def test_unsorted_tables_in_several_files_match_events_to_frame(tmp_path, options):
    """A generic long table (not MEDS, not sorted, one subject's events spread over two files): the store is
    built from subject-id ranges and still equals events_to_frame + the featurizer, ties included (and with
    two codes sharing the unknown id, whose moments then take a second pass in the in-memory order)."""
    from mmclin.datasets import events_to_frame

    ev = tied_events()
    half = ev.height // 2
    ev[:half].write_parquet(tmp_path / "a.parquet")
    ev[half:].write_csv(tmp_path / "b.csv")
    subjects = _subjects(ev)
    frame, spec = events_to_store([tmp_path / "a.parquet", tmp_path / "b.csv"], subjects, name="ev",
                                  store=tmp_path / "s", partition_events=40, **options)
    src = event_source([tmp_path / "a.parquet", tmp_path / "b.csv"])
    store = open_event_store(src, tmp_path / "s")
    assert store.info["clustered"] is False and store.info["partitions"] > 3
    mem = events_to_frame(ev, subjects, name="ev")
    spec_m = ModalitySpec(name="ev", kind="irregular_series", columns=["ev"], options=options)
    fm, fo = fit_featurizers(mem, [spec_m])["ev"], fit_featurizers(frame, [spec])["ev"]
    assert fm.state_dict() == fo.state_dict()
    tm, to = featurize(mem, {"ev": fm}), featurize(frame, {"ev": fo})
    _same_batches(tm, to, "ev", "ev", mem.height)
    assert not bool(to.present["ev"][-1])  # the subject without events: modality absent


def test_numeric_times_and_windows(tmp_path):
    from mmclin.datasets import events_to_frame

    ev = tied_events().with_columns(((pl.col("time") - pl.lit(T0)).dt.total_seconds() / 3600).alias("time"))
    ev.write_parquet(tmp_path / "ev.parquet")
    subjects = _subjects(ev).with_columns(((pl.col("prediction_time") - pl.lit(T0)).dt.total_seconds() / 3600)
                                          .alias("prediction_time"))
    frame, spec = events_to_store(tmp_path / "ev.parquet", subjects, name="ev", store=tmp_path / "s", window=12.0)
    mem = events_to_frame(ev, subjects, name="ev", window=12.0)
    fm = fit_featurizers(mem, [ModalitySpec(name="ev", kind="irregular_series", columns=["ev"])])["ev"]
    fo = fit_featurizers(frame, [spec])["ev"]
    assert fm.state_dict() == fo.state_dict()
    _same_batches(featurize(mem, {"ev": fm}), featurize(frame, {"ev": fo}), "ev", "ev", mem.height)


def test_a_store_is_reused_and_rebuilt_only_when_its_inputs_change(meds_root, tmp_path, monkeypatch):
    built = []
    real = es._build_locked
    monkeypatch.setattr(es, "_build_locked", lambda *a, **k: built.append(a[1]) or real(*a, **k))
    src = event_source(meds_root, codes=["LAB//"])
    first = open_event_store(src, tmp_path)
    again = open_event_store(event_source(meds_root, codes=["LAB//"]), tmp_path)  # another run, another fold
    assert len(built) == 1 and again.path == first.path
    # the featurizer of every fold opens the same store
    ooc = read_meds(meds_root, meds_root / "labels.parquet", series={"labs": ["LAB//"]}, store=tmp_path)
    labs = [s for s in ooc.modalities if s.name == "labs"]
    for rows in (np.arange(0, 60), np.arange(60, 120)):
        fit_featurizers(ooc.frame[rows], labs)
    assert len(built) == 1
    # another code filter is another store; so is a changed file
    open_event_store(event_source(meds_root, codes=["VITAL//"]), tmp_path)
    assert len(built) == 2
    shard = meds_root / "data" / "1.parquet"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        rebuilt = open_event_store(event_source(meds_root, codes=["LAB//"]), tmp_path)
        assert len(built) == 3 and rebuilt.path != first.path
    finally:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_changed_cutoff_reads_the_same_store_up_to_the_new_cutoff(meds_root, tmp_path):
    """Cutoffs are applied per row when rows are indexed (a binary search in the subject's times): one store
    serves every label file, and each row sees exactly its events with time <= its prediction time."""
    ooc = read_meds(meds_root, meds_root / "labels.parquet", series=SERIES, store=tmp_path)
    spec = next(s for s in ooc.modalities if s.name == "labs")
    early = ooc.frame.with_columns(pl.col(spec.name).struct.with_fields(
        pl.field("prediction_time") - pl.duration(hours=10)))
    f = fit_featurizers(ooc.frame, [spec])[spec.name]
    late_len = f.transform(ooc.frame)[0].lengths
    early_len = f.transform(early)[0].lengths
    assert (early_len <= late_len).all() and (early_len < late_len).any()
    mem = read_meds(meds_root, early.rename({"prediction_time": "_p"}).select(
        "subject_id", pl.col(spec.name).struct.field("prediction_time"), "boolean_value"), series=SERIES)
    assert torch.equal(mem.frame[spec.name].list.len().fill_null(0).to_torch().long(), early_len)


def test_a_killed_build_resumes_and_equals_a_clean_build(meds_root, tmp_path, monkeypatch):
    src = event_source(meds_root)
    clean = es.build_in_memory(src)
    calls = []
    real = es._process

    def dies_after_one(*a, **k):
        if len(calls) == 1:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(es, "_process", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        open_event_store(src, tmp_path, partition_events=200)
    key = src.key()
    assert not (tmp_path / key).exists()  # no visible partial store
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [f".{key}.partial"]
    assert json.loads((tmp_path / f".{key}.partial" / "progress.json").read_text())["done"] == 1
    calls.clear()
    monkeypatch.setattr(es, "_process", lambda *a, **k: calls.append(1) or real(*a, **k))
    store = open_event_store(src, tmp_path, partition_events=200)
    plan = es._plan(src, 200)
    assert len(calls) == len(plan["parts"]) - 1  # the finished partition was kept
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{key}.lock", key]
    for k in ("subjects", "offsets", "time", "value"):
        np.testing.assert_array_equal(getattr(store, k), getattr(clean, k))
    np.testing.assert_array_equal(np.array(store.codes)[store.code], np.array(clean.codes)[clean.code])


def test_post_cutoff_events_never_enter(tmp_path):
    """Events planted after every prediction time (huge values, a new code, notes) change neither the
    model inputs nor the predictions."""
    clean, leaky = tmp_path / "clean", tmp_path / "leaky"
    labels = make_meds(clean, n_subjects=30)
    make_meds(leaky, n_subjects=30, leak=True)
    labels.write_parquet(tmp_path / "labels.parquet")
    a = read_meds(clean, tmp_path / "labels.parquet", series=SERIES, store=tmp_path / "stores")
    b = read_meds(leaky, tmp_path / "labels.parquet", series=SERIES, store=tmp_path / "stores")
    fa, fb = fit_featurizers(a.frame, a.modalities), fit_featurizers(b.frame, b.modalities)
    for name in SERIES:
        assert fa[name].state_dict() == fb[name].state_dict()
        _same_batches(featurize(a.frame, {name: fa[name]}), featurize(b.frame, {name: fb[name]}), name, name,
                      a.frame.height)
    kw = dict(max_epochs=2, batch_size=32, num_threads=1, random_state=0)
    pa = MultimodalClassifier(modalities=a.modalities, **kw).fit(a.frame, a.y).predict_proba(a.frame)
    pb = MultimodalClassifier(modalities=b.modalities, **kw).fit(b.frame, b.y).predict_proba(b.frame)
    np.testing.assert_array_equal(pa, pb)


def test_building_and_training_do_not_hold_the_event_table(tmp_path, monkeypatch):
    """Over ~400k events the build keeps one partition (and per-subject arrays), the featurizer one chunk
    of a fold's rows and a batch: numpy's peak stays far below the table's own size (~24 bytes an event)."""
    rng = np.random.default_rng(0)
    n_subjects, per = 2_000, 200
    for k in range(4):  # four subject-sorted shards, small row groups
        sid = np.repeat(np.arange(k * n_subjects // 4, (k + 1) * n_subjects // 4), per)
        t = np.tile(np.arange(per), len(sid) // per) * 3_600_000_000 + 4_000_000_000_000_000
        table = pl.DataFrame({"subject_id": sid, "time": pl.Series(t).cast(pl.Datetime("us")),
                              "code": pl.Series((rng.zipf(1.5, len(sid)) % 500).astype(str)),
                              "numeric_value": rng.normal(size=len(sid)).astype(np.float32)})
        (tmp_path / "data").mkdir(exist_ok=True)
        table.write_parquet(tmp_path / "data" / f"{k}.parquet", row_group_size=20_000)
    n_events = n_subjects * per
    subjects = pl.DataFrame({"subject_id": np.arange(n_subjects),
                             "prediction_time": pl.Series(np.full(n_subjects, 4_000_000_000_000_000 + 10**12))
                             .cast(pl.Datetime("us"))})
    import mmclin.encoders.irregular_series as irregular

    monkeypatch.setattr(irregular, "STREAM_ITEMS", 20_000)  # the featurizer streams in chunks of this size
    tracemalloc.start()
    frame, spec = events_to_store(tmp_path, subjects, name="ev", store=tmp_path / "s", partition_events=20_000,
                                  max_events=64)
    _, build_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    f = fit_featurizers(frame[: n_subjects // 2], [spec])["ev"]
    table = featurize(frame, {"ev": f})
    for idx in torch.arange(len(table)).split(64):
        table.batch(idx)
    _, train_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    table_bytes = 24 * n_events
    assert build_peak < table_bytes / 4, (build_peak, table_bytes)
    assert train_peak < table_bytes / 4, (train_peak, table_bytes)
    assert open_event_store(event_source(tmp_path), tmp_path / "s").n_events == n_events


def test_bad_inputs_name_the_file_column_and_row(tmp_path):
    good = tied_events().sort("subject_id", "time")
    good.write_parquet(tmp_path / "good.parquet")
    good.drop("code").write_parquet(tmp_path / "nocode.parquet")
    with pytest.raises(ValueError, match=r"nocode.parquet' has no column 'code'"):
        event_source(tmp_path / "nocode.parquet")
    good.with_columns(pl.col("numeric_value").cast(pl.String)).write_parquet(tmp_path / "text.parquet")
    with pytest.raises(ValueError, match=r"text.parquet' column 'numeric_value' has type (large_)?string"):
        event_source(tmp_path / "text.parquet")
    good.with_columns(pl.col("subject_id").cast(pl.String)).write_parquet(tmp_path / "ids.parquet")
    with pytest.raises(ValueError, match=r"ids.parquet' column 'subject_id' has type .*integer ids"):
        event_source(tmp_path / "ids.parquet")
    bad = good.with_columns(pl.when(pl.int_range(pl.len()) == 17).then(float("inf")).otherwise(pl.col("numeric_value"))
                            .alias("numeric_value"))
    bad.write_parquet(tmp_path / "inf.parquet")
    with pytest.raises(ValueError, match=r"inf.parquet' column 'numeric_value' row 17: value inf is not finite"):
        open_event_store(event_source(tmp_path / "inf.parquet"), tmp_path / "s")
    subjects = _subjects(good)
    frame, spec = events_to_store(tmp_path / "good.parquet", subjects, name="ev", store=tmp_path / "s")
    with pytest.raises(ValueError, match=r"modality 'ev', column 'ev': .*struct\{subject_id, prediction_time"):
        fit_featurizers(frame.with_columns(pl.col("subject_id").alias("ev")), [spec])
    no_cut = frame.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(None).otherwise(pl.col("prediction_time"))
                                .alias("p")).with_columns(pl.struct(subject_id="subject_id", prediction_time="p").alias("ev"))
    with pytest.raises(ValueError, match=r"modality 'ev', column 'ev', row 3: the reference has no prediction_time"):
        fit_featurizers(no_cut, [spec])


# --- the length-grouped sampler -------------------------------------------------------------------
def _epoch_batches(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(iter(sampler))


def test_length_grouped_batches_hold_every_row_once_with_similar_lengths():
    from mmclin.training.data import IndexBatches, LengthGroupedBatches

    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(3, 1.5, 3_001).astype(np.int64), 20_000)  # heavy-tailed
    grouped = LengthGroupedBatches(lengths, 32, seed=7)
    plain = IndexBatches(len(lengths), 32, True, seed=7)
    for epoch in (0, 1):
        batches = _epoch_batches(grouped, epoch)
        rows = torch.cat(batches).numpy()
        assert sorted(rows.tolist()) == list(range(len(lengths)))  # every row exactly once
        assert [len(b) for b in batches] == [32] * (len(lengths) // 32) + [len(lengths) % 32]
        assert len(batches) == len(grouped)

        def padded(bs):  # the cells a batch padded to its longest row holds
            return sum(len(b) * int(lengths[b.numpy()].max()) for b in bs)

        assert padded(batches) < padded(_epoch_batches(plain, epoch)) / 5
    a, b = _epoch_batches(grouped, 0), _epoch_batches(LengthGroupedBatches(lengths, 32, seed=7), 0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # deterministic by (seed, epoch)
    assert not all(torch.equal(x, y) for x, y in zip(a, _epoch_batches(grouped, 1)))  # reshuffled per epoch
    # long and short batches are interleaved, not sorted over the epoch
    means = [lengths[x.numpy()].mean() for x in a[:-1]]
    assert not (np.all(np.diff(means) >= 0) or np.all(np.diff(means) <= 0))


def test_length_grouped_batches_shard_across_ranks():
    from mmclin.training.data import LengthGroupedBatches
    from mmclin.training.distributed import shard_batches

    lengths = np.random.default_rng(1).lognormal(3, 1.5, 1_000).astype(np.int64)
    sampler = LengthGroupedBatches(lengths, 16, seed=3)
    order = sampler._order(0, world=2)
    ranks = [list(shard_batches(order, 16, r, 2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])  # same number of steps: no DDP hang
    rows = torch.cat([torch.cat(r) for r in ranks]).numpy()
    assert len(set(rows.tolist())) == len(rows) == 1_000  # disjoint, all rows (1000 = 31 x 32 + 8 split 4 / 4)
    # a global step's two halves come from one length-sorted run: each rank pads far less than unsorted
    padded = sum(len(b) * int(lengths[b.numpy()].max()) for r in ranks for b in r)
    plain = torch.randperm(1_000, generator=torch.Generator().manual_seed(0))
    padded_plain = sum(len(b) * int(lengths[b.numpy()].max()) for r in (0, 1) for b in shard_batches(plain, 16, r, 2))
    assert padded < padded_plain / 2.5


def test_resume_is_exact_with_length_grouping_and_a_store(meds_root, tmp_path):
    from test_resume import _Crash, assert_resume_is_exact

    from mmclin.config import ComponentConfig, ModelConfig, TrainerConfig
    from mmclin.training.core import fit_model

    c = read_meds(meds_root, meds_root / "labels.parquet", series=SERIES, store=tmp_path / "stores")
    cfg = dict(model=ModelConfig(encoders={"labs": {"d_model": 16, "n_layers": 1}, "vitals": {"d_model": 16, "n_layers": 1}}),
               trainer=TrainerConfig(max_epochs=3, batch_size=16, patience=None, progress_bar=False,
                                     group_by_length=True),
               task=ComponentConfig(name="binary"))
    ref = assert_resume_is_exact(tmp_path, c, cfg, _Crash("epoch_end", 0, 1))
    plain = fit_model(c.frame, c.y, c.modalities, **{**cfg, "trainer": cfg["trainer"].model_copy(
        update={"group_by_length": False})})
    assert plain.history != ref.history  # the option is in effect


# --- notes out of core ------------------------------------------------------------------------------
def test_notes_from_a_store_equal_notes_in_memory(tmp_path):
    """Several notes per subject, blank ones, ties in time, notes after the cutoffs, an unsorted table: the
    notes store (times + hashed term counts) gives the in-memory featurizer's IDF and batches bit for bit."""
    from mmclin.datasets import notes_to_frame
    from mmclin.datasets.event_store import notes_to_store

    rng = np.random.default_rng(0)
    words = ["sepsis", "stable", "pressors", "lactate", "rising", "extubated", "family", "meeting", "fever"]
    rows = []
    for s in range(25):
        for _ in range(rng.integers(0, 8)):
            text = " ".join(rng.choice(words, rng.integers(1, 12))) if rng.random() > 0.1 else "   "
            rows.append((s, _h(float(np.round(rng.uniform(0, 60), 0))), text))
    notes = pl.DataFrame(rows, schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "text": pl.String},
                         orient="row").sample(fraction=1.0, shuffle=True, seed=1)
    notes.write_parquet(tmp_path / "notes.parquet")
    subjects = _subjects(notes)
    for options in ({}, {"max_notes": 2, "max_terms": 7, "n_features": 4096}):
        frame, spec = notes_to_store(tmp_path / "notes.parquet", subjects, name="nt", store=tmp_path / "s", **options)
        mem = notes_to_frame(notes, subjects, name="nt")
        fm = fit_featurizers(mem[::2], [ModalitySpec(name="nt", kind="notes", columns=["nt"], options=options)])["nt"]
        fo = fit_featurizers(frame[::2], [spec])["nt"]
        assert fm.state_dict() == fo.state_dict()
        _same_batches(featurize(mem, {"nt": fm}), featurize(frame, {"nt": fo}), "nt", "nt", mem.height)
