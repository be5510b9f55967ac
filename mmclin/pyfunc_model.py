"""MLflow pyfunc model, logged as "models from code": MLflow runs this file; nothing is pickled."""
import mlflow.pyfunc


class MmclinPyfunc(mlflow.pyfunc.PythonModel):
    """Predicts from a frame with the same columns as training; returns the prediction frame."""

    def load_context(self, context):
        from mmclin.training.core import FittedModel

        self.fitted = FittedModel.load(context.artifacts["model_dir"])

    def predict(self, context, model_input, params=None):  # no type hints: MLflow infers schemas from them
        from mmclin.predictions import prediction_frame

        return prediction_frame(self.fitted, model_input).to_pandas()


mlflow.models.set_model(MmclinPyfunc())
