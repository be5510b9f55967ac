"""The ways in, over one core: the ``mmclin`` command line, the sklearn-style estimators, config-driven
experiments, Optuna studies, contrastive pretraining and the MLflow pyfunc model.

Nothing below ``mmclin.interfaces`` imports from it (``tests/test_layers.py``)."""
