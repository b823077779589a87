"""Comparisons the tests make: a schema-only dump and a deep fingerprint of a database."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from lib.config import ConnInfo
from lib.pg.db import connection
from lib.pg.fingerprint import fingerprint


def schema_dump(server, dbname: str) -> str:
    """pg_dump --schema-only with the server's own major, minus the random \\restrict keys."""
    info = ConnInfo.parse(server.url(dbname))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = info.password
    out = subprocess.run(
        [str(server.bin_dir / "pg_dump"), "--schema-only", "-h", info.host, "-p", str(info.port), "-U", info.user, dbname],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
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
