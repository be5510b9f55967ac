"""EHR at hospital scale: a MIMIC-shaped synthetic MEDS dataset -> event store -> training, per size.

    python benchmarks/meds_scale.py --sizes 1e6 1e7 5e7 2e8 [--work /tmp/mmclin-scale] [--steps 30]
                                    [--reference-max 1e7] [--keep]

For each size (events; subjects = events / 1000), every stage runs in a fresh process so its peak RSS
(``ru_maxrss``) is its own:

* ``generate``: ``benchmarks/meds_synth.py`` (10^4 Zipf-distributed codes, heavy-tailed events per
  subject, panels of tied times, MEDS layout, 1-3 ACES-style prediction times per subject);
* ``build``: the out-of-core event store (``mmclin.datasets.event_store``) from the shards: events/s end to
  end (wall and CPU seconds: the machine is shared, CPU time is the steadier number), peak RSS, bytes;
* ``memory`` / ``reference`` (sizes <= ``--reference-max``): the same arrays built in memory
  (``store="memory"``), and the few-line reference from the issue (polars read + sort, numpy run
  boundaries, one flat scatter of each subject's last 256 events into ``[S, 256]``);
* ``train``: the default ``irregular_series`` model (d_model 64, 2 layers; binary task; deep path, 1 torch
  thread) on the ``train`` split's samples, featurizer fitted by streaming the store, ``--steps`` steps of
  64 fed (a) from the store, padded per batch from the memory map, and (b) from the same batches padded
  beforehand and held in memory; rounds interleaved (a b a b ...) so load on the shared machine hits both.
  Then the length-grouped sampler vs shuffled batches: padded cells per epoch (exact) and samples/s.

Prints one JSON line per stage and a table at the end; ``--json`` writes all results to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _clock():
    return time.perf_counter(), time.process_time()


def _since(start) -> tuple[float, float]:
    w, c = start
    return time.perf_counter() - w, time.process_time() - c


# --- stages (each in its own process) -------------------------------------------------------------
def stage_generate(root: str, n: int) -> dict:
    sys.path.insert(0, str(HERE))
    from meds_synth import generate

    out = generate(root, n)
    return {**out, "rss_gib": _rss_gib()}


def stage_build(root: str, store: str) -> dict:
    start = _clock()
    from mmclin.datasets.event_store import event_source, open_event_store

    src = event_source(root)
    st = open_event_store(src, store)
    wall, cpu = _since(start)
    size = sum(f.stat().st_size for f in st.path.iterdir())
    return {"events": st.n_events, "subjects": st.n_subjects, "wall_s": wall, "cpu_s": cpu,
            "events_per_s": st.n_events / wall, "events_per_cpu_s": st.n_events / cpu, "rss_gib": _rss_gib(),
            "store_gib": size / 2**30, "partitions": st.info["partitions"]}


def stage_memory(root: str) -> dict:
    import numpy as np

    start = _clock()
    from mmclin.datasets.event_store import build_in_memory, event_source

    st = build_in_memory(event_source(root))
    wall, cpu = _since(start)
    return {"events": st.n_events, "wall_s": wall, "cpu_s": cpu, "events_per_s": st.n_events / wall,
            "events_per_cpu_s": st.n_events / cpu, "rss_gib": _rss_gib(), "check": int(np.asarray(st.code[-1]))}


def stage_reference(root: str, width: int = 256) -> dict:
    import numpy as np
    import polars as pl

    start = _clock()
    df = (pl.scan_parquet(f"{root}/data/**/*.parquet").filter(pl.col("time").is_not_null())
          .select("subject_id", "time", pl.col("code").cast(pl.Categorical), "numeric_value").collect()
          .sort("subject_id", "time"))
    s = df["subject_id"].to_numpy()
    first = np.concatenate([[0], np.flatnonzero(s[1:] != s[:-1]) + 1])
    ends = np.append(first[1:], len(s))
    row = np.repeat(np.arange(len(first)), ends - first)
    from_end = ends[row] - np.arange(len(s)) - 1
    keep = from_end < width
    pos = np.minimum(ends - first, width)[row] - 1 - from_end
    shape = (len(first), width)
    code = np.zeros(shape, np.int32)
    value = np.zeros(shape, np.float32)
    t = np.zeros(shape, np.int64)
    mask = np.zeros(shape, bool)
    r, p = row[keep], pos[keep]
    code[r, p] = df["code"].to_physical().to_numpy()[keep] + 1
    value[r, p] = df["numeric_value"].fill_null(0).to_numpy()[keep]
    t[r, p] = df["time"].dt.epoch("us").to_numpy()[keep]
    mask[r, p] = True
    wall, cpu = _since(start)
    return {"events": len(s), "wall_s": wall, "cpu_s": cpu, "events_per_s": len(s) / wall,
            "events_per_cpu_s": len(s) / cpu, "rss_gib": _rss_gib()}


def stage_train(root: str, store: str, steps: int, batch: int = 64) -> dict:
    import numpy as np
    import polars as pl
    import torch

    torch.set_num_threads(1)
    from mmclin.config import ComponentConfig, ModelConfig
    from mmclin.datasets.event_store import events_to_store
    from mmclin.training.core import build_member, build_task
    from mmclin.training.data import IndexBatches, LengthGroupedBatches, featurize, fit_featurizers, row_lengths

    out: dict = {}
    labels = pl.read_parquet(f"{root}/labels.parquet")
    splits = pl.read_parquet(f"{root}/metadata/subject_splits.parquet")
    labels = labels.join(splits, on="subject_id", how="left").filter(pl.col("split") == "train")
    start = _clock()
    frame, spec = events_to_store(root, labels, name="events", store=store)
    out["reference_s"] = _since(start)[0]
    start = _clock()
    featurizer = fit_featurizers(frame, [spec])["events"]
    out["fit_s"], out["fit_cpu_s"] = _since(start)
    task = build_task(ComponentConfig(name="binary"))
    y = frame["boolean_value"].cast(pl.Int64).to_numpy()
    task.fit_targets(y)
    start = _clock()
    table = featurize(frame, {"events": featurizer}, task.encode(y))
    out["transform_s"] = _since(start)[0]
    out["samples"] = len(table)
    out["window_events"] = int(table.inputs["events"].row_lengths.sum())
    kwargs = {"events": featurizer.encoder_kwargs()}

    def make_net():
        torch.manual_seed(0)
        net = build_member([spec], kwargs, ModelConfig(linear_path=False), task)
        return net, torch.optim.AdamW(net.parameters(), 1e-3)

    def step(net, opt, b) -> None:
        outputs, _ = net(b.inputs, b.present)
        loss = task.loss(outputs.float(), b.target)
        opt.zero_grad()
        loss.backward()
        opt.step()

    plain = IndexBatches(len(table), batch, True, seed=0)
    plain.set_epoch(0)
    idx = [b for _, b in zip(range(steps), plain)]
    premade = [table.batch(i) for i in idx]
    nets = {"store": make_net(), "premade": make_net()}
    seconds = {"store": 0.0, "premade": 0.0, "load": 0.0}
    rounds = 3
    per = max(1, steps // rounds)
    for r in range(rounds):
        chunk = range(r * per, min(steps, (r + 1) * per))
        t0 = time.perf_counter()
        for i in chunk:
            tl = time.perf_counter()
            b = table.batch(idx[i])  # read from the memory-mapped store, padded to this batch's longest row
            seconds["load"] += time.perf_counter() - tl
            step(*nets["store"], b)
        seconds["store"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in chunk:
            step(*nets["premade"], premade[i])
        seconds["premade"] += time.perf_counter() - t0
    n = per * rounds * batch
    out["store_samples_per_s"] = n / seconds["store"]
    out["premade_samples_per_s"] = n / seconds["premade"]
    out["throughput_ratio"] = seconds["premade"] / seconds["store"]
    out["load_share"] = seconds["load"] / seconds["store"]
    # length grouping: padding of one epoch (exact) and the speed of the same number of steps
    lengths = row_lengths(table)
    grouped = LengthGroupedBatches(lengths, batch, seed=0)
    grouped.set_epoch(0)
    g_idx = list(grouped)
    plain.set_epoch(0)
    p_idx = list(plain)

    def cells(bs):
        return sum(len(b) * max(int(lengths[b.numpy()].max()), 1) for b in bs)

    out["padded_cells_ratio"] = cells(p_idx) / cells(g_idx)
    out["real_cells_share_shuffled"] = float(lengths.sum()) / cells(p_idx)
    out["real_cells_share_grouped"] = float(lengths.sum()) / cells(g_idx)
    # the same number of steps drawn evenly over the epoch, so long and short groups both count
    pick = np.linspace(0, len(g_idx) - 2, steps).astype(int)
    times = {"grouped": 0.0, "shuffled": 0.0}
    for name, bs in (("shuffled", p_idx), ("grouped", g_idx)):
        net, opt = make_net()
        t0 = time.perf_counter()
        for i in pick:
            step(net, opt, table.batch(bs[i]))
        times[name] = time.perf_counter() - t0
    out["grouped_speedup"] = times["shuffled"] / times["grouped"]
    out["rss_gib"] = _rss_gib()
    return out


STAGES = {"generate": stage_generate, "build": stage_build, "memory": stage_memory, "reference": stage_reference,
          "train": stage_train}


def run_stage(name: str, *args) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "_stage", name, *map(str, args)], capture_output=True, text=True,
                          env=env)
    if proc.returncode:
        raise RuntimeError(f"stage {name} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t0
    print(json.dumps({"stage": name, **out}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7])
    ap.add_argument("--work", default="/tmp/mmclin-scale")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--reference-max", type=float, default=1e7)
    ap.add_argument("--keep", action="store_true", help="keep the generated datasets and stores")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    work = Path(a.work)
    results = []
    for size in a.sizes:
        n = int(size)
        root, store = work / f"meds_{n}", work / f"stores_{n}"
        row: dict = {"events": n}
        if not (root / "labels.parquet").exists():
            row["generate"] = run_stage("generate", root, n)
        shutil.rmtree(store, ignore_errors=True)
        row["build"] = run_stage("build", root, store)
        if n <= a.reference_max:
            row["memory"] = run_stage("memory", root)
            row["reference"] = run_stage("reference", root)
        row["train"] = run_stage("train", root, store, a.steps)
        results.append(row)
        if not a.keep:
            shutil.rmtree(store, ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    print("\n| events | subjects | build s (CPU s) | build events/s | build peak RSS GiB | store GiB | "
          "train peak RSS GiB | fit s | store/premade throughput | grouped padding / speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        b, t = r["build"], r["train"]
        print(f"| {r['events']:,} | {b['subjects']:,} | {b['wall_s']:.1f} ({b['cpu_s']:.1f}) | "
              f"{b['events_per_s'] / 1e6:.2f} M | {b['rss_gib']:.2f} | {b['store_gib']:.2f} | {t['rss_gib']:.2f} | "
              f"{t['fit_s']:.1f} | {t['throughput_ratio']:.2f} | {t['padded_cells_ratio']:.1f}x / "
              f"{t['grouped_speedup']:.2f}x |")
    for r in results:
        if "memory" in r:
            m, ref = r["memory"], r["reference"]
            print(f"in memory at {r['events']:,}: mmclin {m['events_per_s'] / 1e6:.1f} M events/s "
                  f"({m['events_per_cpu_s'] / 1e6:.1f} M per CPU s, {m['rss_gib']:.2f} GiB), reference "
                  f"{ref['events_per_s'] / 1e6:.1f} M events/s ({ref['events_per_cpu_s'] / 1e6:.1f} M per CPU s, "
                  f"{ref['rss_gib']:.2f} GiB): ratio {m['events_per_s'] / ref['events_per_s']:.2f} wall, "
                  f"{m['events_per_cpu_s'] / ref['events_per_cpu_s']:.2f} CPU")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_stage":
        name, args = sys.argv[2], sys.argv[3:]
        conv = [int(x) if x.isdigit() else x for x in args]
        print(json.dumps(STAGES[name](*conv)))
    else:
        main()
