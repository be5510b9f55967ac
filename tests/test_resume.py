"""Crashes lose nothing: a fit killed with SIGKILL halfway and resumed with ``--resume`` ends
exactly as the uninterrupted fit (CPU, same seed), in the same MLflow run, with no partial files."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as L
import mlflow
import numpy as np
import polars as pl
import pytest
import torch
import yaml

from mmclin.config import ComponentConfig, ModelConfig, TrainerConfig
from mmclin.datasets import make_synthetic_cohort
from mmclin.persistence.outputs import run_directories
from mmclin.training.checkpoints import CheckpointStore
from mmclin.training.core import checkpoint_store, fit_model

EPOCHS = 12


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    c = make_synthetic_cohort(1200, task="binary", missing={"genes": 0.3}, seed=3)
    c.frame.with_columns(pl.Series("label", c.y)).write_parquet(tmp / "cohort.parquet")
    raw = {"name": "resumable", "data": {"path": str(tmp / "cohort.parquet"), "id_column": c.id_column,
                                         "target": ["label"], "modalities": [m.model_dump() for m in c.modalities]},
           "model": {"task": {"name": "binary"}, "ensemble_size": 2, "modality_dropout": 0.3,
                     "fusion": {"name": "concat", "dropout": 0.2}},
           # no early stopping: every run trains EPOCHS epochs per member, so "halfway" is well defined
           "trainer": {"max_epochs": EPOCHS, "batch_size": 16, "patience": None, "progress_bar": False},
           "tracking": {"uri": f"sqlite:///{tmp / 'mlruns.db'}", "experiment": "resume", "log_model": False}}
    path = tmp / "resumable.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _fit(config, out, *extra):
    args = [sys.executable, "-m", "mmclin.interfaces.cli", "fit", str(config), "--output-dir", str(out), *extra]
    return subprocess.Popen(args, cwd=config.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finished(proc):
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return stdout


def _run_of(stdout):
    return next(line.split()[2] for line in stdout.splitlines() if line.startswith("MLflow run "))


@pytest.fixture(scope="module")
def uninterrupted(config_file):
    out = config_file.parent / "uninterrupted"
    stdout = _finished(_fit(config_file, out))
    client = mlflow.MlflowClient(yaml.safe_load(config_file.read_text())["tracking"]["uri"])
    return run_directories(out / "resumable")[-1], client.get_run(_run_of(stdout)).data.metrics


def _run_dir(out: Path, proc, timeout=120) -> Path:
    """The run directory the fit made under ``out/<name>`` (each fit makes its own)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = run_directories(out / "resumable")
        if found:
            return found[-1]
        assert proc.poll() is None, "the fit ended before making its run directory"
        time.sleep(0.01)
    pytest.fail(f"no run directory under {out}")


def _wait_for_epoch(member_dir: Path, epoch: int, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the fit ended before it could be killed halfway"
        try:
            if json.loads((member_dir / "last.json").read_text())["epoch"] >= epoch:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.01)
    pytest.fail(f"no checkpoint of epoch {epoch} in {member_dir}")


@pytest.mark.slow
def test_sigkill_halfway_then_resume_equals_uninterrupted(config_file, uninterrupted):
    ref_dir, ref_metrics = uninterrupted
    out = config_file.parent / "killed"
    proc = _fit(config_file, out)
    run_dir = _run_dir(out, proc)
    # member 0 has finished and member 1 is halfway: both ways of resuming are exercised
    _wait_for_epoch(run_dir / "checkpoints" / "member1", EPOCHS // 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "member0" / "final.safetensors").exists() and (checkpoints / "member1" / "last.ckpt").exists()
    assert not (run_dir / "model").exists()
    killed_run = json.loads((checkpoints / "store.json").read_text())["mlflow_run_id"]
    (run_dir / ".test_predictions.parquet.k1ll3d").write_bytes(b"PAR1 half a file")  # a kill mid-write

    stdout = _finished(_fit(config_file, out, "--resume"))
    assert _run_of(stdout) == killed_run  # the same MLflow run, continued
    assert run_directories(out / "resumable") == [run_dir]  # resumed in place, no new run directory
    client = mlflow.MlflowClient(yaml.safe_load(config_file.read_text())["tracking"]["uri"])
    run = client.get_run(killed_run)
    assert run.info.status == "FINISHED" and run.data.tags["mmclin.resumed"] == "true"
    test_metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("test_")}
    assert test_metrics and test_metrics == {k: ref_metrics[k] for k in test_metrics}
    ref_preds = pl.read_parquet(ref_dir / "test_predictions.parquet")
    assert pl.read_parquet(run_dir / "test_predictions.parquet").equals(ref_preds)
    ref_meta = json.loads((ref_dir / "model" / "mmclin.json").read_text())
    meta = json.loads((run_dir / "model" / "mmclin.json").read_text())
    assert meta["history"] == ref_meta["history"] and len(meta["history"]) == 2 * EPOCHS
    # nothing partial or temporary is left: checkpoints are gone once the model is saved
    left = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    assert left == ["mmclin-run.json", "model/manifest.json", "model/mmclin.json", "model/model.safetensors",
                    "test_predictions.parquet"], left
    assert json.loads((run_dir / "mmclin-run.json").read_text())["status"] == "finished"


