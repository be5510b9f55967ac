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

from mmclin.persistence.atomic import atomic_directory, check_owned_directory
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


def verify_manifest(directory: Path, what: str, parts: list[str]) -> None:
    """Check every part against its SHA-256 in the manifest; each of ``parts`` (the files the loader reads) must be
    listed there, so a manifest emptied or written by hand cannot vouch for nothing."""
    manifest = directory / MANIFEST
    if not manifest.exists():
        log.warning("%s %s has no %s (saved by an older mmclin): its files cannot be checked against each other",
                    what, directory, MANIFEST)
        return
    try:
        expected = json.loads(manifest.read_text())["sha256"]
        if not isinstance(expected, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{what} {str(directory)!r}: {MANIFEST} is damaged") from None
    unlisted = [name for name in parts if name not in expected]
    if unlisted:
        raise ValueError(f"{what} {str(directory)!r}: {MANIFEST} does not list {', '.join(unlisted)}, so "
                         f"{'it' if len(unlisted) == 1 else 'they'} cannot be checked against the other parts; the "
                         "manifest is damaged or was written by hand (save the model again)")
    extra = sorted(p.name for p in directory.iterdir() if p.name != MANIFEST and p.name not in expected)
    if extra:
        log.warning("%s %s holds %s, which its %s does not list: not part of the model, ignored", what, directory,
                    ", ".join(extra[:3]) + (", ..." if len(extra) > 3 else ""), MANIFEST)
    for name, digest in expected.items():
        part = directory / name
        if not part.exists():
            raise FileNotFoundError(f"{what} {str(directory)!r}: {name} is missing")
        if _sha256(part) != digest:
            raise ValueError(f"{what} {str(directory)!r}: {name} does not match its SHA-256 in {MANIFEST} (edited or "
                             "damaged after it was saved); refusing to predict with parts that do not belong together")


def _first_non_finite(tree: Any, where: str = "") -> tuple[str, float] | None:
    """The first NaN or infinite number in a JSON tree, with where it sits (``'mean'[0]``)."""
    if isinstance(tree, float) and not np.isfinite(tree):
        return where, tree
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        found = _first_non_finite(value, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}".lstrip("."))
        if found is not None:
            return found
    return None


def check_replaceable(path: str | Path, meta_name: str, weights_name: str) -> None:
    """A model directory is written only over nothing, an empty directory or a model directory of the same kind
    (its metadata file, and no file its manifest does not list): never over a user's own files of that name."""
    check_owned_directory(path, MANIFEST, "mmclin", listed="sha256", recognise=lambda p: (p / meta_name).is_file() and {
        f.name for f in p.iterdir()} <= {meta_name, weights_name})


def write_model_directory(path: str | Path, net: nn.Module, weights_name: str, meta: dict[str, Any],
                          meta_name: str, format_version: int) -> Path:
    """Write ``net``'s weights, ``meta`` (plus ``format_version``) and the manifest into ``path`` atomically."""
    path = Path(path)
    check_replaceable(path, meta_name, weights_name)
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
    verify_manifest(path, what, [meta_name, *sorted(p.name for p in path.glob("*.safetensors"))])
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(meta_file)!r} is not valid JSON ({err}); the {what} is damaged") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{str(meta_file)!r} holds a JSON {type(meta).__name__}, not an object; the {what} is damaged")
    found = meta.get("format_version")
    if found != format_version:
        newer = isinstance(found, int) and not isinstance(found, bool) and found > format_version
        why = "; it was saved by a newer mmclin: upgrade mmclin to read it" if newer else ""
        raise ValueError(f"{str(path)!r}: {what} format {found} is not supported (expected {format_version}){why}")
    missing = [k for k in REQUIRED_KEYS.get(meta_name, ()) if k not in meta]
    if missing:
        raise ValueError(f"{str(meta_file)!r} lacks {', '.join(repr(k) for k in missing)}; the {what} is damaged "
                         f"(save it again with {made_by})")
    # a NaN or infinite mean or scale would turn every prediction into NaN (or a clipped guess) without a word
    for modality, state in (meta.get("featurizers") or {}).items() if isinstance(meta.get("featurizers"), dict) else ():
        found = _first_non_finite(state)
        if found is not None:
            raise ValueError(f"{str(meta_file)!r}: the featurizer state of modality {modality!r} holds {found[1]} at "
                             f"{found[0] or 'its top'}, not a finite number; the {what} is damaged (save it again with "
                             f"{made_by})")
    return meta
