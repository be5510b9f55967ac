"""Model directories on disk: weights (safetensors) + metadata JSON + a SHA-256 manifest, written atomically.

Both kinds of model directory (a fitted model's ``mmclin.json`` + ``model.safetensors`` and a
pretrained encoder set's ``pretrain.json`` + ``encoders.safetensors``) are written and read here,
so the format check, the manifest and the error messages are the same for both.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from mmclin.persistence.atomic import atomic_directory
from mmclin.persistence.weights import save_weights

MANIFEST = "manifest.json"
# what each metadata file must hold (besides format_version), so a file missing a part is "damaged", not a KeyError
REQUIRED_KEYS = {"mmclin.json": ("modalities", "featurizers", "encoder_kwargs", "model", "task")}
log = logging.getLogger("mmclin")


def json_default(obj: Any) -> Any:
    """numpy scalars and arrays in metadata (featurizer means, category counts) as plain JSON."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, names: list[str]) -> None:
    """``manifest.json``: the SHA-256 of each part, so a model whose JSON (featurizer state: means, categories)
    and weights do not belong together, or a damaged file, is refused at load instead of predicting wrongly."""
    (directory / MANIFEST).write_text(json.dumps({"sha256": {n: _sha256(directory / n) for n in names}}, indent=1))


def verify_manifest(directory: Path, what: str) -> None:
    manifest = directory / MANIFEST
    if not manifest.exists():
        log.warning("%s %s has no %s (saved by an older mmclin): its files cannot be checked against each other",
                    what, directory, MANIFEST)
        return
    try:
        expected = json.loads(manifest.read_text())["sha256"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{what} {str(directory)!r}: {MANIFEST} is damaged") from None
    for name, digest in expected.items():
        part = directory / name
        if not part.exists():
            raise FileNotFoundError(f"{what} {str(directory)!r}: {name} is missing")
        if _sha256(part) != digest:
            raise ValueError(f"{what} {str(directory)!r}: {name} does not match its SHA-256 in {MANIFEST} (edited or "
                             "damaged after it was saved); refusing to predict with parts that do not belong together")


def write_model_directory(path: str | Path, net: nn.Module, weights_name: str, meta: dict[str, Any],
                          meta_name: str, format_version: int) -> Path:
    """Write ``net``'s weights, ``meta`` (plus ``format_version``) and the manifest into ``path`` atomically."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        save_weights(net, tmp / weights_name)
        (tmp / meta_name).write_text(json.dumps({"format_version": format_version, **meta}, indent=1,
                                                default=json_default))
        write_manifest(tmp, [meta_name, weights_name])
    return path


def read_model_metadata(path: str | Path, meta_name: str, format_version: int, what: str, made_by: str) -> dict[str, Any]:
    """The metadata JSON of a model directory, after checking the manifest and the format version."""
    path = Path(path)
    meta_file = path / meta_name
    if not meta_file.exists():
        article = "an" if what[0] in "aeiou" else "a"
        raise FileNotFoundError(f"{str(path)!r} is not {article} {what} (no {meta_name}; made by {made_by})")
    verify_manifest(path, what)
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(meta_file)!r} is not valid JSON ({err}); the {what} is damaged") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{str(meta_file)!r} holds a JSON {type(meta).__name__}, not an object; the {what} is damaged")
    if meta.get("format_version") != format_version:
        raise ValueError(f"{str(path)!r}: {what} format {meta.get('format_version')} is not supported "
                         f"(expected {format_version})")
    missing = [k for k in REQUIRED_KEYS.get(meta_name, ()) if k not in meta]
    if missing:
        raise ValueError(f"{str(meta_file)!r} lacks {', '.join(repr(k) for k in missing)}; the {what} is damaged "
                         f"(save it again with {made_by})")
    return meta
