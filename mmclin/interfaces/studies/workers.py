"""Which worker runs a trial, and whether it is still alive (same host: its process; other hosts: its heartbeat).

Why not Optuna's own heartbeat (``RDBStorage(heartbeat_interval=, grace_period=)`` with
``fail_stale_trials``): in Optuna 5.0 only ``RDBStorage`` has one (``JournalStorage`` is no
``BaseHeartbeat``), its heartbeat thread is started only inside ``study.optimize`` (which cannot ask
under mmclin's study lock, see ``storage.StudyLock``), and it knows a dead worker only after the
grace period, where a worker on the same host is known dead at once from its process. Re-queueing a
dead worker's values *is* Optuna's: ``RetryHeartbeatStaleTrialCallback`` (``runner._queue_again``).
"""
from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

import optuna

from mmclin.persistence.processes import process_alive, process_start

HOST = socket.gethostname()


# --- worker liveness ----------------------------------------------------------------------------
def worker_lease() -> dict[str, Any]:
    return {"host": HOST, "pid": os.getpid(), "start": process_start(os.getpid()), "time": time.time()}


def lease_alive(lease: dict[str, Any] | None, last_beat: float, stale_after: float, now: float | None = None) -> bool:
    """Same host: is the process still there? Other hosts: was there a heartbeat within ``stale_after``?"""
    now = time.time() if now is None else now
    if lease and lease.get("host") == HOST and isinstance(lease.get("pid"), int):
        return process_alive(lease["pid"], lease.get("start"))
    return now - last_beat <= stale_after


class _Heartbeat:
    """Refreshes ``mmclin.heartbeat`` of the running trial every ``interval`` seconds."""

    def __init__(self, trial: optuna.Trial, interval: float) -> None:
        self.trial, self.interval = trial, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"mmclin-heartbeat-{trial.number}")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.trial.set_user_attr("mmclin.heartbeat", time.time())
            except Exception:  # the trial finished meanwhile, or the storage hiccupped: try next time
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
