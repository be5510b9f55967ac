"""Start-up: the first import, a CLI user error, and the time to the quick start's first training step.

    python benchmarks/startup.py [--repeats 5]

Each measurement is a fresh interpreter (median wall seconds of ``--repeats``). Targets (issue 18):
``from mmclin import MultimodalClassifier`` < 1 s, a CLI user error < 1 s. The quick start's path to
its first step is split into phases so that waste shows where it is.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICK_START = ROOT / "experiments" / "gse7390_survival.yaml"

FIRST_STEP = r'''
import json, time
t0 = time.perf_counter(); marks = {}
from mmclin.config import load_config
from mmclin.interfaces.experiment import Experiment
marks["import"] = time.perf_counter() - t0
cfg = load_config(CONFIG, ["tracking.enabled=false"])
marks["config"] = time.perf_counter() - t0
exp = Experiment(cfg); exp.cohort
marks["cohort"] = time.perf_counter() - t0
import lightning.pytorch as L
import mmclin.training.core as core
marks["training imports"] = time.perf_counter() - t0

class Stop(Exception):
    pass

class FirstStep(L.Callback):
    def on_train_batch_start(self, *a):
        marks["first training step"] = time.perf_counter() - t0
        raise Stop

fit = core.fit_model
core.fit_model = lambda *a, **k: fit(*a, **{**k, "extra_callbacks": [*(k.get("extra_callbacks") or []), FirstStep()]})
try:
    exp.evaluate(cv=5)
except Stop:
    pass
print(json.dumps(marks))
'''


def wall(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    n = ap.parse_args().repeats
    cli = [sys.executable, "-m", "mmclin.interfaces.cli"]
    rows = {
        "from mmclin import MultimodalClassifier": wall([sys.executable, "-c", "from mmclin import MultimodalClassifier"], n),
        "mmclin --help": wall([*cli, "--help"], n),
        "mmclin fit missing.yaml (user error)": wall([*cli, "fit", "missing.yaml"], n),
        "mmclin fit CONFIG --set model.fusion.name=concatt (user error)":
            wall([*cli, "fit", str(QUICK_START), "--set", "model.fusion.name=concatt"], n),
    }
    for name, seconds in rows.items():
        print(f"{seconds:6.2f} s  {name}")
    phases = []
    for _ in range(n):
        out = subprocess.run([sys.executable, "-c", FIRST_STEP.replace("CONFIG", repr(str(QUICK_START)))],
                             capture_output=True, text=True, cwd=ROOT, check=True).stdout
        phases.append(json.loads(out.strip().splitlines()[-1]))
    print("quick start, seconds from interpreter start (median):")
    for key in phases[0]:
        print(f"  {statistics.median(p[key] for p in phases):6.2f} s  {key}")


if __name__ == "__main__":
    main()
