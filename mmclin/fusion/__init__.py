"""Fusion heads; importing this package registers them."""
from mmclin.fusion import concat, late  # noqa: F401
from mmclin.fusion import hetero_graph, symile  # noqa: F401
from mmclin.fusion import cascaded_transformer, sequential_modular  # noqa: F401
from mmclin.fusion.base import FusionHead

__all__ = ["FusionHead"]
