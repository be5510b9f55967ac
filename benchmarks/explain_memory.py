"""Peak memory of explain vs predict at the same batch size (CPU, resident set size).

    python benchmarks/explain_memory.py [--subjects 1024] [--clinical 128] [--genes 1000] [--d-model 128]
                                        [--batch-size 128 512] [--repeats 3]

Each measurement runs in a fresh process: build an untrained model on a synthetic cohort
(``--clinical`` tabular columns, one token each through a transformer layer, so activations
dominate; ``--genes`` genes), then reset the kernel's peak-RSS mark
(``/proc/self/clear_refs``) and run one of: ``predict`` (``FittedModel.predict_outputs``),
``modality`` (exact Shapley values), ``ig_compute`` (the Integrated Gradients passes alone,
results dropped) or ``feature`` (IG with its tidy frame, one row per subject and feature). Reported: peak RSS above the RSS right before the call, its ratio to predict, and
the size of the returned frames (N x F rows: the part that grows with the output, not the
computation).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r'''
import gc, json, sys, time, torch
torch.set_num_threads(1)
from mmclin.datasets import make_synthetic_cohort
from mmclin.explain.checks import untrained_model
n, clinical, genes, d, bs = (int(a) for a in sys.argv[1:6])
mode = sys.argv[6]
c = make_synthetic_cohort(n_subjects=n, modalities={"clinical": ("tabular", clinical), "genes": ("genomics", genes)},
                          task="regression", missing={"genes": 0.2}, seed=0)
fitted = untrained_model(c, "concat", fusion_options={"d_model": d},
                         encoder_options={"clinical": {"d_model": d}, "genes": {"d_model": d}})
frame = c.frame
def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
fitted.predict_outputs(frame.head(8))  # warm up lazy imports and allocator
if mode != "predict":
    from mmclin.explain import explain
    explain(fitted, frame.head(8), levels=("modality", "feature"), n_steps=2)
gc.collect()
open("/proc/self/clear_refs", "w").write("5")
rss0 = kb("VmRSS:")
t = time.perf_counter()
result_mb = 0.0
if mode == "predict":
    fitted.predict_outputs(frame, batch_size=bs)
elif mode == "ig_compute":  # the gradient passes alone, results dropped batch by batch
    import numpy as np
    from mmclin.explain.features import integrated_gradients
    from mmclin.explain.targets import resolve_target
    table = fitted.table(frame)
    tgt = resolve_target(fitted.task, fitted.outputs_from_table(table, bs))
    for start in range(0, len(table), bs):
        rows = np.arange(start, min(start + bs, len(table)))
        b = table.batch(torch.as_tensor(rows))
        integrated_gradients(fitted.net, b.inputs, b.present, tgt, rows, 50, levels=("feature",))
else:
    levels = {"modality": ("modality",), "feature": ("feature",)}[mode]
    expl = explain(fitted, frame, levels=levels, batch_size=bs)
    result_mb = sum(f.estimated_size("mb") for f in expl.frames().values())
print(json.dumps({"peak_mb": (kb("VmHWM:") - rss0) / 1024, "seconds": time.perf_counter() - t, "result_mb": result_mb}))
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=1024)
    ap.add_argument("--clinical", type=int, default=128)
    ap.add_argument("--genes", type=int, default=1000)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"{args.subjects} subjects, {args.clinical} clinical columns (one token each, a transformer layer) + "
          f"{args.genes} genes, width {args.d_model}, untrained concat model; median of {args.repeats} fresh processes")
    for bs in args.batch_size:
        base = None
        for mode in ("predict", "modality", "ig_compute", "feature"):
            runs = []
            for _ in range(args.repeats):
                cmd = [str(v) for v in (args.subjects, args.clinical, args.genes, args.d_model, bs)]
                out = subprocess.run([sys.executable, "-c", CHILD, *cmd, mode],
                                     capture_output=True, text=True, check=True)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            peak = sorted(r["peak_mb"] for r in runs)[len(runs) // 2]
            secs = sorted(r["seconds"] for r in runs)[len(runs) // 2]
            result = sorted(r["result_mb"] for r in runs)[len(runs) // 2]
            base = peak if mode == "predict" else base
            print(f"batch {bs:>5}  {mode:<10} peak +{peak:8.1f} MB  ({peak / base:4.1f}x predict)  {secs:6.2f} s"
                  + (f"  result frames {result:7.1f} MB" if result else ""))


if __name__ == "__main__":
    main()
