"""One mutating operation per database at a time: a lock file beside the points
(this machine) plus a session advisory lock on the server (every machine)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lib.errors import LockHeld
from lib.pg.db import advisory_lock_holder, lock_key, scalar
from lib.points.catalog import make_private_dir, slugify, utc_now

LOCK_DIR = ".locks"


@contextmanager
def operation_lock(
    backup_dir: Path, maintenance_conn, system_identifier: str | None, dbname: str, operation: str
) -> Iterator[None]:
    """Hold both locks for the duration; fail at once with LockHeld when either is taken.

    ``maintenance_conn`` must stay open for the duration: the advisory lock lives
    in its session and goes away with it, also when this process is killed.
    """
    lock_dir = backup_dir / LOCK_DIR
    make_private_dir(lock_dir)
    key = lock_key(system_identifier, dbname)
    path = lock_dir / f"{slugify(dbname, 60)}_{key:016x}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(
                f"Another operation on database {dbname!r} is running: {_describe_holder(path)}.",
                "Wait for it to finish (or stop it), then run the command again.",
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "operation": operation,
            "database": dbname,
            "started": utc_now().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        if not scalar(maintenance_conn, "SELECT pg_try_advisory_lock(%s)", (key,)):
            who = advisory_lock_holder(maintenance_conn, key) or "a session on the server"
            raise LockHeld(
                f"Another operation on database {dbname!r} is running, from another machine or process: {who}.",
                "Wait for it to finish, then run the command again.",
            )
        try:
            yield
        finally:
            try:
                if not maintenance_conn.closed:
                    scalar(maintenance_conn, "SELECT pg_advisory_unlock(%s)", (key,))
            except Exception:  # noqa: BLE001 - the lock dies with the session anyway
                pass
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def _describe_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"{info['operation']} by process {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError):
        return f"the holder of {path}"
