"""Everything a database carries comes back: PostgreSQL keys the database's own settings,
its roles' settings in it, its rights and comment by the database's oid, so a swap by
rename would leave them with the database swapped out. Replication slots and
subscriptions cannot follow at all: they are named and refused unless forced."""

from __future__ import annotations

import json
from contextlib import closing

import pytest

from tests.test_restore import MIGRATION

ROLE = "rollback_test_app"


def _role(staging) -> None:
    staging.sql(
        f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}') THEN CREATE ROLE {ROLE}; END IF; END $$"
    )


def carried(staging) -> dict:
    """What the database carries outside its own catalogs."""
    rows = staging.sql(
        """
        SELECT coalesce(pg_get_userbyid(nullif(s.setrole, 0)), '(database)'), s.setconfig
          FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase
         WHERE d.datname = current_database() ORDER BY 1"""
    )
    db = staging.sql(
        """
        SELECT shobj_description(d.oid, 'pg_database'), d.datconnlimit,
               (SELECT array_agg(a.grantee::regrole::text || ':' || a.privilege_type ORDER BY a.grantee::regrole::text, a.privilege_type)
                  FROM aclexplode(d.datacl) a)
          FROM pg_database d WHERE d.datname = current_database()"""
    )[0]
    return {"settings": {role: sorted(cfg) for role, cfg in rows}, "comment": db[0], "connection_limit": db[1], "acl": db[2]}


def _give_properties(staging) -> None:
    _role(staging)
    name = staging.name
    staging.sql(f"""ALTER ROLE {ROLE} IN DATABASE "{name}" SET search_path = "Sales Ops", public""")
    staging.sql(f"ALTER ROLE {ROLE} IN DATABASE \"{name}\" SET statement_timeout = '45s'")
    staging.sql(f'ALTER DATABASE "{name}" SET search_path = "$user", public, "Sales Ops"')
    staging.sql(f"ALTER DATABASE \"{name}\" SET work_mem = '8MB'")
    staging.sql(f'GRANT CONNECT, TEMPORARY ON DATABASE "{name}" TO {ROLE}')
    staging.sql(f"COMMENT ON DATABASE \"{name}\" IS 'staging for the V2 import'")
    staging.sql(f'ALTER DATABASE "{name}" WITH CONNECTION LIMIT 77')


def _change_properties(staging) -> None:
    name = staging.name
    staging.sql(f'ALTER ROLE {ROLE} IN DATABASE "{name}" RESET ALL')
    staging.sql(f"ALTER DATABASE \"{name}\" SET work_mem = '1MB'")
    staging.sql(f'REVOKE TEMPORARY ON DATABASE "{name}" FROM {ROLE}')
    staging.sql(MIGRATION)


@pytest.mark.parametrize("method", ["template", "dump"])
def test_settings_of_the_database_and_of_its_roles_come_back_with_a_restore(staging, method):
    _give_properties(staging)
    at_point = carried(staging)
    assert at_point["settings"][ROLE] == ['search_path="Sales Ops", public', "statement_timeout=45s"]
    point_id = staging.create_point("props", "--method", method)
    _change_properties(staging)
    assert carried(staging) != at_point
    result = staging.run("rollback_manager.py", "restore", point_id, "--yes")
    assert result.returncode == 0, result.stderr
    assert carried(staging) == at_point
    stored = dict(s.split("=", 1) for s in at_point["settings"]["(database)"])
    assert stored["search_path"] == '"$user", public, "Sales Ops"'


def test_a_quick_rollback_through_the_spare_and_a_reset_keep_them_too(staging, new_staging):
    _give_properties(staging)
    at_point = carried(staging)
    staging.create_point("props", "--method", "template")
    _change_properties(staging)
    quick = staging.run("quick_rollback.py", "--yes", env={"ROLLBACK_SPARE": "1"})
    assert quick.returncode == 0, quick.stderr
    assert carried(staging) == at_point
    v2 = new_staging(staging.server, "v2props")
    reset = staging.run("reset_staging.py", "--yes", env={"V2_DATABASE_URL": v2.url})
    assert reset.returncode == 0, reset.stderr
    assert carried(staging) == at_point  # staging's own properties stay: only its contents come from V2


def _subscription(staging, name: str) -> None:
    with closing(staging.connect()) as conn, conn.cursor() as cur:
        cur.execute(
            f"CREATE SUBSCRIPTION {name} CONNECTION 'host=127.0.0.1 port=1 dbname=nowhere' PUBLICATION p "
            "WITH (connect = false, enabled = false, create_slot = false, slot_name = NONE)"
        )


def _drop_ties(server, dbname: str) -> None:
    with closing(server.connect(dbname)) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT subname FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid WHERE d.datname = %s", (dbname,)
        )
        for (sub,) in cur.fetchall():
            cur.execute(f"DROP SUBSCRIPTION {sub}")
        cur.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = %s", (dbname,))


def test_replication_slots_and_subscriptions_are_named_and_refused_unless_forced(staging):
    point_id = staging.create_point("before ties", "--method", "template")
    slot, sub = f"slot_{staging.name}"[:60], f"sub_{staging.name}"[:60]
    staging.sql("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    _subscription(staging, sub)
    staging.sql("DELETE FROM documents")
    try:
        refused = staging.run("rollback_manager.py", "restore", point_id, "--yes")
        assert refused.returncode == 2, refused.stderr
        assert f"logical replication slot '{slot}'" in refused.stderr and f"subscription '{sub}'" in refused.stderr
        assert "--force" in refused.stderr and "Nothing was changed" in refused.stderr
        assert staging.sql("SELECT count(*) FROM documents")[0][0] == 0
        quick = staging.run("quick_rollback.py", "--yes")
        assert quick.returncode == 2 and "--force" in quick.stderr

        forced = staging.run("rollback_manager.py", "restore", point_id, "--yes", "--force", "--json")
        assert forced.returncode == 0, forced.stderr
        before = json.loads(forced.stdout)["before_point_id"]
        old_db = staging.run_json("rollback_manager.py", "info", before)["template_database"]
        assert staging.sql("SELECT count(*) FROM documents")[0][0] == 2
        assert staging.sql("SELECT database FROM pg_replication_slots WHERE slot_name = %s", (slot,))[0][0] == old_db
        assert (
            staging.sql(
                "SELECT d.datname FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid WHERE s.subname = %s", (sub,)
            )[0][0]
            == old_db
        )
    finally:
        for db in [r[0] for r in staging.sql("SELECT database FROM pg_replication_slots WHERE slot_name = %s", (slot,))]:
            staging.sql(f'ALTER DATABASE "{db}" WITH ALLOW_CONNECTIONS true')
            _drop_ties(staging.server, db)
        _drop_ties(staging.server, staging.name)
