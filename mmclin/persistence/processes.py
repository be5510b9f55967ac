"""Whether a process on this host is still running: what tells a dead writer's leftovers from a live one's."""
from __future__ import annotations

import os
from pathlib import Path


def process_start(pid: int) -> str | None:
    """Start time of a process (Linux ``/proc``), to tell a reused pid from the original; None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def process_alive(pid: int, start: str | None = None) -> bool:
    """``pid`` runs (another user's process counts as running); with ``start``, it is the same process as then."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return start is None or process_start(pid) in (None, start)
