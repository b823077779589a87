"""What many tests share: a schema-only dump and a deep fingerprint of a database,
tool wrappers, and the one way to wait for something."""

from __future__ import annotations

import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from lib.config import ConnInfo
from lib.pg.db import connection
from lib.pg.fingerprint import fingerprint
from lib.process import Command

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    *,
    timeout: float,
    what: str,
    process: subprocess.Popen | None = None,
    every: float = 0.1,
) -> T:
    """Ask ``predicate`` every ``every`` seconds until it answers something true, and
    return that answer. Fails naming ``what`` was waited for when ``timeout`` seconds
    pass first, or when ``process`` (the run that should bring it about) ends first,
    with the end of what that process said on stderr."""
    deadline = time.monotonic() + timeout
    while True:
        found = predicate()
        if found:
            return found
        if process is not None and process.poll() is not None:
            found = predicate()  # brought about just before the end
            if found:
                return found
            stderr = process.communicate()[1] if process.stderr else ""
            said = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr or ""
            raise AssertionError(f"the run ended (exit {process.returncode}) before {what}:\n{said[-3000:]}")
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}, in vain")
        time.sleep(every)


def schema_dump(server, dbname: str) -> str:
    """pg_dump --schema-only with the server's own major, minus the random \\restrict keys."""
    info = ConnInfo.parse(server.url(dbname))
    out = Command(server.bin_dir / "pg_dump", conn=info).output(["--schema-only", *info.tool_args()], quiet=True)
    return "\n".join(ln for ln in out.splitlines() if not ln.startswith(("\\restrict", "\\unrestrict")))


def deep_state(server, dbname: str) -> dict:
    with connection(ConnInfo.parse(server.url(dbname))) as conn:
        fp = fingerprint(conn, deep=True)
    return fp.as_dict()


def write_tool_wrapper(folder: Path, name: str, real: Path, body: str) -> Path:
    """A shell script named like a PostgreSQL tool that answers --version as the real one
    and otherwise runs ``body`` (with $REAL set). Used to watch argv or simulate a hang."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f'#!/bin/sh\nREAL="{real}"\nif [ "$1" = "--version" ]; then exec "$REAL" --version; fi\n{body}\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def archive_file(point_dir: Path) -> Path:
    """The largest file of a dump point's archive: a table's data in the directory format
    (database.dir/), or the single custom-format file of older and encrypted points."""
    return max((p for p in point_dir.rglob("*") if p.is_file() and p.name != "manifest.json"), key=lambda p: p.stat().st_size)
