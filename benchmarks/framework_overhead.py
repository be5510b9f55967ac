"""Framework overhead and GPU utilisation: mmclin's fit vs a bare loop over *mmclin's own* network.

This isolates what the training core adds (Lightning, batching) around the same ``nn.Module``, and on a
GPU samples its utilisation; the side-by-side comparison with an independent plain model and the peer
libraries is ``benchmarks/throughput.py``.

    python benchmarks/framework_overhead.py [--subjects 50000] [--epochs 3] [--repeats 3] [--device cpu|gpu]

A synthetic 2-modality cohort (tabular 16 columns + genomics 64 genes, binary outcome) is
featurized once. mmclin trains through ``fit_model`` (the core the CLI and estimators use);
the bare loop trains an identical network (``build_member``, same seed) over the same
pre-made tensors with AdamW. Steady-state samples/s exclude the first epoch (warm-up).
Target: mmclin >= 0.9 x bare. On a GPU both use bf16/fp16 autocast and GPU utilisation is
sampled with nvidia-smi.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import threading
import time

import lightning.pytorch as L
import numpy as np
import torch

from mmclin.config import ComponentConfig, ModelConfig, TrainerConfig
from mmclin.datasets import make_synthetic_cohort
from mmclin.training.core import build_member, build_task, fit_model, resolve_accelerator
from mmclin.training.data import featurize, fit_featurizers


class EpochTimer(L.Callback):
    def __init__(self) -> None:
        self.starts, self.ends = [], []

    def on_train_epoch_start(self, trainer, module) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())

    def on_train_epoch_end(self, trainer, module) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


class GpuSampler:
    """Mean GPU utilisation from nvidia-smi while a block runs."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()

    def __enter__(self):
        def loop():
            while not self._stop.is_set():
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True)
                if out.returncode == 0:
                    self.samples.append(float(out.stdout.split()[0]))
                time.sleep(0.2)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float:
        return float(np.mean(self.samples)) if self.samples else float("nan")


def bare_loop(table, task, specs, encoder_kwargs, model_cfg, trainer_cfg, epochs, device, precision) -> float:
    torch.manual_seed(trainer_cfg.seed)
    net = build_member(specs, encoder_kwargs, model_cfg, task).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=trainer_cfg.learning_rate, weight_decay=trainer_cfg.weight_decay)
    gen = torch.Generator().manual_seed(0)
    n, bs = len(table), trainer_cfg.batch_size
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(enabled=precision == "16-mixed")
    if device != "cpu":
        table = type(table)({m: {k: t.to(device) for k, t in d.items()} for m, d in table.inputs.items()},
                            {m: p.to(device) for m, p in table.present.items()}, table.target.to(device))
    times = []
    for _ in range(epochs):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for idx in torch.randperm(n, generator=gen).split(bs):
            b = table.batch(idx.to(device))
            with torch.autocast(device_type="cuda" if device != "cpu" else "cpu", dtype=dtype, enabled=dtype is not None):
                out, _ = net(b.inputs, b.present)
                loss = task.loss(out.float(), b.target)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return n * (epochs - 1) / sum(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=50_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    cohort = make_synthetic_cohort(args.subjects, modalities={"clinical": ("tabular", 16), "genes": ("genomics", 64)},
                                   task="binary", missing={"genes": 0.3}, seed=0)
    model_cfg = ModelConfig(fusion=ComponentConfig(name="concat", d_model=64))
    trainer_cfg = TrainerConfig(max_epochs=args.epochs, batch_size=args.batch_size, val_fraction=0.0, patience=None,
                                progress_bar=False, num_threads=args.threads, device=args.device)
    task_cfg = ComponentConfig(name="binary")
    accelerator, precision = resolve_accelerator(trainer_cfg)
    device = "cuda" if accelerator == "gpu" else "cpu"
    torch.set_num_threads(args.threads)

    # the same featurized tensors for the bare loop
    featurizers = fit_featurizers(cohort.frame, cohort.modalities)
    task = build_task(task_cfg)
    y = task.check_targets(cohort.y)
    task.fit_targets(y)
    table = featurize(cohort.frame, featurizers, task.encode(y))
    encoder_kwargs = {m: f.encoder_kwargs() for m, f in featurizers.items()}

    rows = []
    for r in range(args.repeats):
        timer = EpochTimer()
        with GpuSampler() if device == "cuda" else _Null() as gpu:
            t0 = time.perf_counter()
            fit_model(cohort.frame, cohort.y, cohort.modalities, model_cfg, trainer_cfg, task_cfg, extra_callbacks=[timer])
            wall = time.perf_counter() - t0
        epoch_times = [e - s for s, e in zip(timer.starts, timer.ends)]
        mm = args.subjects * (args.epochs - 1) / sum(epoch_times[1:])
        with GpuSampler() if device == "cuda" else _Null() as gpu_bare:
            bare = bare_loop(table, task, cohort.modalities, encoder_kwargs, model_cfg, trainer_cfg, args.epochs, device, precision)
        rows.append((mm, bare, mm / bare, wall, getattr(gpu, "mean", float("nan")), getattr(gpu_bare, "mean", float("nan"))))
        print(f"repeat {r}: mmclin {mm:,.0f} samples/s, bare loop {bare:,.0f} samples/s, ratio {mm / bare:.3f} "
              f"(mmclin fit wall {wall:.1f}s incl. featurizing)" + (f", GPU util {rows[-1][4]:.0f}% vs {rows[-1][5]:.0f}%" if device == "cuda" else ""), flush=True)
    ratio = statistics.median(r[2] for r in rows)
    print(f"\n{args.subjects} subjects, batch {args.batch_size}, {accelerator} {precision}, {args.threads} thread(s)")
    print(f"median mmclin {statistics.median(r[0] for r in rows):,.0f} samples/s | bare {statistics.median(r[1] for r in rows):,.0f} samples/s "
          f"| ratio {ratio:.3f} (target >= 0.9: {'MET' if ratio >= 0.9 else 'NOT MET'})")


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