SMALL = dict(model=ModelConfig(fusion={"name": "concat", "dropout": 0.2}, ensemble_size=2, modality_dropout=0.3),
             trainer=TrainerConfig(max_epochs=5, batch_size=32, patience=2, progress_bar=False),
             task=ComponentConfig(name="binary"))


@pytest.fixture(scope="module")
def small():
    c = make_synthetic_cohort(240, task="binary", seed=1)
    return c, fit_model(c.frame, c.y, c.modalities, **SMALL)


class _Crash(L.Callback):
    """Raises in member ``member`` at ``hook`` of epoch ``epoch``, as a crash there would."""

    def __init__(self, hook, member, epoch=None):
        self.hook, self.member, self.epoch = hook, member, epoch

    def _maybe(self, trainer, module):
        if module.seed == self.member and (self.epoch is None or trainer.current_epoch == self.epoch):
            raise RuntimeError("crash")

    def on_train_epoch_end(self, trainer, module):
        if self.hook == "epoch_end":
            self._maybe(trainer, module)

    def on_fit_end(self, trainer, module):  # after the last epoch's checkpoint, before the member is saved
        if self.hook == "fit_end":
            self._maybe(trainer, module)


@pytest.mark.parametrize("crash", [_Crash("epoch_end", 0, 1), _Crash("fit_end", 1)], ids=["member0-epoch1", "after-last-epoch"])
def test_resume_in_process_matches(tmp_path, small, crash):
    c, ref = small
    store = checkpoint_store(tmp_path / "ck", c.frame, c.y, c.modalities, resume=False, **SMALL)
    with pytest.raises(RuntimeError, match="crash"):
        fit_model(c.frame, c.y, c.modalities, checkpoints=store, extra_callbacks=[crash], **SMALL)
    (tmp_path / "ck" / "member0" / ".last.ckpt.x.tmp").write_bytes(b"half a checkpoint")  # a write killed midway
    store = checkpoint_store(tmp_path / "ck", c.frame, c.y, c.modalities, resume=True, **SMALL)
    assert not list((tmp_path / "ck").rglob(".*"))
    resumed = fit_model(c.frame, c.y, c.modalities, checkpoints=store, **SMALL)
    assert resumed.history == ref.history
    np.testing.assert_array_equal(resumed.predict_outputs(c.frame), ref.predict_outputs(c.frame))


def test_resume_refuses_checkpoints_of_other_inputs(tmp_path, small):
    c, _ = small
    checkpoint_store(tmp_path / "ck", c.frame, c.y, c.modalities, resume=False, **SMALL)
    other = {**SMALL, "trainer": SMALL["trainer"].model_copy(update={"learning_rate": 0.01})}
    with pytest.raises(ValueError, match="different config or different data"):
        checkpoint_store(tmp_path / "ck", c.frame, c.y, c.modalities, resume=True, **other)
    with pytest.raises(ValueError, match="different config or different data"):
        checkpoint_store(tmp_path / "ck", c.frame[:-1], c.y[:-1], c.modalities, resume=True, **SMALL)
    # without --resume, old checkpoints are replaced (said at WARNING), never mixed in
    store = checkpoint_store(tmp_path / "ck", c.frame, c.y, c.modalities, resume=False, **other)
    assert isinstance(store, CheckpointStore) and [p.name for p in (tmp_path / "ck").iterdir()] == ["store.json"]


def test_checkpoint_that_is_a_pickle_is_refused(tmp_path, small):
    c, _ = small
    store = checkpoint_store(tmp_path / "ck", c.frame, c.y, c.modalities, resume=False, **SMALL)
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / "ck" / "member0").mkdir()
    (tmp_path / "ck" / "member0" / "last.ckpt").write_bytes(pickle.dumps({"x": Evil()}))
    store = checkpoint_store(tmp_path / "ck", c.frame, c.y, c.modalities, resume=True, **SMALL)
    with pytest.raises(ValueError, match="cannot be read safely"):
        fit_model(c.frame, c.y, c.modalities, checkpoints=store, **SMALL)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_fingerprint_of_text_labels_is_the_same_in_another_process():
    """Text labels come as object arrays; their hash must not depend on memory addresses."""
    import subprocess

    code = ("import numpy as np, polars as pl; from mmclin.training.checkpoints import training_fingerprint; "
            "y = np.array(['yes', 'no', 'yes'], dtype=object); "
            "print(training_fingerprint(pl.DataFrame({'a': [1, 2, 3]}), y, {'k': 1}))")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(2)}
    assert len(runs) == 1


