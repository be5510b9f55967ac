"""MLflow "models from code" entry point: the pyfunc model is defined here, not pickled."""
import mlflow

from mmclin.tracking import MmclinPyfunc

mlflow.models.set_model(MmclinPyfunc())
