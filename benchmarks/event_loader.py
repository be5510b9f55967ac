"""Event loader throughput: parquet on disk -> padded batch tensors, mmclin vs a few-line polars + numpy reference.

    python benchmarks/event_loader.py [--stays 5000] [--events 200] [--repeats 5] [--memory-events 10000000]

Data: ``make_icu_tables`` (37 variables, irregular times; events recorded until 24 h after
each stay's 48 h prediction time) written to parquet; both loaders keep only events up to
each stay's prediction time (~``--events`` per stay) and produce batches of 64 stays.

* mmclin: ``events_to_frame`` on a lazy parquet scan (join, cutoff filter, sort, group_by/agg
  into ``list[struct]``), then the fitted ``irregular_series`` featurizer's ``transform``
  (code ids, per-code standardisation, most-recent truncation, flat ``Ragged`` storage) and
  ``TensorTable.batch`` for every batch (padded to that batch's longest stay).
* reference: ``pl.read_parquet`` + join + cutoff filter + sort, categorical codes, then one
  numpy flat-index scatter into ``[N, L_max]`` arrays (codes, values, times, mask) sliced into
  batches: the fastest plain version we could write in a few lines (no normalisation, no
  truncation, padding per table).

Reports events/s (in-window events / seconds, median of ``--repeats``); target: mmclin not
slower than the reference by more than 1.5x. ``--memory-events``: peak resident memory of
each loader in a fresh process for that many in-window events.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

BATCH = 64


def write_tables(folder: Path, stays: int, events: float, seed: int = 0) -> tuple[Path, Path]:
    from mmclin.datasets import make_icu_tables

    t = make_icu_tables(n_stays=stays, events_per_stay=events, seed=seed)
    ev, su = folder / "events.parquet", folder / "subjects.parquet"
    t["events"].write_parquet(ev)
    t["subjects"].write_parquet(su)
    return ev, su


def mmclin_loader(ev: Path, su: Path, featurizer=None):
    """Returns (n_events, batches, featurizer); fits the featurizer when none is given."""
    from mmclin.cohort import ModalitySpec
    from mmclin.datasets import events_to_frame
    from mmclin.training.data import TensorTable

    frame = events_to_frame(pl.scan_parquet(ev), pl.read_parquet(su), name="ts")
    if featurizer is None:
        from mmclin.training.data import fit_featurizers

        featurizer = fit_featurizers(frame, [ModalitySpec(name="ts", kind="irregular_series", columns=["ts"])])["ts"]
    ragged, present = featurizer.transform(frame)
    table = TensorTable({"ts": ragged}, {"ts": present})
    batches = [table.batch(idx).inputs["ts"] for idx in torch.arange(len(table)).split(BATCH)]
    return ragged.n_items, batches, featurizer


def reference_loader(ev: Path, su: Path):
    """Plain polars + numpy: cutoff, sort, one flat-index scatter into [N, L_max], sliced into batches."""
    s = pl.read_parquet(su).select("subject_id", "prediction_time").with_row_index("row")
    e = (pl.read_parquet(ev).join(s, on="subject_id").filter(pl.col("time") <= pl.col("prediction_time"))
         .sort("row", "time").with_columns(pl.col("code").cast(pl.Categorical).to_physical().alias("cid")))
    row = e["row"].to_numpy()
    counts = np.bincount(row, minlength=s.height)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(len(row)) - starts[row]
    shape = (s.height, int(counts.max()))
    code, value, t, mask = np.zeros(shape, np.int64), np.zeros(shape, np.float32), np.zeros(shape, np.float32), np.zeros(shape, bool)
    code[row, pos] = e["cid"].to_numpy() + 1
    value[row, pos] = e["numeric_value"].to_numpy()
    t[row, pos] = (e["time"] - e["prediction_time"]).to_numpy()
    mask[row, pos] = True
    tensors = [torch.from_numpy(a) for a in (code, value, t, mask)]
    batches = [[x[i:i + BATCH] for x in tensors] for i in range(0, s.height, BATCH)]
    return len(row), batches


def peak_rss_mib() -> float:
    """This process's peak resident memory: VmHWM (Linux; ru_maxrss would carry the parent's peak across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(which: str, ev: str, su: str) -> None:
    """Run one loader in this process and print its peak RSS (for the memory measurement)."""
    import mmclin.encoders  # noqa: F401  (imports counted in the baseline)

    torch.set_num_threads(1)
    base = peak_rss_mib()
    t0 = time.perf_counter()
    n = (mmclin_loader if which == "mmclin" else reference_loader)(Path(ev), Path(su))[0]
    print(json.dumps({"events": n, "seconds": time.perf_counter() - t0, "baseline_mib": base, "peak_mib": peak_rss_mib()}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stays", type=int, default=5000)
    ap.add_argument("--events", type=float, default=200.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--memory-events", type=int, default=0, help="e.g. 10000000: peak memory at that many events")
    ap.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        child(*args._child)
        return
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        ev, su = write_tables(Path(tmp), args.stays, args.events)
        print(f"{args.stays} stays, events file {ev.stat().st_size / 2**20:.1f} MiB")
        t0 = time.perf_counter()
        n, _, featurizer = mmclin_loader(ev, su)
        print(f"first mmclin pass incl. featurizer fit: {time.perf_counter() - t0:.3f} s")
        # wall time, and process CPU time (all threads): on a shared machine the CPU time is the steadier one
        times: dict[str, list[float]] = {"mmclin": [], "reference": []}
        cpu: dict[str, list[float]] = {"mmclin": [], "reference": []}
        for _ in range(args.repeats):
            for name, fn in (("mmclin", lambda: mmclin_loader(ev, su, featurizer)), ("reference", lambda: reference_loader(ev, su))):
                t0, c0 = time.perf_counter(), time.process_time()
                n_events, batches = fn()[:2]
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        med = {k: statistics.median(v) for k, v in times.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        print(f"{n_events:,} in-window events, batches of {BATCH}; median of {args.repeats} (wall s, all runs: "
              + "; ".join(f"{k} {[round(x, 3) for x in v]}" for k, v in times.items()) + ")")
        for k in med:
            print(f"  {k:9s} wall {med[k]:.3f} s = {n_events / med[k]:,.0f} events/s | CPU {med_cpu[k]:.3f} s = "
                  f"{n_events / med_cpu[k]:,.0f} events per CPU-second")
        ratio, ratio_cpu = med["mmclin"] / med["reference"], med_cpu["mmclin"] / med_cpu["reference"]
        print(f"mmclin / reference: wall {ratio:.2f}, CPU {ratio_cpu:.2f} "
              f"(target <= 1.5: {'MET' if max(ratio, ratio_cpu) <= 1.5 else 'NOT MET'})")

    if args.memory_events:
        stays = int(round(args.memory_events / args.events))
        with tempfile.TemporaryDirectory() as tmp:
            ev, su = write_tables(Path(tmp), stays, args.events, seed=1)
            print(f"\npeak memory, {stays:,} stays (~{args.memory_events:,} in-window events), fresh process each:")
            for which in ("mmclin", "reference"):
                out = subprocess.run([sys.executable, __file__, "--_child", which, str(ev), str(su)],
                                     capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                what = "incl. featurizer fit" if which == "mmclin" else ""
                print(f"  {which:9s} {r['events']:,} events in {r['seconds']:.1f} s {what}; peak RSS {r['peak_mib']:,.0f} MiB "
                      f"({r['peak_mib'] - r['baseline_mib']:,.0f} MiB above the {r['baseline_mib']:,.0f} MiB after imports)")


if __name__ == "__main__":
    main()
