"""A throwaway PostgreSQL server on loopback, for tests and benchmarks of shared studies.

Uses the server binaries of Debian's ``postgresql`` package (``/usr/lib/postgresql/*/bin``)
or whatever ``initdb`` is on the PATH. As root, the server runs as the ``postgres`` user
(``initdb`` refuses root). Durability is switched off (``fsync=off``): it holds test data only.

    >>> with local_postgres(["optuna", "mlflow"]) as url:  # doctest: +SKIP
    ...     print(f"{url}/optuna")  # postgresql://mmclin@127.0.0.1:PORT/optuna
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator


def postgres_bindir() -> Path | None:
    """Directory holding ``initdb``, ``pg_ctl`` and ``createdb``, or None when the server is not installed."""
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)), None)
    if found is None:
        return None
    bindir = Path(found).resolve().parent
    return bindir if all((bindir / b).exists() for b in ("pg_ctl", "createdb")) else None


@contextlib.contextmanager
def local_postgres(databases: list[str] | tuple[str, ...] = ("optuna",), user: str = "mmclin") -> Iterator[str]:
    """Start a server on a free loopback port with the given databases; yields ``postgresql://user@127.0.0.1:PORT``
    and stops the server (and deletes its files) afterwards."""
    bindir = postgres_bindir()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl, createdb) are not installed; "
                                "on Debian/Ubuntu: apt-get install postgresql")
    root = Path(tempfile.mkdtemp(prefix="mmclin-pg-"))
    as_user: dict = {}
    if os.geteuid() == 0:
        import pwd

        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = {"user": pw.pw_uid, "group": pw.pw_gid}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"

    def run(*cmd: object) -> None:
        out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **as_user)
        if out.returncode:
            raise RuntimeError(f"{Path(str(cmd[0])).name} failed ({out.returncode}): {out.stderr.strip()[-1000:]}")

    try:
        run(bindir / "initdb", "-D", data, "-A", "trust", "-U", user, "--no-sync", "-E", "UTF8")
        run(bindir / "pg_ctl", "-D", data, "-l", root / "server.log", "-w", "-o",
            f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off", "start")
        for db in databases:
            run(bindir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", user, db)
        yield f"postgresql://{user}@127.0.0.1:{port}"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True, **as_user)
        shutil.rmtree(root, ignore_errors=True)
