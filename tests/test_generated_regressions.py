"""What the generated schemas (tests/test_generated_schemas.py) found, each as a small
fixed schema named for what it shows, checked by the same round trips: a point taken,
the rows changed, the point restored, the database compared with what it was; or a
reset from V2 compared with V2. A failure here names its cause in its test's name."""

from __future__ import annotations

import pytest

from tests.conftest import _drop_databases_like, get_server, make_staging
from tests.schemas import GeneratedSchema
from tests.test_generated_schemas import (
    POINT,
    assert_point_round_trips,
    assert_reset_copies_v2,
    assert_round_trip,
    assert_same,
    built,
    read_state,
)

ACROSS_MAJORS = pytest.mark.parametrize(
    "v2_major, staging_major", [(15, 18), (18, 15)], ids=["v2_15-staging_18", "v2_18-staging_15"]
)


def fixed(*setup: str, changes: tuple[str, ...] = ()) -> GeneratedSchema:
    return GeneratedSchema(frozenset(), setup, changes)


def point_round_trip(server, tmp_path, method: str, schema: GeneratedSchema) -> None:
    with built(server, tmp_path, schema) as staging:
        assert_point_round_trips(staging, schema, method)


def reset_round_trip(servers, tmp_path, v2_major: int, staging_major: int, schema: GeneratedSchema) -> None:
    with built(get_server(servers, v2_major), tmp_path, schema, "v2gen") as v2:
        staging = make_staging(get_server(servers, staging_major), tmp_path / "staging")
        try:
            assert_reset_copies_v2(v2, staging)
        finally:
            _drop_databases_like(staging.server, staging.name)


# ---------------------------------------------------------------- data points

NOT_VALID_CHECK = fixed(
    "CREATE TABLE readings (id integer PRIMARY KEY, value integer)",
    "INSERT INTO readings VALUES (1, -5), (2, 10)",
    "ALTER TABLE readings ADD CONSTRAINT readings_value_positive CHECK (value > 0) NOT VALID",
    changes=("DELETE FROM readings WHERE id = 2", "INSERT INTO readings VALUES (3, 7)"),
)


def test_a_data_point_restores_old_rows_that_a_not_valid_check_forbids(server, tmp_path):
    point_round_trip(server, tmp_path, "data", NOT_VALID_CHECK)


def test_a_data_point_of_a_database_without_tables_restores_its_sequences(server, tmp_path):
    schema = fixed(
        "CREATE SEQUENCE invoice_no",
        "SELECT setval('invoice_no', 41)",
        changes=("SELECT nextval('invoice_no')",),
    )
    point_round_trip(server, tmp_path, "data", schema)


DOTTED_SCHEMA = fixed(
    'CREATE SCHEMA "sales.eu"',
    'CREATE TABLE "sales.eu".orders (id serial PRIMARY KEY, note text)',
    """INSERT INTO "sales.eu".orders (note) VALUES ('first'), ('second')""",
    changes=('DELETE FROM "sales.eu".orders WHERE id = 1', """INSERT INTO "sales.eu".orders (note) VALUES ('third')"""),
)


def test_a_data_point_restores_a_table_in_a_schema_whose_name_has_a_dot(server, tmp_path):
    point_round_trip(server, tmp_path, "data", DOTTED_SCHEMA)


def test_simple_rollback_restores_a_table_in_a_schema_whose_name_has_a_dot(server, tmp_path):
    with built(server, tmp_path, DOTTED_SCHEMA) as staging:
        assert_round_trip(
            staging,
            DOTTED_SCHEMA,
            take=["simple_rollback.py", "create", "before the changes", "--json"],
            restore=["simple_rollback.py", "restore", POINT, "--yes"],
            what="a simple_rollback.py point",
        )


NO_COLUMNS = fixed(
    "CREATE TABLE heartbeat ()",
    "INSERT INTO heartbeat DEFAULT VALUES",
    "INSERT INTO heartbeat DEFAULT VALUES",
    changes=("INSERT INTO heartbeat DEFAULT VALUES",),
)


def test_a_data_point_restores_a_table_without_columns(server, tmp_path):
    point_round_trip(server, tmp_path, "data", NO_COLUMNS)


def triggers_enabled(mode: str, trigger: str) -> GeneratedSchema:
    """A trigger that session_replication_role = replica does not silence: ENABLE ALWAYS
    fires in every session, ENABLE REPLICA only in replica ones."""
    return fixed(
        "CREATE TABLE orders (id integer PRIMARY KEY, note text)",
        "CREATE TABLE orders_log (what text)",
        "CREATE FUNCTION mark() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.note := NEW.note || ' (marked)'; RETURN NEW; END $$",
        "CREATE FUNCTION log_truncate() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN INSERT INTO orders_log VALUES (TG_OP); RETURN NULL; END $$",
        "INSERT INTO orders VALUES (1, 'first'), (2, 'second')",
        "CREATE TRIGGER mark_orders BEFORE INSERT OR UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION mark()",
        "CREATE TRIGGER log_truncate AFTER TRUNCATE ON orders FOR EACH STATEMENT EXECUTE FUNCTION log_truncate()",
        f"ALTER TABLE orders ENABLE {mode} TRIGGER {trigger}",
        f"ALTER TABLE orders DISABLE TRIGGER {'log_truncate' if trigger == 'mark_orders' else 'mark_orders'}",
        changes=("DELETE FROM orders WHERE id = 1", "INSERT INTO orders VALUES (3, 'third')"),
    )


