"""Points kept as databases on staging's own server, with connections disabled so
nobody writes to them by accident; restored by a server-side copy."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from psycopg2 import sql

from ..catalog import Point
from ..db import connection, execute, query, set_allow_connections
from ..errors import VerificationError
from ..target import Target
from ..verify import Fingerprint, compare, fingerprint

log = logging.getLogger(__name__)


def comment_for(point_id: str, description: str) -> str:
    return f"rollback point {point_id}: {description} (managed by rollback_manager.py; do not connect)"


def database_state(maint, name: str) -> dict | None:
    """exists / allows connections / invalid (an interrupted DROP DATABASE leaves datconnlimit -2)."""
    rows = query(maint, "SELECT datallowconn, datconnlimit FROM pg_database WHERE datname = %s", (name,))
    if not rows:
        return None
    return {"allow_connections": rows[0][0], "invalid": rows[0][1] == -2}


def seal(maint, name: str, point_id: str, description: str) -> None:
    set_allow_connections(maint, name, False)
    execute(
        maint,
        sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(comment_for(point_id, description))),
    )


@contextmanager
def opened(target: Target, name: str) -> Iterator[object]:
    """Briefly allow connections to a sealed point database to read it."""
    set_allow_connections(target.maint, name, True)
    try:
        with connection(target.info, name, application_name="rollback-toolkit verify") as conn:
            yield conn
    finally:
        set_allow_connections(target.maint, name, False)


def read_fingerprint(target: Target, name: str) -> Fingerprint:
    with opened(target, name) as conn:
        return fingerprint(conn)


def copy_database(target: Target, source: str, new_name: str, owner: str | None) -> None:
    """CREATE DATABASE ... TEMPLATE (FILE_COPY from PostgreSQL 15 on: a file copy plus
    two checkpoints, much faster than WAL_LOG for large databases)."""
    parts = [sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(new_name), sql.Identifier(source))]
    if target.facts.major >= 15:
        parts.append(sql.SQL("STRATEGY FILE_COPY"))
    if owner:
        parts.append(sql.SQL("OWNER {}").format(sql.Identifier(owner)))
    execute(target.maint, sql.SQL(" ").join(parts))


def verify_point_database(target: Target, point: Point) -> dict:
    name = point.manifest.get("template_database")
    state = database_state(target.maint, name) if name else None
    if state is None:
        raise VerificationError(
            f"The database {name!r} that holds point {point.id} does not exist on {target.info.server_label()}.",
            "The point cannot be restored; delete it with `python3 rollback_manager.py delete "
            f"{point.id}` and use another point.",
        )
    if state["invalid"]:
        raise VerificationError(
            f"The database {name!r} that holds point {point.id} is invalid (an interrupted DROP DATABASE left it).",
            "Drop it by hand (DROP DATABASE) and use another point.",
        )
    problems = compare(point.manifest.get("fingerprint", {}), read_fingerprint(target, name))
    if problems:
        raise VerificationError(
            f"Point {point.id}'s database {name!r} no longer matches its manifest: " + "; ".join(problems[:10]) + ".",
            "Someone changed it; use another point.",
        )
    return {"database": name, "fingerprint": "matches the manifest"}
