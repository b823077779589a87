"""Every database the toolkit creates is recorded before it exists, and dropped when
what created it fails; what a killed run leaves is found again by that record."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from psycopg2 import sql

from lib.pg.db import drop_database, execute
from lib.pg.target import Target
from lib.points.catalog import Catalog

log = logging.getLogger(__name__)

MARKER = "rollback-toolkit catalog"  # in the comment of every database a catalog creates: "<MARKER> <id>"


def marker(catalog: Catalog) -> str:
    return f"{MARKER} {catalog.id}"


@dataclass
class NewDatabase:
    name: str
    record: Path
    owned: bool = False

    def own(self) -> None:
        """From here on the database belongs to a listed point or is staging: never dropped on failure."""
        self.owned = True


@contextmanager
def new_database(target: Target, name: str, purpose: str, *, point_id: str | None = None) -> Iterator[NewDatabase]:
    """Around the creation of ``name``: its record is written first, in the catalog of
    BACKUP_DIR; a failure before ``own()`` drops the database; the record goes once the
    database is owned or gone (it stays, for cleanup, when even the drop failed)."""
    catalog = Catalog(target.settings.backup_dir)
    record = catalog.intend(
        name, purpose=purpose, server=target.facts.system_identifier, staging=target.dbname, point_id=point_id
    )
    db = NewDatabase(name, record)
    try:
        yield db
    except BaseException:
        settled = db.owned
        if not db.owned:
            try:
                drop_database(target.maint, name)
                settled = True
            except Exception as exc:  # noqa: BLE001 - keep the original error; cleanup finds it by its record
                log.error("could not drop %s after a failure (%s); `rollback_manager.py cleanup` removes it", name, exc)
        if settled:
            catalog.settle(record)
        raise
    catalog.settle(record)


def mark(target: Target, name: str, what: str) -> None:
    """The comment that ties a new database to its catalog."""
    text = f"{marker(Catalog(target.settings.backup_dir))}: {what}"
    execute(target.maint, sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(text)))
