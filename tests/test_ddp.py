"""DDP: the training loader shards rows across ranks, and two CPU processes (gloo, launched
by torchrun) train the same model as one process at twice the batch size."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mmclin.interfaces.cli import main
from mmclin.persistence.outputs import newest_finished_model, run_directories
from mmclin.training.data import IndexBatches
from mmclin.training.distributed import env_global_rank, n_shard_batches, shard_batches


def _epochs(sampler, n_epochs):
    return [[b.tolist() for b in sampler] for _ in range(n_epochs)]


@pytest.mark.parametrize("n,batch,world,drop_last", [(100, 16, 2, False), (10, 256, 2, False), (37, 8, 3, False),
                                                     (37, 8, 3, True), (5, 4, 2, False)])
def test_ranks_get_disjoint_shards_with_equal_step_counts(n, batch, world, drop_last):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    per_rank = [list(shard_batches(order, batch, r, world, drop_last)) for r in range(world)]
    counts = {len(b) for b in per_rank}
    assert counts == {n_shard_batches(n, batch, world, drop_last)}  # same number of steps: no DDP hang
    rows = [i for b in per_rank for t in b for i in t.tolist()]
    assert len(rows) == len(set(rows))  # no row on two ranks, none twice
    assert all(1 < len(t) <= batch for b in per_rank for t in b)  # never a 1-row batch (Cox risk sets)
    if not drop_last and n >= 2 * world:
        assert len(rows) >= n - world + 1  # at most a tail smaller than one row per rank is left out
    for s in range(len(per_rank[0])):  # a step's union is one contiguous slice of the permutation
        union = sorted(i for r in range(world) for i in per_rank[r][s].tolist())
        start = s * batch * world
        assert union == sorted(order[start:start + len(union)].tolist())


def test_sampler_is_unchanged_alone_and_reshuffles_every_epoch():
    plain, sharded = IndexBatches(50, 8, True, seed=3), IndexBatches(50, 8, True, seed=3, shard=True)
    a, b = _epochs(plain, 3), _epochs(sharded, 3)
    assert a == b and len(sharded) == len(plain) == 7  # without a process group, shard=True changes nothing
    assert a[0] != a[1] and sorted(sum(a[0], [])) == list(range(50))


def test_why_lightnings_sampler_replacement_is_switched_off():
    """Lightning's DistributedSamplerWrapper deals out whole batches and pads by repeating:
    with one whole-cohort batch (the Cox default) both ranks would train on the same rows."""
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    got = [[b.tolist() for b in DistributedSamplerWrapper(IndexBatches(10, 256, True, seed=0), num_replicas=2, rank=r,
                                                          shuffle=True)] for r in range(2)]  # one sampler per rank, one seed
    assert got[0] == got[1]  # the same batch on both ranks
    ours = [[b.tolist() for b in shard_batches(torch.arange(10), 256, r, 2)] for r in range(2)]
    assert not set(ours[0][0]) & set(ours[1][0])


def test_rank_from_launcher_environment(monkeypatch):
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert env_global_rank() == 0
    monkeypatch.setenv("LOCAL_RANK", "1")  # Lightning's own launcher, second process
    assert env_global_rank() != 0
    monkeypatch.setenv("SLURM_PROCID", "0")  # srun tells the global rank
    assert env_global_rank() == 0
    monkeypatch.setenv("RANK", "3")  # torchrun
    assert env_global_rank() == 3


@pytest.mark.slow
def test_torchrun_two_cpu_processes_match_one_process(tmp_path, monkeypatch):
    """Mean-reduced loss (regression MSE), dropout off: 2 ranks x batch 16 take the same steps
    as 1 process x batch 32, so weights, history and predictions agree to float precision."""
    from mmclin.training.core import FittedModel

    monkeypatch.chdir(tmp_path)
    # no linear path: in 4 epochs the deep path would not beat it on validation, every run would end at the linear
    # model alone, and the three runs would agree whatever the sharding (this test is about the deep path's steps)
    c = _write_regression_config(
        # no modality dropout: its per-subject draws follow each rank's shard, so they cannot equal one process's
        tmp_path, 160, {"fusion": {"name": "concat", "d_model": 16, "dropout": 0.0}, "linear_path": False,
                        "modality_dropout": 0.0,
                        "encoders": {"clinical": {"d_model": 8, "n_layers": 1, "n_heads": 2, "dropout": 0.0},
                                     "genes": {"d_model": 8, "n_layers": 1, "dropout": 0.0}}},
        {"max_epochs": 4, "batch_size": 32, "val_fraction": 0.2, "seed": 0})
    # torchrun --standalone: a free local port for the rendezvous; own session, so a hang is killed whole
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mmclin.interfaces.cli",
         "fit", "ddp.yaml", "--set", "trainer.strategy=ddp", "--set", "trainer.devices=2", "--set", "trainer.batch_size=16",
         "--output-dir", "ddp"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in 240 s: {stderr[-2000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    assert "MEMBER: 2/2" in stdout + stderr and stdout.count("held-out test") == 1  # rank 1 prints nothing
    assert main(["fit", "ddp.yaml", "--output-dir", "single32"]) == 0
    assert main(["fit", "ddp.yaml", "--set", "trainer.batch_size=16", "--output-dir", "single16"]) == 0
    models = {k: FittedModel.load(newest_finished_model(tmp_path / k / "ddp")) for k in ("ddp", "single32", "single16")}
    out = {k: m.predict_outputs(c.frame) for k, m in models.items()}
    np.testing.assert_allclose(out["ddp"], out["single32"], atol=1e-5)
    assert np.abs(out["ddp"] - out["single16"]).max() > 1e-2  # really two shards of 16, not one process of 16
    for a, b in zip(models["ddp"].history, models["single32"].history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5) and a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)


def _write_regression_config(tmp_path, n_subjects, model, trainer):
    """``ddp.yaml`` over a synthetic regression cohort written beside it; returns the cohort."""
    from mmclin.datasets import make_synthetic_cohort

    c = make_synthetic_cohort(n_subjects=n_subjects, task="regression", seed=3)
    c.frame.write_parquet(tmp_path / "cohort.parquet")
    cfg = {"name": "ddp", "data": {"path": str(tmp_path / "cohort.parquet"), "id_column": c.id_column, "target": ["target"],
                                   "modalities": [m.model_dump(mode="json") for m in c.modalities], "test_size": 0.2},
           "model": {"task": {"name": "regression"}, **model},
           "trainer": {"patience": None, "device": "cpu", "progress_bar": False, **trainer},
           "tracking": {"enabled": False}}
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(cfg))
    return c


def _descendants(pid):
    """Every process below ``pid`` (from /proc: Linux)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _torchrun(tmp_path, *args):
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mmclin.interfaces.cli",
         "fit", "ddp.yaml", "--set", "trainer.strategy=ddp", "--set", "trainer.devices=2", *args],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc, timeout=240):
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s: {stderr[-2000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    return stdout


@pytest.mark.slow
def test_torchrun_killed_halfway_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """Both ranks SIGKILLed mid-training; `--resume` (rank 1 reads rank 0's checkpoints) ends as the uninterrupted run."""
    import json
    import time

    import polars as pl

    monkeypatch.chdir(tmp_path)
    _write_regression_config(tmp_path, 2000, {"fusion": {"name": "concat", "d_model": 16, "dropout": 0.1},
                                              "modality_dropout": 0.2}, {"max_epochs": 6, "batch_size": 16})
    _finish(_torchrun(tmp_path, "--output-dir", "whole"))
    proc = _torchrun(tmp_path, "--output-dir", "killed")
    deadline = time.time() + 240
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed halfway"
        try:
            progress = run_directories(tmp_path / "killed" / "ddp")[-1] / "checkpoints" / "member0" / "last.json"
            if json.loads(progress.read_text())["epoch"] >= 2:
                break
        except (FileNotFoundError, json.JSONDecodeError, IndexError):
            pass
        time.sleep(0.01)
    for pid in [proc.pid, *_descendants(proc.pid)]:  # torchrun starts each worker in a session of its own
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.communicate()
    killed = run_directories(tmp_path / "killed" / "ddp")
    assert len(killed) == 1 and not (killed[0] / "model").exists()
    _finish(_torchrun(tmp_path, "--output-dir", "killed", "--resume"))
    assert run_directories(tmp_path / "killed" / "ddp") == killed  # resumed in place
    run_dirs = {d: run_directories(tmp_path / d / "ddp")[-1] for d in ("whole", "killed")}
    whole, resumed = (pl.read_parquet(run_dirs[d] / "test_predictions.parquet") for d in ("whole", "killed"))
    assert resumed.equals(whole)
    history = [json.loads((run_dirs[d] / "model" / "mmclin.json").read_text())["history"] for d in ("whole", "killed")]
    assert history[0] == history[1] and len(history[0]) == 6
    assert not (run_dirs["killed"] / "checkpoints").exists()
