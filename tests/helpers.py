"""Comparisons the tests make: a schema-only dump and a deep fingerprint of a database."""

from __future__ import annotations

import stat
from pathlib import Path

from lib.config import ConnInfo
from lib.pg.db import connection
from lib.pg.fingerprint import fingerprint
from lib.process import Command


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