def test_estimator_fit_resumes_from_its_checkpoint_dir(tmp_path, boring_binary):
    from mmclin import MultimodalClassifier

    c = boring_binary
    params = dict(modalities=c.modalities, max_epochs=4, batch_size=32, patience=None, num_threads=1, random_state=0)
    ref = MultimodalClassifier(**params).fit(c.frame, c.y)
    with pytest.raises(RuntimeError, match="crash"):
        fit_model(c.frame, c.y, c.modalities, *MultimodalClassifier(**params)._configs(c.y),
                  checkpoints=checkpoint_store(tmp_path / "ck", c.frame, c.y, c.modalities,
                                               *MultimodalClassifier(**params)._configs(c.y), resume=False),
                  extra_callbacks=[_Crash("epoch_end", 0, 2)])
    assert (tmp_path / "ck" / "member0" / "last.ckpt").exists()
    resumed = MultimodalClassifier(**params).fit(c.frame, c.y, checkpoint_dir=tmp_path / "ck", resume=True)
    np.testing.assert_array_equal(resumed.predict_proba(c.frame), ref.predict_proba(c.frame))
    assert resumed.history_ == ref.history_ and not (tmp_path / "ck").exists()
    with pytest.raises(ValueError, match="resume=True needs the checkpoint_dir"):
        MultimodalClassifier(**params).fit(c.frame, c.y, resume=True)


def _head_config(name: str) -> dict:
    from mmclin.registry import FUSIONS

    cls = FUSIONS.get(name)
    options = dict(getattr(cls, "example_options", lambda: {})())
    return dict(model=ModelConfig(fusion={"name": name, **options}, ensemble_size=2, modality_dropout=0.3),
                trainer=TrainerConfig(max_epochs=4, batch_size=32, patience=None, progress_bar=False),
                task=ComponentConfig(name="binary"))


def _registered_heads() -> list[str]:
    from mmclin.registry import FUSIONS, load_builtin_components

    load_builtin_components()
    return FUSIONS.names()


@pytest.mark.slow
@pytest.mark.parametrize("head", _registered_heads())
def test_resume_is_exact_for_every_registered_head(tmp_path, head):
    """Crash in member 1 at epoch 2, resume: history and predictions equal the uninterrupted fit's
    (the symile head's negative sampling included: its generator is seeded per member and checkpointed)."""
    # three modalities: with two, Symile is CLIP and draws no negatives, so the generator would not be exercised
    c = make_synthetic_cohort(160, {"clinical": ("tabular", 6), "genes": ("genomics", 12), "labs": ("tabular", 4)},
                              task="binary", seed=2)
    assert_resume_is_exact(tmp_path, c, _head_config(head), _Crash("epoch_end", 1, 2))


def assert_resume_is_exact(tmp_path, c, cfg: dict, crash: "_Crash"):
    """Fit uninterrupted; fit again, crashing as ``crash`` says; resume: the resumed fit's history and predictions
    equal the uninterrupted one's. Returns the uninterrupted fit."""
    ref = fit_model(c.frame, c.y, c.modalities, **cfg)
    store = checkpoint_store(tmp_path / "ck", c.frame, c.y, c.modalities, resume=False, **cfg)
    with pytest.raises(RuntimeError, match="crash"):
        fit_model(c.frame, c.y, c.modalities, checkpoints=store, extra_callbacks=[crash], **cfg)
    store = checkpoint_store(tmp_path / "ck", c.frame, c.y, c.modalities, resume=True, **cfg)
    resumed = fit_model(c.frame, c.y, c.modalities, checkpoints=store, **cfg)
    assert resumed.history == ref.history
    np.testing.assert_array_equal(resumed.predict_outputs(c.frame), ref.predict_outputs(c.frame))
    return ref


def test_members_draw_different_symile_negatives():
    from mmclin.training.module import MultimodalModule, network_generators
    from mmclin.training.core import build_member, build_task
    from mmclin.training.data import fit_featurizers

    c = make_synthetic_cohort(40, task="binary", seed=0)
    feats = fit_featurizers(c.frame, c.modalities)
    task = build_task(ComponentConfig(name="binary"))
    model = ModelConfig(fusion={"name": "symile", "d_model": 8, "dim": 4})
    kwargs = {m: f.encoder_kwargs() for m, f in feats.items()}
    draws = []
    for seed in (0, 1):
        module = MultimodalModule(build_member(c.modalities, kwargs, model, task), task, seed=seed)
        gen, = network_generators(module.net).values()
        draws.append(torch.randperm(20, generator=gen).tolist())
    assert draws[0] != draws[1]
