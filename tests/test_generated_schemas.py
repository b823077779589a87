"""Generated hostile schemas (tests/schemas.py), each built in a staging database of its
own: a point of every method (template, dump, data), taken, then the rows changed, then
restored, gives back exactly the database it was taken of; a reset from V2 gives
staging exactly V2, across majors (V2 on 15 and staging on 18, and the other way).
"Exactly" is read by tests/schemas.py's database_state, not by the toolkit's fingerprint.

The ordinary test command runs a few examples, always the same ones (derandomized),
each with every feature of the generator. A larger run draws subsets of the features
too and shrinks a failure to a smallest schema that still fails:

    GENERATED_EXAMPLES=200 ./setup_and_run.sh test tests/test_generated_schemas.py

Every failure these tests found has a small fixed reproducer of its own in
tests/test_generated_regressions.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import closing, contextmanager
from itertools import count
from pathlib import Path

import psycopg2
import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from psycopg2 import sql

from tests.conftest import Server, Staging, _drop_databases_like, get_server, make_staging
from tests.schemas import ALL_FEATURES, GeneratedSchema, database_state, differences, feature_sets, schemas

LARGER_RUN = os.environ.get("GENERATED_EXAMPLES")
DEFAULT_EXAMPLES = 3
# Each example builds databases and runs the toolkit's scripts as processes: seconds, not
# microseconds, so no deadline and no complaint about slow or large examples; the
# server and tmp_path fixtures are shared by a test's examples, each of which makes its
# own database and folder.
EXPENSIVE = [
    HealthCheck.function_scoped_fixture,
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.large_base_example,
]
settings.register_profile(
    "generated-schemas",
    max_examples=DEFAULT_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    phases=(Phase.explicit, Phase.generate),  # a failure is reported as drawn: shrinking would cost minutes
    suppress_health_check=EXPENSIVE,
)
settings.register_profile(
    "generated-schemas-larger",
    max_examples=int(LARGER_RUN or 1),
    database=None,
    deadline=None,
    phases=(Phase.explicit, Phase.generate, Phase.shrink),  # Hypothesis stops shrinking after 5 minutes
    suppress_health_check=EXPENSIVE,
    print_blob=True,
)
PROFILE = settings.get_profile("generated-schemas-larger" if LARGER_RUN else "generated-schemas")
# few examples: each has every feature; many: any subset, which shrinks to the features a failure needs
FEATURES = feature_sets() if LARGER_RUN else st.just(ALL_FEATURES)
METHODS = ["template", "dump", "data"]

_examples = count(1)


@contextmanager
def built(server: Server, folder: Path, schema: GeneratedSchema, prefix: str = "gen") -> Iterator[Staging]:
    """A staging database of its own holding ``schema``, with its own backup and log
    folders; dropped afterwards with the point databases it made, whatever happened."""
    folder = folder / f"example{next(_examples)}"
    staging = make_staging(server, folder, prefix)
    try:
        with closing(server.connect()) as conn, conn.cursor() as cur:
            name = sql.Identifier(staging.name)
            cur.execute(sql.SQL("DROP DATABASE {}").format(name))  # made from the rich template: start empty
            cur.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(name))
        with closing(staging.connect()) as conn, conn.cursor() as cur:
            for statement in schema.setup:
                cur.execute(statement)
        yield staging
    finally:
        _drop_databases_like(server, staging.name)
        shutil.rmtree(folder, ignore_errors=True)


def read_state(staging: Staging, *, portable: bool = False) -> dict:
    with closing(staging.connect()) as conn:
        return database_state(conn, portable=portable)


def change(staging: Staging, schema: GeneratedSchema) -> list[str]:
    """The schema's changes, each on its own; returns those PostgreSQL refused (a delete
    a foreign key forbids, say), which the others make up for."""
    refused = []
    with closing(staging.connect()) as conn, conn.cursor() as cur:
        for statement in schema.changes:
            try:
                cur.execute(statement)
            except psycopg2.Error as exc:
                refused.append(f"{statement}\n  refused: {exc.diag.message_primary}")
    return refused


def said(what: str, result: subprocess.CompletedProcess) -> str:
    return f"{what} failed with exit {result.returncode}:\n{result.stderr[-4000:]}"


def assert_same(expected: dict, actual: dict, what: str) -> None:
    found = differences(expected, actual)
    assert not found, f"{what}:\n" + "\n".join(found[:40]) + (f"\n... {len(found) - 40} more" if len(found) > 40 else "")


POINT = "{point}"  # in a restore command: the id the take command printed


def assert_round_trip(staging: Staging, schema: GeneratedSchema, *, take: list[str], restore: list[str], what: str) -> None:
    """A point taken (``take`` prints its id as JSON), the rows changed, the point
    restored (``restore``, the id in place of POINT): the database as it was."""
    before = read_state(staging)
    taken = staging.run(*take)
    assert taken.returncode == 0, said(f"taking {what}", taken)
    point_id = json.loads(taken.stdout)["id"]
    assert_same(before, read_state(staging), f"taking {what} changed the database")

    refused = change(staging, schema)
    if refused:
        note("changes PostgreSQL refused:\n" + "\n".join(refused))
    if schema.changes:
        assert differences(before, read_state(staging)), "the changes changed nothing: the test would prove nothing"

    restored = staging.run(*(point_id if arg == POINT else arg for arg in restore))
    assert restored.returncode == 0, said(f"restoring {what}", restored)
    assert_same(before, read_state(staging), f"after restoring {what}, the database differs from the point")


def assert_point_round_trips(staging: Staging, schema: GeneratedSchema, method: str) -> None:
    assert_round_trip(
        staging,
        schema,
        take=["create_rollback_point.py", "before the generated changes", "--method", method, "--json"],
        restore=["rollback_manager.py", "restore", POINT, "--yes"],
        what=f"a {method} point",
    )


def assert_reset_copies_v2(v2: Staging, staging: Staging) -> None:
    """reset_staging.py: staging becomes V2, and V2 is only read. Compared as two majors
    can be (database_state's ``portable``)."""
    v2_before = read_state(v2, portable=True)
    result = staging.run("reset_staging.py", "--yes", env={"V2_DATABASE_URL": v2.url})
    assert result.returncode == 0, said("the reset from V2", result)
    assert_same(v2_before, read_state(staging, portable=True), "after the reset, staging differs from V2")
    assert_same(v2_before, read_state(v2, portable=True), "the reset changed V2")


@pytest.mark.parametrize("method", METHODS)
@PROFILE
@given(schema=schemas(FEATURES))
def test_a_point_of_a_generated_schema_restores_it_exactly(server, tmp_path, method, schema):
    with built(server, tmp_path, schema) as staging:
        assert_point_round_trips(staging, schema, method)


@pytest.mark.parametrize("v2_major, staging_major", [(15, 18), (18, 15)], ids=["v2_15-staging_18", "v2_18-staging_15"])
@PROFILE
@given(schema=schemas(FEATURES))
def test_a_reset_from_a_generated_v2_copies_it_exactly_across_majors(servers, tmp_path, v2_major, staging_major, schema):
    with built(get_server(servers, v2_major), tmp_path, schema, "v2gen") as v2:
        staging = make_staging(get_server(servers, staging_major), tmp_path / f"staging{next(_examples)}")
        try:
            assert_reset_copies_v2(v2, staging)
        finally:
            _drop_databases_like(staging.server, staging.name)


UNDO_RUN = "generated-run"
# the generator's triggers write to a table without a key, which makes every such undo
# refuse (as it must; tests/test_undo.py has the tables' own triggers): left out here
UNDO_FEATURES = FEATURES.map(lambda chosen: chosen - {"triggers"})


@PROFILE
@given(schema=schemas(UNDO_FEATURES))
def test_an_undo_of_generated_changes_puts_every_captured_row_back_exactly(server, tmp_path, schema):
    """Every table captured (partitions and inheritance children too), the generated
    changes made by the run's session, then undone: every table with a key holds exactly
    what it held before, byte for byte as its rows print (every type, identity and
    generated columns, rows moved between partitions, rows of inheritance children). A
    change to a table without a key is made by another session, and kept."""
    from lib.undo import capture, revert

    with built(server, tmp_path, schema, "undogen") as staging:
        with closing(staging.connect()) as conn:
            conn.autocommit = True
            usable, without = capture.plan(conn, UNDO_RUN, capture.user_tables(conn))
            capture.install(conn, UNDO_RUN, usable, without_key=without)
        keyless = [".".join('"' + part.replace('"', '""') + '"' for part in w) for w in without]
        captured = [t.qualified for t in usable]
        before = read_state(staging)
        refused = []
        with (
            closing(psycopg2.connect(staging.url, options=capture.session_options(UNDO_RUN))) as run,
            closing(staging.connect()) as other,
        ):
            run.autocommit = other.autocommit = True
            for statement in schema.changes:
                session = other if any(k in statement for k in keyless) else run
                try:
                    with session.cursor() as cur:
                        cur.execute(statement)
                except psycopg2.Error as exc:
                    refused.append(f"{statement}\n  refused: {exc.diag.message_primary}")
        note("changes PostgreSQL refused:\n" + "\n".join(refused))
        changed = read_state(staging)
        moved = [t for t in captured if changed["rows"].get(t) != before["rows"].get(t)]
        with closing(staging.connect()) as conn:
            conn.autocommit = True
            capture.finish(conn, UNDO_RUN)
            written = conn.cursor()
            written.execute("SELECT uncaptured FROM rollback_toolkit.undo_runs")
            uncaptured = written.fetchone()[0]
            assert uncaptured is None, f"the run wrote to {uncaptured}, a table without a key, through no trigger"
            result = revert.undo(conn, UNDO_RUN)
        assert result.applied and not result.conflicts, result.conflicts[:5]
        after = read_state(staging)
        assert moved, "the changes touched no captured table: the test would prove nothing"
        wrong = {
            t: (before["rows"].get(t), after["rows"].get(t)) for t in captured if after["rows"].get(t) != before["rows"].get(t)
        }
        assert not wrong, f"after the undo these tables differ from before the run: {wrong}"
        for t in (f"{s}.{n}" for s, n in without):  # another session's changes stay
            assert after["rows"].get(t) == changed["rows"].get(t), t
