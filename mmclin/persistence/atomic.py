"""Writes that a crash cannot leave half done: build under a temporary name beside the target
(``.<name>.*``), then rename into place; a kill leaves the old version or the new one.

Temporary files are named ``.<name>.<host>-<pid>.<random>.tmp<suffix>``: the next write of the same
target removes those whose writer (a process of this host) no longer exists, so a file left by a
killed run never stays beside the output. A write the file system refuses (a read-only directory, a
full disk) is a :class:`WriteError` naming the target, never a message about a temporary name.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from mmclin.persistence.processes import process_alive

log = logging.getLogger("mmclin")

_REFUSED = {
    errno.ENOSPC: "the disk is full (no space left on device)",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied (the directory is read-only or not yours)",
    errno.EPERM: "permission denied (the directory is read-only or not yours)",
    errno.EROFS: "the file system is read-only",
}


class WriteError(OSError):
    """A write the file system refused, said with the file or directory mmclin was writing."""

    def __init__(self, code: int, path: str | Path, fix: str = "free space or choose another location") -> None:
        if code in (errno.EACCES, errno.EPERM, errno.EROFS) and fix == "free space or choose another location":
            fix = "choose a directory you can write"
        super().__init__(code, f"cannot write {str(path)!r}: {_REFUSED.get(code, os.strerror(code))}; {fix}", str(path))

    def __str__(self) -> str:
        return str(self.strerror)


def refused_write(err: BaseException, path: str | Path, within: str | Path | None = None) -> WriteError | None:
    """``err`` as a :class:`WriteError` about ``path`` when it is a refusal of the file system (full disk,
    read-only or foreign directory), whatever library raised it; None otherwise. ``within``: an OSError that
    names a file elsewhere (a file being read) is not about this write."""
    if isinstance(err, WriteError):
        return err
    if isinstance(err, OSError):
        if err.errno not in _REFUSED:
            return None
        if within is not None and err.filename and not os.path.abspath(str(err.filename)).startswith(
                os.path.abspath(str(within))):
            return None
        return WriteError(err.errno, path)
    text = str(err)
    if "No space left on device" in text or "os error 28" in text:  # polars / pyarrow wrap the OSError in their own
        return WriteError(errno.ENOSPC, path)
    if "Permission denied" in text or "os error 13" in text:
        return WriteError(errno.EACCES, path)
    return None


def check_writable_parent(path: str | Path, what: str = "output", writable: bool = False) -> None:
    """Refuse, before any work, an output whose directory cannot be made: a file where a directory should be;
    with ``writable``, also a directory the process may not write (as ``os.access`` tells; the write itself
    still reports what the file system refuses, as a :class:`WriteError`)."""
    path = Path(path)
    for parent in [path.parent, *path.parent.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"{what} {str(path)!r}: {str(parent)!r} is a file, not a directory")
            if writable and not os.access(parent, os.W_OK | os.X_OK):
                raise WriteError(errno.EACCES, path, f"{what}: choose a directory you can write")
            return


_OWNER = re.compile(r"\.(?P<host>[^./]+)-(?P<pid>\d+)\.[^./]+\.tmp")
_OLD_STYLE = re.compile(r"\.[a-z0-9_]{8}\.tmp")  # mkstemp's names of mmclin <= 0.2: removed after an hour
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.{_HOST}-{os.getpid()}."




def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporary files and directories of earlier writes of ``path`` whose writer is gone: a process of
    this host that no longer runs (a ``kill -9`` between writing and renaming), or, for file names of older mmclin
    versions, one that is more than an hour old. Temporaries of live writers and of other hosts are left alone."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    start, removed = f".{path.name}.", []
    for p in path.parent.iterdir():
        if not p.name.startswith(start) or p.is_symlink() or not (p.is_file() or p.is_dir()):
            continue
        rest = p.name[len(start) - 1:]
        owner = _OWNER.match(rest)
        if owner is not None:
            stale = owner["host"] == _HOST and owner["pid"] != str(os.getpid()) and not process_alive(int(owner["pid"]))
        else:
            stale = bool(_OLD_STYLE.match(rest)) and time.time() - p.stat().st_mtime > 3600
        if stale and p.is_dir() and owner is None:
            stale = False  # directories are only ever named by their writer (below)
        if stale:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                removed.append(p)
    if removed:
        log.info("removed %d temporary file(s) of an interrupted write of %s", len(removed), path)
    return removed


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
    check_writable_parent(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        # the target's suffix last: writers that pick a format from the name (savefig) still can
        fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=f".tmp{path.suffix}", dir=path.parent)
    except OSError as err:
        refused = refused_write(err, path)
        if refused is None:
            raise
        raise refused from None
    os.close(fd)
    try:
        write(tmp)
        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        refused = refused_write(err, path, path.parent) if isinstance(err, Exception) else None
        if refused is not None:
            raise refused from None
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any, **dumps: Any) -> Path:
    return write_file_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1, **dumps)))


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename the finished ``tmp`` to ``path``; an existing ``path`` is swapped out first, then removed."""
    old = None
    if path.exists():
        old = path.with_name(f"{_temporary_prefix(path)}old.tmp")  # removed by the next write if a kill strands it
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _temporary_directory(path: Path) -> Path:
    """A fresh directory beside ``path`` named for this writer, after removing those of writers that are gone."""
    remove_stale_temporaries(path)
    return Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent))


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yields a temporary directory beside ``path``; when the block succeeds it replaces ``path``
    (an existing one is swapped out, then removed), when it fails it is removed."""
    path = Path(path)
    check_writable_parent(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary_directory(path)
    except OSError as err:
        refused = refused_write(err, path)
        if refused is None:
            raise
        raise refused from None
    try:
        yield tmp
        honour_umask(tmp)
        _swap_in(tmp, path)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        refused = refused_write(err, path, path.parent) if isinstance(err, Exception) else None
        if refused is not None:
            raise refused from None
        raise


class ForeignFilesError(FileExistsError, ValueError):
    """A directory mmclin would replace holds files mmclin did not write (nothing was touched)."""


def check_owned_directory(path: str | Path, marker: str, what: str = "mmclin",
                          recognise: Callable[[Path], bool] | None = None, listed: str = "files") -> None:
    """Raise :class:`ForeignFilesError` unless ``path`` is absent, an empty directory, or a
    directory whose ``marker`` file (JSON whose ``listed`` entry names files: a ``files`` list, written by
    :func:`replace_owned_directory`, or a model manifest's ``sha256`` map) lists every file in it.
    ``recognise(path)`` may vouch for a directory without a marker (one an older mmclin wrote before
    markers existed)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise ForeignFilesError(f"{path} exists and is not a directory; choose another output directory")
    found = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if not p.is_dir())
    if not found:
        return
    names: set[str] = set()
    if (path / marker).is_file():
        try:
            names = set(json.loads((path / marker).read_text()).get(listed, []))
        except (ValueError, AttributeError, OSError, TypeError):
            names = set()
    foreign = [f for f in found if f != marker and f not in names]
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
    tmp = _temporary_directory(path)
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
