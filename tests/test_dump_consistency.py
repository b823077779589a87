"""Dump points taken while clients write: what the manifest records comes from the
dump's own snapshot (rows, schema, large objects) or from the archive pg_dump wrote
(sequences, which no snapshot holds still), so the point verifies deep and restores
to exactly its snapshot, every sequence at or ahead of its rows."""

from __future__ import annotations

import json
import threading
from contextlib import closing, nullcontext

import pytest
from pyrage import x25519

import create_rollback_point
import rollback_manager
from lib.config import ConnInfo, load_settings
from lib.errors import ToolError
from lib.pg.archive_sequences import archived_positions, setval_positions, split_qualified_name
from lib.pg.db import connection
from lib.pg.fingerprint import qualified, sequence_positions
from lib.pg.tools import command_for, discover
from lib.points.methods import dump
from lib.process import NO_INPUT
from tests.helpers import wait_for

SCHEMA = 'Write "Log".ü'
WRITTEN = """
CREATE SCHEMA "Write ""Log"".ü";
CREATE TABLE "Write ""Log"".ü"."tick.s" (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, n bigint NOT NULL, at timestamptz DEFAULT clock_timestamp()
);
CREATE TABLE public.hits (id serial PRIMARY KEY, what text NOT NULL);
CREATE SEQUENCE "Write ""Log"".ü"."it's a.Seq";
"""
TICKS = '"Write ""Log"".ü"."tick.s"'
OWNED = {'"Write ""Log"".ü"."tick.s_id_seq"': TICKS, "public.hits_id_seq": "public.hits"}


class Writer:
    """Inserts into two tables (an identity column, a serial one) and advances a
    sequence that has no rows, one autocommitted statement at a time, until stopped."""

    def __init__(self, staging) -> None:
        self.conn = staging.connect()
        self.done = threading.Event()
        self.inserted = 0
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        try:
            with self.conn.cursor() as cur:
                while not self.done.is_set():
                    cur.execute(f"INSERT INTO {TICKS} (n) VALUES (%s)", (self.inserted,))
                    cur.execute("INSERT INTO public.hits (what) VALUES ('x')")
                    cur.execute("""SELECT nextval('"Write ""Log"".ü"."it''s a.Seq"')""")
                    self.inserted += 1
        except BaseException as exc:  # noqa: BLE001 - reported when it stops
            self.errors.append(exc)

    def __enter__(self) -> Writer:
        self.thread.start()
        wait_for(lambda: self.inserted > 50 or self.errors, timeout=30, what="the writer's first rows")
        return self

    def __exit__(self, *exc) -> None:
        before = self.inserted
        wait_for(lambda: self.inserted > before + 20 or self.errors, timeout=30, what="more rows after the point")
        self.done.set()
        self.thread.join(timeout=30)
        self.conn.close()
        assert not self.errors, self.errors


def rows(staging, table: str) -> list[tuple]:
    with closing(staging.connect()) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT * FROM {table} ORDER BY id")
        return cur.fetchall()


def sequences_now(staging) -> dict[str, list]:
    with connection(ConnInfo.parse(staging.url)) as conn:
        return sequence_positions(conn)


def restores_to_its_snapshot(staging, point_id: str) -> None:
    """verify --deep passes; the restore gives the snapshot's rows exactly (the writer
    committed one row per statement, so the snapshot saw a prefix of them), the
    sequences the archive set, and every owned sequence at or ahead of its rows."""
    manifest = json.loads((staging.backup_dir / point_id / "manifest.json").read_text())
    counted = manifest["fingerprint"]["row_counts"]
    deep = staging.run("rollback_manager.py", "verify", point_id, "--deep")
    assert deep.returncode == 0, deep.stdout + deep.stderr

    live = {table: rows(staging, table) for table in (TICKS, "public.hits")}
    result = staging.run("rollback_manager.py", "restore", point_id, "--yes")
    assert result.returncode == 0, result.stdout + result.stderr

    for table, key in ((TICKS, qualified(SCHEMA, "tick.s")), ("public.hits", qualified("public", "hits"))):
        restored = rows(staging, table)
        assert len(restored) == counted[key] and 0 < len(restored) < len(live[table]), table
        assert restored == live[table][: len(restored)], table
    now = sequences_now(staging)
    if "sequences" in manifest["fingerprint"]:
        assert now == manifest["fingerprint"]["sequences"]
    with closing(staging.connect()) as conn, conn.cursor() as cur:
        for seq, table in OWNED.items():
            cur.execute(f"SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM {seq}")
            position = cur.fetchone()[0]
            cur.execute(f"SELECT coalesce(max(id), 0) FROM {table}")
            assert position >= cur.fetchone()[0], seq


