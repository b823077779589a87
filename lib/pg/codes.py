"""The SQLSTATEs the toolkit decides on (psycopg2.errorcodes names them all); never the
messages, which are in the server's language."""

from __future__ import annotations

OBJECT_IN_USE = "55006"  # a database copied, renamed or dropped while sessions are on it
DUPLICATE_DATABASE = "42P04"
INVALID_CATALOG_NAME = "3D000"  # no such database
DISK_FULL = "53100"
QUERY_CANCELED = "57014"
INSUFFICIENT_PRIVILEGE = "42501"


def sqlstate(exc: BaseException) -> str | None:
    """The server's SQLSTATE of a psycopg2 error; None where there is none (a failed connection)."""
    return getattr(exc, "pgcode", None)


# Storage the server could not read as it wrote it: a page that fails its checksum or its
# header check (data_corrupted, index_corrupted), a relation file that is missing
# (undefined_file), a read that failed (io_error). A copy showing one is damaged.
DAMAGE = frozenset({"XX001", "XX002", "58P01", "58030"})


def is_damage(exc: BaseException) -> bool:
    return sqlstate(exc) in DAMAGE
