"""Per-modality encoders; importing this package registers them."""
from mmclin.encoders import genomics, tabular  # noqa: F401
from mmclin.encoders.base import Featurizer, ModalityEncoder

__all__ = ["Featurizer", "ModalityEncoder"]
