"""Writes that a crash cannot leave half done: build under a temporary name beside the target
(``.<name>.*``), then rename into place; a kill leaves the old version or the new one."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def current_umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | Path) -> None:
    """mkstemp/mkdtemp create 0600 files and 0700 directories; give ``path`` (and, for a directory,
    everything in it) the modes a plain ``open``/``mkdir`` would have given, so files can be shared."""
    mask = current_umask()
    path = Path(path)
    if path.is_dir():
        for p in [path, *path.rglob("*")]:
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def write_file_atomic(path: str | Path, write: Callable[[str], Any]) -> Path:
    """``write(temporary_path)``, then rename over ``path`` (modes follow the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the target's suffix last: writers that pick a format from the name (savefig) still can
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any, **dumps: Any) -> Path:
    return write_file_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1, **dumps)))


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename the finished ``tmp`` to ``path``; an existing ``path`` is swapped out first, then removed."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yields a temporary directory beside ``path``; when the block succeeds it replaces ``path``
    (an existing one is swapped out, then removed), when it fails it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        honour_umask(tmp)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ForeignFilesError(FileExistsError, ValueError):
    """A directory mmclin would replace holds files mmclin did not write (nothing was touched)."""


def check_owned_directory(path: str | Path, marker: str, what: str = "mmclin",
                          recognise: Callable[[Path], bool] | None = None) -> None:
    """Raise :class:`ForeignFilesError` unless ``path`` is absent, an empty directory, or a
    directory whose ``marker`` file (JSON with a ``files`` list, written by
    :func:`replace_owned_directory`) lists every file in it. ``recognise(path)`` may vouch for
    a directory without a marker (one an older mmclin wrote before markers existed)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise ForeignFilesError(f"{path} exists and is not a directory; choose another output directory")
    found = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if not p.is_dir())
    if not found:
        return
    listed: set[str] = set()
    if (path / marker).is_file():
        try:
            listed = set(json.loads((path / marker).read_text()).get("files", []))
        except (ValueError, AttributeError, OSError):
            listed = set()
    foreign = [f for f in found if f != marker and f not in listed]
    if not (path / marker).is_file() and recognise is not None and recognise(path):
        return
    if not (path / marker).is_file() or foreign:
        names = ", ".join(foreign[:3] or found[:3]) + (", ..." if len(foreign or found) > 3 else "")
        raise ForeignFilesError(f"{path} holds files {what} did not write ({names}); nothing was deleted: "
                                "move them away or choose another output directory")


@contextlib.contextmanager
def replace_owned_directory(path: str | Path, marker: str, what: str = "mmclin",
                            info: dict[str, Any] | None = None,
                            recognise: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Replace a directory that only mmclin writes with a freshly built one, so it never mixes
    files of two runs: yields a temporary directory beside ``path``; when the block succeeds,
    writes ``marker`` (JSON: ``info`` plus the list of files) into it, gives it the modes the
    umask asks for and swaps it in for ``path`` (the old one is removed). ``path`` must pass
    :func:`check_owned_directory` before and after the block; otherwise
    :class:`ForeignFilesError` is raised and ``path`` is left as it was. A symlink to a
    directory stays a link: its target is replaced."""
    path = Path(path)
    if path.is_symlink() and path.resolve().is_dir():
        path = path.resolve()
    check_owned_directory(path, marker, what, recognise)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if not p.is_dir())
        (tmp / marker).write_text(json.dumps({**(info or {}), "files": files}, indent=1, default=str))
        honour_umask(tmp)
        check_owned_directory(path, marker, what, recognise)  # nothing foreign arrived while the block ran
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
