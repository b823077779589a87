"""The toolkit's main promise across PostgreSQL majors, for real: a point dumped on one
major restores on every other, with whatever client tools this machine has (here
Debian's 15 and the embedded 18: an 18 archive reaches a 14 server as SQL, filtered).
Every major the machine has takes part; 15 and 18 always."""

from __future__ import annotations

import itertools
import json

import pytest

from lib.config import ConnInfo
from lib.pg.db import connection
from lib.pg.fingerprint import portable_schema_lines
from tests.conftest import MATRIX
from tests.helpers import deep_state

PAIRS = list(itertools.permutations(MATRIX, 2))


def state(staging) -> dict:
    """Rows, content, sequences, large objects, and the schema as both majors print it
    alike; a materialized view's content only by its row count (see test_reset)."""
    found = deep_state(staging.server, staging.name)
    with connection(ConnInfo.parse(staging.url)) as conn:
        found["schema"] = portable_schema_lines(conn)
    found.pop("schema_digest"), found.pop("schema_objects")  # 18 counts its NOT NULL constraints
    found["content"] = {k: v for k, v in found["content"].items() if k != "public.city_stats"}
    return found


@pytest.mark.parametrize("source, target", PAIRS, ids=[f"{a}-to-{b}" for a, b in PAIRS])
def test_a_point_dumped_on_one_major_restores_exactly_on_another(servers, new_staging, source, target):
    src = new_staging(servers.get(source), "src", core_only=True)
    dst = new_staging(servers.get(target), "dst", core_only=True)
    dst.sql("DELETE FROM customers WHERE id > 10; CREATE TABLE leftover (id int)")
    point = src.run_json("create_rollback_point.py", "matrix", "--method", "dump")
    archive = src.backup_dir / point["id"] / "database.dir"
    result = dst.run("rollback_manager.py", "restore", "--type", "backup", "--file", str(archive), "--yes", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["verified"].startswith("tables: ")
    assert state(dst) == state(src)
