"""Training and inference speed side by side: mmclin vs a bare PyTorch loop over an equal plain model and the peers.

    python benchmarks/throughput.py [--rounds 5] [--contenders "bare_tensor mmclin_mlp ..."] [--tag NAME]

Runs the harness in ``benchmarks/peers/`` (its README: workload, model, contenders): every contender
in its own process, in interleaved rounds, then prints per-round ratios to ``bare_tensor`` (wall and
per CPU-second) and their medians. The bare loop trains a plain PyTorch model of the same
architecture (``peers/common.py: make_model``), not mmclin's network. widedeep and fusilli need the
peers' virtual environment (``benchmarks/peers/setup.sh``, numpy<2); without it they are left out,
said on stdout. The workload is made once (``peers/make_data.py``, 50,000 patients).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

PEERS = Path(__file__).resolve().parent / "peers"
NEEDS_PEER_VENV = ("widedeep", "fusilli")
DEFAULT = "bare_tensor mmclin_default mmclin_closest mmclin_mlp mmclin_custom lightning_batched lightning widedeep fusilli"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--contenders", default=DEFAULT)
    ap.add_argument("--tag", default="throughput")
    args = ap.parse_args()
    peer_python = PEERS / "venv" / "bin" / "python"
    contenders = args.contenders.split()
    if not peer_python.exists():
        left = [c for c in contenders if c in NEEDS_PEER_VENV]
        contenders = [c for c in contenders if c not in NEEDS_PEER_VENV]
        if left:
            print(f"left out {left}: their virtual environment is missing (run benchmarks/peers/setup.sh)")
        peer_python = Path(sys.executable)
    if not (PEERS / "data" / "clinical.parquet").exists():
        subprocess.run([sys.executable, "make_data.py"], cwd=PEERS, check=True)
    env = {**os.environ, "ROUNDS": str(args.rounds), "TAG": args.tag, "CONTENDERS": " ".join(contenders),
           "PY_PEERS": str(peer_python), "PY_MMCLIN": sys.executable}
    raw = PEERS / "results" / f"rounds_{args.tag}.jsonl"
    raw.unlink(missing_ok=True)  # this run's rounds only (the file is this script's own output)
    subprocess.run(["./rounds.sh"], cwd=PEERS, env=env, check=True)
    subprocess.run([sys.executable, "aggregate_rounds.py", str(raw)], cwd=PEERS, check=True)


if __name__ == "__main__":
    main()
