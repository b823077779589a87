"""Append-only JSON-lines audit trail: logs/rollback_audit.jsonl.

One line per event. Each line is written with a single ``write`` under an
exclusive ``flock`` and fsynced, so concurrent writers never interleave and a
line that is in the file is on disk. A line torn by a crash is reported and
skipped when reading; the next append starts on a fresh line."""

from __future__ import annotations

import fcntl
import getpass
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lib.config import redact
from lib.files import make_private_dir, utc_now

log = logging.getLogger(__name__)

AUDIT_FILE = "rollback_audit.jsonl"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def append(log_dir: Path, entry: dict) -> None:
    make_private_dir(log_dir)
    line = (redact(json.dumps(entry, sort_keys=True, default=str)) + "\n").encode()
    fd = os.open(log_dir / AUDIT_FILE, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # the last line was torn by a crash: keep ours whole
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _base(event: str, database: str | None, point_id: str | None, migration_id: str | None) -> dict:
    return {
        "timestamp": utc_now().isoformat(timespec="seconds"),
        "event": event,
        "point_id": point_id,
        "migration_id": migration_id,
        "database": database,
        "user": _user(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def event(
    log_dir: Path,
    name: str,
    *,
    database: str | None = None,
    point_id: str | None = None,
    migration_id: str | None = None,
    outcome: str = "noted",
    **details,
) -> None:
    """One instantaneous event (a migration starting, a threshold breached)."""
    entry = _base(name, database, point_id, migration_id)
    entry.update(outcome=outcome, **details)
    try:
        append(log_dir, entry)
    except OSError as exc:
        log.error("could not write the audit trail in %s: %s", log_dir, exc)


class AuditRecord:
    """Filled in while an operation runs; written once when it ends."""

    def __init__(self, event: str, database: str | None, point_id: str | None, migration_id: str | None = None) -> None:
        self.entry: dict = _base(event, database, point_id, migration_id)
        self.entry.update(outcome=None, duration_seconds=None, error=None)

    def set(self, **fields) -> None:
        self.entry.update(fields)


@contextmanager
def audited(
    log_dir: Path, event: str, database: str | None, point_id: str | None = None, migration_id: str | None = None
) -> Iterator[AuditRecord]:
    record = AuditRecord(event, database, point_id, migration_id)
    started = time.monotonic()
    try:
        yield record
    except BaseException as exc:
        record.entry["outcome"] = "aborted" if isinstance(exc, KeyboardInterrupt) else "failed"
        record.entry["error"] = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        raise
    else:
        record.entry["outcome"] = record.entry["outcome"] or "succeeded"
    finally:
        record.entry["duration_seconds"] = round(time.monotonic() - started, 3)
        try:
            append(log_dir, record.entry)
        except OSError as exc:
            log.error("could not write the audit trail in %s: %s", log_dir, exc)


@dataclass
class Trail:
    path: Path
    entries: list[dict] = field(default_factory=list)
    damaged: list[int] = field(default_factory=list)  # 1-based line numbers that are not JSON objects


def read(log_dir: Path, limit: int | None = None) -> Trail:
    """The newest ``limit`` entries (all when None), oldest first; damaged lines skipped and named."""
    trail = Trail(log_dir / AUDIT_FILE)
    if not trail.path.is_file():
        return trail
    with open(trail.path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                entry = None
            if isinstance(entry, dict):
                trail.entries.append(entry)
            else:
                trail.damaged.append(number)
    if limit:
        trail.entries = trail.entries[-limit:]
    return trail


DETAIL_SKIP = {"timestamp", "event", "point_id", "migration_id", "user", "host", "outcome", "pid", "database"}


def details(entry: dict) -> str:
    """Everything else in an entry, short, for the table view."""
    parts = []
    if entry.get("error"):
        parts.append(str(entry["error"]))
    for key, value in entry.items():
        if key in DETAIL_SKIP or key == "error" or value in (None, "", [], {}):
            continue
        parts.append(f"{key}={value if not isinstance(value, float) else round(value, 3)}")
    return "; ".join(parts)
