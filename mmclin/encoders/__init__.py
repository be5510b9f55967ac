"""Per-modality encoders; importing this package registers them."""
from mmclin.encoders import genomics, genomics_mlp, tabular, tabular_mlp  # noqa: F401
from mmclin.encoders import irregular_series, mtand, notes, notes_hf, utde  # noqa: F401
from mmclin.encoders import slide_mil  # noqa: F401
from mmclin.encoders import image  # noqa: F401
from mmclin.encoders.base import Featurizer, ModalityEncoder

__all__ = ["Featurizer", "ModalityEncoder"]
