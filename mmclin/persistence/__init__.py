"""The bottom layer: model files (safetensors + JSON + manifest), atomic writes, run directories, data-root
paths and MLflow tracking. It imports nothing from the core, evaluation or interfaces (``tests/test_layers.py``)."""
