"""Tasks: what to predict and how to score it. Importing this package registers them all."""
from mmclin.tasks import classification, multitask, regression, survival  # noqa: F401  (registration)
from mmclin.tasks.base import Task
from mmclin.tasks.classification import BinaryTask, MulticlassTask, MultilabelTask
from mmclin.tasks.multitask import MultiTask
from mmclin.tasks.regression import RegressionTask
from mmclin.tasks.survival import CoxTask, DiscreteTimeTask, cox_partial_nll, logistic_hazard_nll, to_survival_array

__all__ = [
    "Task", "BinaryTask", "MulticlassTask", "MultilabelTask", "RegressionTask", "CoxTask",
    "DiscreteTimeTask", "MultiTask", "cox_partial_nll", "logistic_hazard_nll", "to_survival_array",
]
