"""mmclin's event store vs meds-torch-data on the same synthetic MEDS dataset: loading time and peak memory.

    python benchmarks/meds_side_by_side.py ROOT [--mtd-venv /tmp/mtd-venv] [--batch 64]

ROOT: a dataset of ``benchmarks/meds_synth.py`` (MEDS shards, ``labels.parquet``). meds-torch-data pins
polars 1.x, so it runs from its own virtual environment (never mmclin's)::

    python -m venv /tmp/mtd-venv && /tmp/mtd-venv/bin/pip install torch==2.13.0 meds-torch-data==0.9.0

What each side does, from the MEDS shards to every padded training batch of the ``train`` split's
labelled samples (each cut at its prediction time, at most 256 measurements, batches of 64):

* mmclin: build the event store (``read_meds(..., store=...)``), fit the ``irregular_series`` featurizer
  on the training samples (vocabulary, per-code moments), pad every batch from the memory map;
* meds-torch-data: ``MTD_preprocess`` (MEDS-Transforms: fit normalisation and vocabulary, normalise,
  tokenise, tensorise into nested ragged tensors), then ``MEDSPytorchDataset`` in task mode
  (``TO_END``, ``SM`` batches, ``max_seq_len`` 256) and its DataLoader over every batch.

Each side runs in fresh processes; peak RSS is the largest of the process and its children
(``RUSAGE_CHILDREN``). Prints one JSON line per side and the ratios.
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

MMCLIN = r'''
import json, resource, sys, time
t0 = time.perf_counter()
import polars as pl, torch
from mmclin.datasets.meds import read_meds
from mmclin.training.data import IndexBatches, featurize, fit_featurizers
root, store, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = read_meds(root, root + "/labels.parquet", store=store, max_events=256)
train = c.frame.filter(pl.col("split") == "train")
t_build = time.perf_counter() - t0
spec = [s for s in c.modalities if s.kind == "irregular_series"]
f = fit_featurizers(train, spec)
table = featurize(train, f)
n = 0
for idx in IndexBatches(len(table), batch, shuffle=False):
    b = table.batch(idx)
    n += int(b.inputs["events"]["mask"].sum())
print(json.dumps({"seconds": time.perf_counter() - t0, "build_s": t_build, "samples": len(table), "measurements": n,
                  "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
'''

MTD = r'''
import json, resource, sys, time
from pathlib import Path
t0 = time.perf_counter()
from meds_torchdata import MEDSPytorchDataset, MEDSTorchDataConfig
out, labels, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = MEDSTorchDataConfig(tensorized_cohort_dir=out, max_seq_len=256, task_labels_dir=labels, batch_mode="SM",
                          seq_sampling_strategy="to_end", static_inclusion_mode="omit")
ds = MEDSPytorchDataset(cfg, split="train")
n = 0
for b in ds.get_dataloader(batch_size=batch, shuffle=False):
    n += int((b.code != 0).sum())
print(json.dumps({"seconds": time.perf_counter() - t0, "samples": len(ds), "measurements": n,
                  "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
'''


def _run(cmd: list[str], env: dict | None = None) -> tuple[float, str, float]:
    """(seconds, stdout, peak RSS GiB of the children so far)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{cmd[:3]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0, proc.stdout, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root")
    ap.add_argument("--mtd-venv", default="/tmp/mtd-venv")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--side", choices=["both", "mmclin", "mtd"], default="both")
    a = ap.parse_args()
    root = Path(a.root).resolve()
    work = root.parent / f"{root.name}_side_by_side"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    if a.side in ("both", "mmclin"):  # each side in its own child of a fresh driver, so RUSAGE_CHILDREN is its own
        env = {**os.environ, "PYTHONPATH": f"{HERE.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        secs, out, _ = _run([sys.executable, __file__, str(root), "--side", "_mmclin"], env)
        print(out.strip().splitlines()[-1], flush=True)
    if a.side in ("both", "mtd"):
        secs, out, _ = _run([sys.executable, __file__, str(root), "--side", "_mtd", "--mtd-venv", a.mtd_venv])
        print(out.strip().splitlines()[-1], flush=True)


def _side(root: Path, side: str, venv: str, batch: int) -> dict:
    work = root.parent / f"{root.name}_side_by_side"
    if side == "_mmclin":
        env = {**os.environ, "PYTHONPATH": f"{HERE.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        secs, out, rss = _run([sys.executable, "-c", MMCLIN, str(root), str(work / "stores"), str(batch)], env)
        got = json.loads(out.strip().splitlines()[-1])
        return {"side": "mmclin", "seconds": secs, "rss_gib": rss, **{k: got[k] for k in ("samples", "measurements")},
                "store_build_s": got["build_s"]}
    bin_ = Path(venv) / "bin"
    env = {**os.environ, "PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    out_dir = work / "mtd"
    labels = work / "labels"
    labels.mkdir(exist_ok=True)
    shutil.copy(root / "labels.parquet", labels / "labels.parquet")
    pre_s, _, pre_rss = _run([str(bin_ / "MTD_preprocess"), f"MEDS_dataset_dir={root}", f"output_dir={out_dir}"], env)
    secs, out, rss = _run([str(bin_ / "python"), "-c", MTD, str(out_dir), str(labels), str(batch)], env)
    got = json.loads(out.strip().splitlines()[-1])
    return {"side": "meds-torch-data", "seconds": pre_s + secs, "rss_gib": max(pre_rss, rss),
            "preprocess_s": pre_s, "preprocess_rss_gib": pre_rss, "dataset_s": secs,
            **{k: got[k] for k in ("samples", "measurements")}}


if __name__ == "__main__":
    if "--side" in sys.argv and sys.argv[sys.argv.index("--side") + 1].startswith("_"):
        ap = argparse.ArgumentParser()
        ap.add_argument("root")
        ap.add_argument("--side")
        ap.add_argument("--mtd-venv", default="/tmp/mtd-venv")
        ap.add_argument("--batch", type=int, default=64)
        a = ap.parse_args()
        print(json.dumps(_side(Path(a.root).resolve(), a.side, a.mtd_venv, a.batch)))
    else:
        main()
