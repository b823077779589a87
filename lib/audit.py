"""Append-only JSON-lines audit trail: logs/rollback_audit.jsonl."""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .catalog import make_private_dir, utc_now
from .config import redact

log = logging.getLogger(__name__)

AUDIT_FILE = "rollback_audit.jsonl"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def append(log_dir: Path, entry: dict) -> None:
    make_private_dir(log_dir)
    line = redact(json.dumps(entry, sort_keys=True, default=str)) + "\n"
    fd = os.open(log_dir / AUDIT_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


class AuditRecord:
    """Filled in while an operation runs; written once when it ends."""

    def __init__(self, event: str, database: str | None, point_id: str | None) -> None:
        self.entry: dict = {
            "timestamp": utc_now().isoformat(timespec="seconds"),
            "event": event,
            "point_id": point_id,
            "database": database,
            "user": _user(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "outcome": None,
            "duration_seconds": None,
            "error": None,
        }

    def set(self, **fields) -> None:
        self.entry.update(fields)


@contextmanager
def audited(log_dir: Path, event: str, database: str | None, point_id: str | None = None) -> Iterator[AuditRecord]:
    record = AuditRecord(event, database, point_id)
    started = time.monotonic()
    try:
        yield record
    except BaseException as exc:
        record.entry["outcome"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
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


def read(log_dir: Path, limit: int | None = None) -> list[dict]:
    path = log_dir / AUDIT_FILE
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries[-limit:] if limit else entries
