"""File paths read from frames and manifests, kept inside a configured data root.

A manifest is data, and data can be wrong or hostile: a cell holding ``../../etc/passwd`` or a
symlink to another project's files must not be opened when a data root is set. With a root,
relative paths are taken relative to it (not to the working directory), ``..`` and symlinks
are resolved, and anything that lands outside the root is refused. Without a root, a path is
used as given (relative to the working directory), as before.

    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> resolve_under_root("a/b.png", root) == (root / "a" / "b.png").resolve()
    True
    >>> resolve_under_root("../x.png", root)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    mmclin.persistence.paths.PathOutsideRootError: path '../x.png' resolves to '...' which is outside the data root '...'...
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ROOT_OPTION = "root"  # the ModalitySpec option that sets a modality's data root


class PathOutsideRootError(ValueError):
    """A path from a frame or manifest resolves outside the configured data root."""


def resolve_under_root(path: str | os.PathLike[str], root: str | os.PathLike[str] | None, what: str = "") -> Path:
    """The path to open for ``path``: unchanged when ``root`` is None, else resolved under ``root``.

    Args:
        path: a path from a frame cell or manifest; relative paths are relative to ``root`` when set.
        root: the data root, or None (no restriction; ``path`` is returned as a ``Path`` unchanged).
        what: where the path came from, for the error (e.g. ``"modality 'rad', column 'ct', row 3"``).

    Raises:
        PathOutsideRootError (a ValueError): the resolved path (``..`` and symlinks followed) is outside
        the resolved root. Symlinks *inside* the root that point inside it are fine.
    """
    p = Path(path)
    if root is None:
        return p
    base = Path(root).expanduser().resolve()
    if not base.is_dir():
        raise FileNotFoundError(f"{what + ': ' if what else ''}the data root {str(root)!r} is not an existing directory")
    # strict=False: a missing file still resolves (its existence is checked, and named, by the reader)
    resolved = (p if p.is_absolute() else base / p).resolve()
    if not resolved.is_relative_to(base):
        where = f"{what}: " if what else ""
        raise PathOutsideRootError(
            f"{where}path {str(path)!r} resolves to {str(resolved)!r} which is outside the data root {str(root)!r}; "
            "paths in a manifest must stay under the root (use a path relative to it, without '..' or symlinks "
            "that lead out of it), or change the root"
        )
    return resolved


def option_root(options: dict[str, Any], modality: str = "") -> str | None:
    """The data root set in a ModalitySpec's options (``options={"root": "/data/slides"}``), or None."""
    root = options.get(ROOT_OPTION)
    if root is not None and not isinstance(root, (str, os.PathLike)):
        raise ValueError(f"modality {modality!r}: option {ROOT_OPTION!r} must be a directory path (string), "
                         f"got {type(root).__name__}")
    return None if root is None else str(root)


def with_location(e: Exception, where: str) -> Exception:
    """An exception of the same type (ValueError, FileNotFoundError ...) whose message starts with
    ``where`` (modality, column, row); a ValueError when that type cannot be built from a message.
    Raise it ``from e`` so the original traceback stays attached."""
    try:
        return type(e)(f"{where}: {e}")
    except Exception:  # exception types with other constructors
        return ValueError(f"{where}: {type(e).__name__}: {e}")


PATH_KINDS = ("image", "slide")  # modality kinds whose frame cells are file paths


def apply_data_root(specs: list[Any], root: str | os.PathLike[str] | None) -> list[Any]:
    """``specs`` with ``options["root"] = root`` on every path-holding modality (kinds ``image`` and
    ``slide``) that does not set its own root; unchanged when ``root`` is None.

    This is how a config-level root (``DataConfig.root``) reaches the featurizers, which read only
    their modality's options. Specs are frozen, so changed ones are copies.
    """
    if root is None:
        return list(specs)
    return [s.model_copy(update={"options": {**s.options, ROOT_OPTION: str(root)}})
            if s.kind in PATH_KINDS and ROOT_OPTION not in s.options else s for s in specs]
