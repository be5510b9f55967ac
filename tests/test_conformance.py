"""Every registered encoder and fusion head passes the shared checks (see mmclin.testing)."""
import pytest

from conftest import encoder_params
from mmclin.registry import ENCODERS, FUSIONS, load_builtin_components
from mmclin.testing.conformance import ENCODER_CHECKS, FUSION_CHECKS

load_builtin_components()


@pytest.mark.parametrize("check", ENCODER_CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", encoder_params(ENCODERS.names()))  # notes_hf: skipped without transformers
def test_encoder_conformance(name, check):
    for module in getattr(ENCODERS.get(name), "requires", ()):
        pytest.importorskip(module)  # an optional extra (e.g. transformers for notes_hf): skipped only when not installed
    check(name)


@pytest.mark.parametrize("check", FUSION_CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", FUSIONS.names())
def test_fusion_conformance(name, check):
    check(name)
