"""Peak memory and time of one forward + backward pass of each MIL encoder, by bag size.

    python benchmarks/mil_memory.py [--sizes 1000 10000 100000] [--dim 1024] [--device cpu|cuda] [--repeats 3]

Each (encoder, bag size) runs in a fresh subprocess. CPU: peak resident memory of the pass
above the process's resident memory just before it (``ru_maxrss`` high-water mark, measured
after input allocation, so it is what the pass itself adds). CUDA: ``max_memory_allocated``
above the allocation before the pass. Bags are one slide of N patches x ``dim`` features, as in
training (batch of one bag, default encoder widths). Time is the median over repeats after a warm-up.
Target: 100k-patch bags fit in 24 GiB on CPU, memory growing no worse than linearly in N.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(name: str, n: int, dim: int, device: str, repeats: int, threads: int) -> dict:
    import torch

    from mmclin.registry import ENCODERS, load_builtin_components

    torch.set_num_threads(threads)
    load_builtin_components()
    torch.manual_seed(0)
    enc = ENCODERS.get(name)(in_dim=dim).to(device).train()
    x = {"features": torch.randn(1, n, dim, device=device), "mask": torch.ones(1, n, dtype=torch.bool, device=device)}

    def step() -> None:
        enc.zero_grad(set_to_none=True)
        out = enc(x)
        out.tokens.square().mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        base = rss_mib()
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"encoder": name, "patches": n, "dim": dim, "device": device, "peak_mib": round(peak, 1),
            "input_mib": round(n * dim * 4 / 2**20, 1), "seconds": round(statistics.median(times), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--encoders", nargs="+", default=["abmil", "transmil"])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.dim, args.device, args.repeats, args.threads)))
        return
    rows = []
    print(f"{'encoder':10} {'patches':>8} {'input MiB':>10} {'peak MiB':>10} {'MiB/1k patches':>15} {'fwd+bwd s':>10}")
    for name in args.encoders:
        for n in args.sizes:
            cmd = [sys.executable, __file__, "--child", name, str(n), "--dim", str(args.dim), "--device", args.device,
                   "--repeats", str(args.repeats), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"{name:10} {n:>8} FAILED: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"{name:10} {n:>8} {r['input_mib']:>10} {r['peak_mib']:>10} {1000 * r['peak_mib'] / n:>15.1f} {r['seconds']:>10}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
