"""One lock primitive, with a subclass per purpose (the shape of Barman's LockFile).

A lock is a session advisory lock on the server, which every machine sees and which
dies with its session (also when the process is killed), plus, for the locks that
guard a catalog, a lock file beside the points that names its holder and dies with
the process. Taking one either succeeds at once or raises LockHeld naming the
holder; a purpose that waits (a quick rollback waiting for its spare) says so."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
from pathlib import Path

from lib.errors import LockHeld
from lib.files import make_private_dir, slugify, utc_now
from lib.pg.db import query, scalar

LOCK_DIR = ".locks"


def lock_key(system_identifier: str | None, name: str) -> int:
    """A stable 63-bit advisory lock key per server and name."""
    digest = hashlib.sha256(f"rollback-toolkit:{system_identifier}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFFFFFFFFFFFFFF


# the granted advisory lock with a bigint key (objsubid 1) of %s, in pg_locks as l
_GRANTED = "l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND ((l.classid::bigint << 32) | l.objid::bigint) = %s"


def server_holder(conn, key: int) -> str | None:
    rows = query(
        conn,
        f"""
        SELECT a.pid, a.usename, a.application_name, a.client_addr::text,
               to_char(a.backend_start, 'YYYY-MM-DD HH24:MI:SS')
          FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE {_GRANTED}
        """,
        (key,),
    )
    if not rows:
        return None
    pid, user, app, client, since = rows[0]
    return f"server session pid {pid} (user {user}, application {app or '-'}, from {client or 'local socket'}, since {since})"


def held(conn, key: int) -> bool:
    """Some session holds the advisory lock ``key`` now."""
    return bool(scalar(conn, f"SELECT EXISTS (SELECT 1 FROM pg_locks l WHERE {_GRANTED})", (key,)))


def wait_while_held(conn, key: int, poll: float = 0.1) -> float:
    """Wait while another session holds the advisory lock ``key``; seconds waited."""
    started = time.monotonic()
    while held(conn, key):
        time.sleep(poll)
    return time.monotonic() - started


class Lock:
    """Held with ``with``; ``conn`` (autocommit) must stay open while it is held."""

    purpose = "lock"

    def __init__(self, conn, system_identifier: str | None, name: str, *, folder: Path | None = None, doing: str = "") -> None:
        self.conn = conn
        self.name = name
        self.key = self.key_for(system_identifier, name)
        self.folder = folder
        self.doing = doing or self.purpose
        self._fd: int | None = None
        self._held = False

    @staticmethod
    def key_name(name: str) -> str:
        return name

    @classmethod
    def key_for(cls, system_identifier: str | None, name: str) -> int:
        """The advisory lock key this kind of lock takes for ``name``."""
        return lock_key(system_identifier, cls.key_name(name))

    # -- the file, on this machine

    @property
    def path(self) -> Path | None:
        return self.folder / LOCK_DIR / f"{slugify(self.name, 60)}_{self.key:016x}.lock" if self.folder else None

    def _take_file(self) -> bool:
        if self.path is None:
            return True
        make_private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "operation": self.doing,
            "database": self.name,
            "started": utc_now().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return True

    def _drop_file(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    def file_holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            return f"{info['operation']} by process {info['pid']} on {info['host']}, started {info['started']}"
        except (OSError, ValueError, KeyError, AttributeError):
            return f"the holder of {self.path}"

    # -- taking and giving back

    def try_acquire(self) -> str | None:
        """None when taken; otherwise who holds it."""
        if not self._take_file():
            return self.file_holder()
        if not scalar(self.conn, "SELECT pg_try_advisory_lock(%s)", (self.key,)):
            self._drop_file()
            return server_holder(self.conn, self.key) or "a session on the server"
        self._held = True
        return None

    def acquire(self, *, wait: float = 0) -> str | None:
        """Take it, waiting up to ``wait`` seconds; None when taken, else who holds it."""
        deadline = time.monotonic() + wait
        while True:
            holder = self.try_acquire()
            if holder is None or time.monotonic() >= deadline:
                return holder
            time.sleep(0.1)

    def release(self) -> None:
        if self._held:
            try:
                if not self.conn.closed:
                    scalar(self.conn, "SELECT pg_advisory_unlock(%s)", (self.key,))
            except Exception:  # noqa: BLE001 - the lock dies with the session anyway
                pass
            self._held = False
        self._drop_file()

    def refused(self, holder: str) -> LockHeld:
        return LockHeld(
            f"Another operation on database {self.name!r} is running: {holder}.",
            "Wait for it to finish, then run the command again.",
        )

    def __enter__(self) -> Lock:
        holder = self.try_acquire()
        if holder is not None:
            raise self.refused(holder)
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class DatabaseLock(Lock):
    """One mutating operation per database at a time, from any process on any machine."""

    purpose = "operation"

    def refused(self, holder: str) -> LockHeld:
        if holder.startswith("server session"):
            return LockHeld(
                f"Another operation on database {self.name!r} is running, from another machine or process: {holder}.",
                "Wait for it to finish, then run the command again.",
            )
        return LockHeld(
            f"Another operation on database {self.name!r} is running: {holder}.",
            "Wait for it to finish (or stop it), then run the command again.",
        )


class SpareLock(Lock):
    """One process at a time prepares or claims the spare copy of a point."""

    purpose = "spare copy"

    @staticmethod
    def key_name(name: str) -> str:
        return f"spare:{name}"


class SealLock(Lock):
    """Held for a moment while a point's database is opened to connections or sealed again:
    two readers that open and seal it at once would update its pg_database row together,
    which the server refuses ("tuple concurrently updated")."""

    purpose = "sealing"

    @staticmethod
    def key_name(name: str) -> str:
        return f"seal:{name}"


class Readers:
    """The sessions reading a sealed point's database at once: each holds a shared advisory
    lock while it reads, so the exclusive one is free only when none does. Joined and
    left under the SealLock, so that opening, reading and sealing never cross."""

    def __init__(self, conn, system_identifier: str | None, name: str) -> None:
        self.conn = conn
        self.key = lock_key(system_identifier, f"read:{name}")

    def join(self) -> None:
        scalar(self.conn, "SELECT pg_advisory_lock_shared(%s)", (self.key,))

    def busy(self) -> bool:
        """Someone reads it now (another session: a session's own shared lock does not count)."""
        if not scalar(self.conn, "SELECT pg_try_advisory_lock(%s)", (self.key,)):
            return True
        scalar(self.conn, "SELECT pg_advisory_unlock(%s)", (self.key,))
        return False

    def leave(self) -> bool:
        """True when this was the last reader."""
        scalar(self.conn, "SELECT pg_advisory_unlock_shared(%s)", (self.key,))
        if not scalar(self.conn, "SELECT pg_try_advisory_lock(%s)", (self.key,)):
            return False
        scalar(self.conn, "SELECT pg_advisory_unlock(%s)", (self.key,))
        return True