@pytest.mark.parametrize(
    "mode, trigger",
    [("ALWAYS", "mark_orders"), ("REPLICA", "mark_orders"), ("ALWAYS", "log_truncate")],
    ids=["row-trigger-enabled-always", "row-trigger-enabled-replica", "truncate-trigger-enabled-always"],
)
def test_a_data_point_restore_fires_no_trigger_not_even_one_enabled_always_or_replica(server, tmp_path, mode, trigger):
    point_round_trip(server, tmp_path, "data", triggers_enabled(mode, trigger))


# ---------------------------------------------------------------- dump points


PARTITION_NAMED_LIKE_ITS_PARENT = fixed(
    "CREATE SCHEMA other",
    "CREATE TABLE other.events (id integer NOT NULL, what text) PARTITION BY RANGE (id)",
    "CREATE TABLE public.early PARTITION OF other.events FOR VALUES FROM (MINVALUE) TO (0)",
    "CREATE TABLE public.events PARTITION OF other.events FOR VALUES FROM (0) TO (100)",
    "INSERT INTO other.events VALUES (-1, 'early'), (1, 'first')",
    changes=("DELETE FROM other.events WHERE id = -1", "INSERT INTO other.events VALUES (2, 'second')"),
)


def test_a_dump_point_of_a_partition_named_like_its_parent_restores_on_15_and_is_refused_untouched_on_18(server, tmp_path):
    """On 18 a partition's NOT NULL constraint takes its parent's name: public.early and
    public.events both hold "events_id_not_null". pg_dump leaves the name out for
    public.events (it is that table's default name), so pg_restore, finding it taken in
    the schema, calls it "events_id_not_null1" (a plain pg_dump | pg_restore does the
    same). The rebuilt copy's catalog is then not the point's: the restore is refused
    before the swap, staging untouched, and a template point of it restores exactly."""
    if server.major < 18:
        point_round_trip(server, tmp_path, "dump", PARTITION_NAMED_LIKE_ITS_PARENT)
        return
    with built(server, tmp_path, PARTITION_NAMED_LIKE_ITS_PARENT) as staging:
        point_id = staging.create_point("dump", "--method", "dump")
        for statement in PARTITION_NAMED_LIKE_ITS_PARENT.changes:
            staging.sql(statement)
        changed = read_state(staging)
        refused = staging.run("rollback_manager.py", "restore", point_id, "--yes")
        assert refused.returncode == 3 and "schema digest differs" in refused.stderr and "was not touched" in refused.stderr
        assert_same(changed, read_state(staging), "a refused restore changed staging")
    point_round_trip(server, tmp_path / "template", "template", PARTITION_NAMED_LIKE_ITS_PARENT)


# ---------------------------------------------------------------- reset from V2 across majors


@ACROSS_MAJORS
def test_a_reset_across_majors_copies_a_not_null_column_whose_name_needs_quotes(servers, tmp_path, v2_major, staging_major):
    schema = fixed(
        'CREATE TABLE clients ("client id" integer NOT NULL, name text)',
        "INSERT INTO clients VALUES (1, 'first'), (2, NULL)",
    )
    reset_round_trip(servers, tmp_path, v2_major, staging_major, schema)


@ACROSS_MAJORS
def test_a_reset_across_majors_copies_a_domain_not_null(servers, tmp_path, v2_major, staging_major):
    schema = fixed(
        "CREATE DOMAIN nonempty AS text NOT NULL CHECK (VALUE <> '')",
        "CREATE TABLE notes (id integer PRIMARY KEY, body nonempty)",
        "INSERT INTO notes VALUES (1, 'first')",
    )
    reset_round_trip(servers, tmp_path, v2_major, staging_major, schema)


@ACROSS_MAJORS
def test_a_reset_across_majors_copies_a_schema_whose_name_has_a_dot(servers, tmp_path, v2_major, staging_major):
    reset_round_trip(servers, tmp_path, v2_major, staging_major, DOTTED_SCHEMA)


@ACROSS_MAJORS
def test_a_reset_across_majors_copies_a_table_without_columns(servers, tmp_path, v2_major, staging_major):
    reset_round_trip(servers, tmp_path, v2_major, staging_major, NO_COLUMNS)
