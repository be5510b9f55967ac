"""Start-up does no waste: what a user's first import and a config error load (timed in benchmarks/startup.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "sklearn", "scipy", "lightning", "mlflow", "optuna", "pandas", "captum")


def _loaded_after(code: str) -> set[str]:
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


@pytest.mark.parametrize("code", [
    "from mmclin import MultimodalClassifier, MultimodalSurvivalModel, ModalitySpec",
    "import mmclin.interfaces.cli",
])
def test_first_import_loads_no_heavy_library(code):
    heavy = _loaded_after(code) & set(HEAVY)
    assert not heavy, f"{code!r} imports {sorted(heavy)} at start-up; import them where they are used"


def test_estimator_import_loads_neither_numpy_nor_polars():
    """numpy and polars are half a second of the first import on a busy machine (0.55 s without them, 1.3 s with)."""
    loaded = _loaded_after("from mmclin import MultimodalClassifier, MultimodalSurvivalModel, ModalitySpec")
    assert not loaded & {"numpy", "polars"}, sorted(loaded & {"numpy", "polars"})


def test_a_config_error_is_found_without_the_heavy_libraries(tmp_path):
    """A typo in a component name is reported by the config check alone, before torch is imported."""
    code = ("from mmclin.config import ConfigError, load_config\n"
            "try:\n    load_config('experiments/gse7390_survival.yaml', ['model.fusion.name=concatt'])\n"
            "except ConfigError as err:\n    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code + "import sys; print(sorted(m for m in ('torch', 'sklearn') if m in sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    assert "Did you mean 'concat'?" in out and out.strip().endswith("[]")


def test_the_builtin_names_match_the_registries():
    from mmclin.registry import BUILTIN_NAMES, FUSIONS, TASKS, load_builtin_components

    load_builtin_components()
    assert {FUSIONS.kind: tuple(FUSIONS.names()), TASKS.kind: tuple(TASKS.names())} == BUILTIN_NAMES


def test_estimators_keep_the_sklearn_contract():
    """Without BaseEstimator: clone, nested params, tags and the not-fitted error behave as scikit-learn's."""
    from sklearn.base import clone, is_classifier, is_regressor
    from sklearn.exceptions import NotFittedError

    from mmclin import MultimodalClassifier, MultimodalRegressor, MultimodalSurvivalModel

    clf = MultimodalClassifier(fusion="late", max_epochs=3)
    assert is_classifier(clf) and not is_regressor(clf) and is_regressor(MultimodalRegressor())
    assert not is_classifier(MultimodalSurvivalModel())
    twin = clone(clf.set_params(fusion__d_model=8))
    assert twin is not clf and twin.get_params()["fusion__d_model"] == 8 and twin.max_epochs == 3
    assert repr(clf) == "MultimodalClassifier(fusion='late', fusion_options={'d_model': 8}, max_epochs=3)"
    with pytest.raises(ValueError, match="Invalid parameter 'max_epoch' for estimator MultimodalClassifier"):
        clf.set_params(max_epoch=2)
    with pytest.raises(NotFittedError, match="This MultimodalClassifier instance is not fitted yet"):
        clf.predict(None)


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_algorithms_only_when_asked(deterministic):
    """trainer.deterministic turns torch's deterministic algorithms on for the fit; they are not on silently."""
    import lightning.pytorch as L
    import torch

    from mmclin import make_synthetic_cohort
    from mmclin.config import ComponentConfig, ModelConfig, TrainerConfig
    from mmclin.training.core import fit_model

    seen = []

    class Probe(L.Callback):
        def on_train_batch_start(self, *args):
            seen.append(torch.are_deterministic_algorithms_enabled())

    c = make_synthetic_cohort(n_subjects=60, seed=0)
    fit_model(c.frame, c.y, c.modalities, ModelConfig(), TrainerConfig(max_epochs=1, deterministic=deterministic,
              progress_bar=False), ComponentConfig(name="binary"), extra_callbacks=[Probe()])
    assert seen and set(seen) == {deterministic}


def test_binary_fit_runs_no_inference_over_the_training_rows(monkeypatch):
    """calibrate does nothing for a binary task, so fit_model does not predict the training rows for it; cox does."""
    from mmclin import load_cohort, make_synthetic_cohort
    from mmclin.config import ComponentConfig, ModelConfig, TrainerConfig
    from mmclin.training.core import FittedModel, fit_model

    calls = []
    original = FittedModel.outputs_from_table
    monkeypatch.setattr(FittedModel, "outputs_from_table", lambda self, table, *a, **k: calls.append(len(table)) or original(self, table, *a, **k))
    trainer = TrainerConfig(max_epochs=1, progress_bar=False)
    c = make_synthetic_cohort(n_subjects=60, seed=0)
    fit_model(c.frame, c.y, c.modalities, ModelConfig(), trainer, ComponentConfig(name="binary"))
    assert calls == []
    s = load_cohort("gse7390")
    fitted = fit_model(s.frame, s.y, s.modalities, ModelConfig(), trainer, ComponentConfig(name="cox"))
    assert calls == [s.frame.height] and fitted.task.survival_function(fitted.predict_outputs(s.frame[:2]))[1].shape[0] == 2


def test_a_missing_config_from_the_cli_loads_neither_numpy_nor_polars(tmp_path):
    """The CLI's answer to a config that is not there comes before numpy, polars and torch load (0.5 s, not 1.3)."""
    code = ("import sys\nfrom mmclin.interfaces.cli import main\n"
            f"rc = main(['fit', {str(tmp_path / 'missing.yaml')!r}])\n"
            "print(rc, sorted(m for m in ('numpy', 'polars', 'torch') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "2 []", done.stdout
    assert "missing.yaml" in done.stderr
