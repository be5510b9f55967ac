"""Training core: featurize, build, train with Lightning, persist."""
from mmclin.training.core import FittedModel, build_net, build_task, fit_model
from mmclin.training.dropout import modality_dropout

__all__ = ["FittedModel", "build_net", "build_task", "fit_model", "modality_dropout"]