@pytest.fixture
def age_keys(tmp_path) -> dict[str, str]:
    identity = x25519.Identity.generate()
    key = tmp_path / "key.txt"
    key.write_text(f"{identity}\n")
    key.chmod(0o600)
    return {"ROLLBACK_ENCRYPT_TO": str(identity.to_public()), "ROLLBACK_DECRYPT_KEY_FILE": str(key)}


def test_a_dump_point_taken_under_constant_inserts_verifies_deep_and_restores_its_snapshot(staging):
    """The bug this guards: sequences read in the toolkit's own session at another moment
    than pg_dump's made verify --deep and every restore fail ('[31, True] recorded,
    [33, True] found', exit 3) although the point was listed as complete."""
    staging.sql(WRITTEN)
    with Writer(staging):
        point_id = staging.create_point("under writes", "--method", "dump")
    manifest = json.loads((staging.backup_dir / point_id / "manifest.json").read_text())
    assert manifest["fingerprint"]["sequences_from"] == "archive"
    assert manifest["fingerprint"]["sequences"][qualified(SCHEMA, "it's a.Seq")][0] > 50
    restores_to_its_snapshot(staging, point_id)


def test_an_encrypted_dump_point_under_constant_inserts_records_the_sequences_its_archive_sets(staging, age_keys):
    """No plaintext on disk and no key at take time: the sequences are read from the
    archive's head while it passes into age, in memory."""
    staging.sql(WRITTEN)
    staging.env.update(age_keys)
    with Writer(staging):
        point_id = staging.create_point("encrypted under writes", "--method", "dump", "--encrypt")
    manifest = json.loads((staging.backup_dir / point_id / "manifest.json").read_text())
    assert manifest["encryption"]["format"] == "age"
    assert manifest["fingerprint"]["sequences_from"] == "archive"
    assert len(manifest["fingerprint"]["sequences"]) >= 3
    assert all(p.name.endswith(".age") for p in (staging.backup_dir / point_id).iterdir() if p.name != "manifest.json")
    restores_to_its_snapshot(staging, point_id)


@pytest.mark.servers(18)
def test_an_encrypted_point_whose_table_of_contents_outgrows_the_kept_head_says_so_and_still_restores(
    staging, age_keys, monkeypatch, capsys
):
    """Past the head kept in memory, the sequences are not recorded: the manifest says
    why, info shows it, and verify --deep and the restore compare everything else."""
    staging.sql(WRITTEN)
    for key, value in age_keys.items():
        monkeypatch.setenv(key, value)
    staging.env.update(age_keys)
    monkeypatch.setattr(dump, "HEAD_LIMIT", 4096)
    with Writer(staging):
        assert create_rollback_point.main(["small head", "--method", "dump", "--encrypt", "--json"]) == 0
    point_id = json.loads(capsys.readouterr().out)["id"]
    manifest = json.loads((staging.backup_dir / point_id / "manifest.json").read_text())
    assert "sequences" not in manifest["fingerprint"]
    assert "table of contents is longer than the 4.0 KiB" in manifest["fingerprint"]["sequences_not_recorded"]
    assert rollback_manager.main(["info", point_id]) == 0
    assert "not recorded: the archive's table of contents is longer" in " ".join(capsys.readouterr().out.split())
    restores_to_its_snapshot(staging, point_id)


