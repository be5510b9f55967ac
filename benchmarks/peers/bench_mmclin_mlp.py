"""Contender 6 (mlp) — mmclin MultimodalClassifier, the built-in MLP towers; see _mmclin_impl.py."""
import common
common.start()
import _mmclin_impl
_mmclin_impl.run("mlp")
