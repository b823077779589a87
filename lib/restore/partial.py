"""Partial rollback: remove only the rows a migration added (primary keys that are
not in the point), keep every other row as it is, in one transaction."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

from psycopg2 import sql

from lib.errors import ConfigError
from lib.interaction import Reporter
from lib.pg.db import connection, query
from lib.pg.target import Target
from lib.points.catalog import Point
from lib.points.methods import data as data_method
from lib.points.methods.data import Table, _dependency_order
from lib.restore.diff import point_side, primary_key

log = logging.getLogger(__name__)


@dataclass
class PartialPlan:
    tables: list[Table]
    keys: dict[str, list[str]]
    to_delete: dict[str, int]

    def lines(self) -> list[str]:
        return [f"{t.key}: {self.to_delete[t.key]} row(s) added since the point would be deleted" for t in self.tables]


def _in_scope(side_tables: list[Table], current, only: list[str] | None) -> list[Table]:
    present = [t for t in side_tables if query(current, "SELECT to_regclass(%s)", (data_method.quoted(t),))[0][0]]
    if not only:
        return present
    wanted = {t.key for t in data_method.resolve_tables(current, only)}
    unknown = wanted - {t.key for t in present}
    if unknown:
        raise ConfigError(
            "Not in point: " + ", ".join(sorted(unknown)) + ".", "`rollback_manager.py info <id>` lists the point's tables."
        )
    return [t for t in present if t.key in wanted]


def delete_added_rows(target: Target, point: Point, ui: Reporter, *, tables: list[str] | None, confirm) -> dict:
    """``confirm(plan)`` is called with the counts before anything is deleted."""
    with (
        point_side(target, point, ui) as side,
        connection(target.info, autocommit=False, application_name="rollback-toolkit partial rollback") as conn,
    ):
        query(conn, "SET lock_timeout = '60s'")
        scope = _in_scope(side.tables(), conn, tables)
        keys = {t.key: primary_key(conn, t) for t in scope}
        missing_pk = [t.key for t in scope if not keys[t.key]]
        if missing_pk:
            raise ConfigError(
                "Tables without a primary key cannot be rolled back partially: "
                + ", ".join(missing_pk)
                + ". Nothing was changed.",
                "Leave them out with --table for each table to include, or restore the whole point.",
            )
        to_delete: dict[str, int] = {}
        for n, table in enumerate(scope):
            cols = keys[table.key]
            temp = sql.Identifier(f"rb_keys_{n}")
            query(
                conn,
                sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {} FROM ONLY {} WITH NO DATA").format(
                    temp, sql.SQL(", ").join(sql.Identifier(c) for c in cols), table.ident()
                ),
            )
            buffer = io.BytesIO()
            side.rows(table, cols, lambda line, sink=buffer: sink.write(line + b"\n"))
            buffer.seek(0)
            with conn.cursor() as cur:
                cur.copy_expert(sql.SQL("COPY {} FROM STDIN").format(temp).as_string(conn), buffer)
            match = sql.SQL(" AND ").join(sql.SQL("k.{0} = t.{0}").format(sql.Identifier(c)) for c in cols)
            query(conn, sql.SQL("ANALYZE {}").format(temp))
            to_delete[table.key] = query(
                conn,
                sql.SQL("SELECT count(*) FROM ONLY {} t WHERE NOT EXISTS (SELECT 1 FROM {} k WHERE {})").format(
                    table.ident(), temp, match
                ),
            )[0][0]
        found = PartialPlan(scope, keys, to_delete)
        confirm(found)
        deleted: dict[str, int] = {}
        order = list(reversed(_dependency_order(conn, scope)))  # children before the rows they reference
        index = {t.key: n for n, t in enumerate(scope)}
        for table in order:
            cols = keys[table.key]
            temp = sql.Identifier(f"rb_keys_{index[table.key]}")
            match = sql.SQL(" AND ").join(sql.SQL("k.{0} = t.{0}").format(sql.Identifier(c)) for c in cols)
            with conn.cursor() as cur:
                cur.execute(
                    sql.SQL("DELETE FROM ONLY {} t WHERE NOT EXISTS (SELECT 1 FROM {} k WHERE {})").format(
                        table.ident(), temp, match
                    )
                )
                deleted[table.key] = cur.rowcount
        conn.commit()
    return {"deleted": deleted, "tables": [t.key for t in scope]}