@pytest.mark.servers(15)
def test_an_archive_of_a_newer_pg_dump_is_read_back_by_a_pg_restore_that_can(staging, tmp_path):
    """pg_dump 18 against a PostgreSQL 15 server writes an archive pg_restore 15 refuses
    ('unsupported version (1.16) in file header'): the next candidate reads it."""
    settings = load_settings()
    restores = sorted(discover("pg_restore", settings)[0], key=lambda t: t.major)
    dumps = {t.major: t for t in discover("pg_dump", settings)[0]}
    assert {15, 18} <= {t.major for t in restores} and 18 in dumps
    staging.sql(
        WRITTEN + """SELECT setval('public.hits_id_seq', 41); SELECT setval('"Write ""Log"".ü"."it''s a.Seq"', 7, false)"""
    )
    archive = tmp_path / "18.dump"
    pg_dump = command_for(dumps[18], conn=ConnInfo.parse(staging.url))
    pg_dump.run(pg_dump.archive(snapshot=None, file=str(archive)))
    reader, positions = archived_positions(restores, lambda: nullcontext(([str(archive)], NO_INPUT)))
    assert reader.major >= 18
    assert positions == sequences_now(staging)
    assert positions[qualified("public", "hits_id_seq")] == [41, True]
    assert positions[qualified(SCHEMA, "it's a.Seq")] == [7, False]
    older = [t for t in restores if t.major < 18]
    with pytest.raises(ToolError, match="refused on version grounds"):
        archived_positions(older, lambda: nullcontext(([str(archive)], NO_INPUT)))


# ------------------------------------------------------------------ the script's reader


@pytest.mark.unit
@pytest.mark.parametrize(
    "text, parts",
    [
        ("public.t_id_seq", ("public", "t_id_seq")),
        ('"Write ""Log"".ü"."it\'s a.Seq"', ('Write "Log".ü', "it's a.Seq")),
        ('public."a\nb"', ("public", "a\nb")),
        ('"Sales Ops"."Order ""Lines"" Ü"', ("Sales Ops", 'Order "Lines" Ü')),
        ('"."."."', (".", ".")),
    ],
)
def test_a_qualified_name_is_split_as_postgresql_reads_it(text, parts):
    assert split_qualified_name(text) == parts


@pytest.mark.unit
@pytest.mark.parametrize("text", ["plain", '"unterminated.x'])
def test_a_name_that_is_not_qualified_is_refused(text):
    with pytest.raises(ToolError):
        split_qualified_name(text)


SCRIPT = """--
-- PostgreSQL database dump
--

\\restrict p4unjSdsQAoYo3NpeSczidOUULBNLKdg6ebduNZPGoqaXuNMjt7hjgNjbfJLgcT

SET statement_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);

--
-- Name: SELECT pg_catalog.setval('public.fake', 9, true); Type: SEQUENCE SET; Schema: public; Owner: o
--

SELECT pg_catalog.setval('"Write ""Log"".ü"."it''s a.Seq"', 1, false);
SELECT pg_catalog.setval('public."SELECT pg_catalog.setval(_id_seq"', 31, true);
SELECT pg_catalog.setval('public."a
b"', -5, true);
SELECT pg_catalog.setval('public."back\\slash"', 9223372036854775807, true);
/* a comment /* nested */ SELECT pg_catalog.setval('public.fake', 1, true); */
SET standard_conforming_strings = off;
SELECT pg_catalog.setval('public."two\\\\slashes"', 3, false);
SELECT pg_catalog.setval(E'public."e\\'quote"', 4, true);
SELECT setval('public.short', 12);

\\unrestrict p4unjSdsQAoYo3NpeSczidOUULBNLKdg6ebduNZPGoqaXuNMjt7hjgNjbfJLgcT
"""


@pytest.mark.unit
def test_the_setvals_of_a_script_are_read_as_postgresql_reads_them():
    assert setval_positions(SCRIPT.encode()) == {
        qualified('Write "Log".ü', "it's a.Seq"): [1, False],
        qualified("public", "SELECT pg_catalog.setval(_id_seq"): [31, True],
        qualified("public", "a\nb"): [-5, True],
        qualified("public", "back\\slash"): [9223372036854775807, True],
        qualified("public", "two\\slashes"): [3, False],
        qualified("public", "e'quote"): [4, True],
        qualified("public", "short"): [12, True],
    }


@pytest.mark.unit
def test_a_script_in_another_encoding_is_read_in_that_encoding():
    script = "SET client_encoding = 'LATIN1';\nSELECT pg_catalog.setval('public.\"größe\"', 2, true);\n".encode("latin-1")
    assert setval_positions(script) == {qualified("public", "größe"): [2, True]}


@pytest.mark.unit
def test_a_setval_of_another_shape_is_refused_rather_than_guessed():
    with pytest.raises(ToolError, match="does not understand"):
        setval_positions(b"SELECT pg_catalog.setval('public.s', 1 + 1, true);")
