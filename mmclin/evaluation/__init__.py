"""Evaluation beside the core: classical baselines on the same folds (more to move here: metrics, robustness)."""
