"""MLflow pyfunc model, logged as "models from code": MLflow runs this file; nothing is pickled."""
import warnings

import mlflow.pyfunc


# MLflow asks, when this class is defined (at log_model and at load_model), for type hints on `predict`; mmclin
# leaves them out on purpose (MLflow would infer a schema from them). A filter cannot hide the request: MLflow's
# check runs under its own "once" filter, put in front of any other. Recording catches it, the rest is re-emitted.
with warnings.catch_warnings(record=True) as _caught:

    class MmclinPyfunc(mlflow.pyfunc.PythonModel):
        """Predicts from a frame with the same columns as training; returns the prediction frame."""

        def load_context(self, context):
            from mmclin.training.core import FittedModel

            self.fitted = FittedModel.load(context.artifacts["model_dir"])

        def predict(self, context, model_input, params=None):  # no type hints: MLflow infers schemas from them
            from mmclin.training.predictions import prediction_frame

            return prediction_frame(self.fitted, model_input).to_pandas()


for _w in _caught:
    if "type hints to the `predict` method" not in str(_w.message):
        warnings.warn_explicit(_w.message, _w.category, _w.filename, _w.lineno)

mlflow.models.set_model(MmclinPyfunc())
