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


def write_file_atomic(path: str | Path, write: Callable[[str], Any]) -> Path:
    """``write(temporary_path)``, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the target's suffix last: writers that pick a format from the name (savefig) still can
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any, **dumps: Any) -> Path:
    return write_file_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1, **dumps)))


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yields a temporary directory beside ``path``; when the block succeeds it replaces ``path``
    (an existing one is swapped out, then removed), when it fails it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
