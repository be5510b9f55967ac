"""Fusion heads; importing this package registers them."""
from mmclin.fusion import concat, late  # noqa: F401
from mmclin.fusion.base import FusionHead

__all__ = ["FusionHead"]
