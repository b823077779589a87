"""pitr points on pgBackRest: PostgreSQL 15 from Debian, pgBackRest from Debian, a
posix repository (and an S3 one, on an S3 emulator over TLS). Each cluster here is
its own, with WAL archiving into its own repository; as root, the cluster and
pgBackRest run as the postgres user, as they would on a server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg2
import pytest

from lib.config import ConnInfo
from lib.sandbox.servers import LocalServer, debian_bin_dir, free_port, scratch_parent, server_account
from tests.conftest import ROOT, Server, Staging, _prepare, make_staging
from tests.helpers import deep_state, wait_for

STANZA = "staging"


@dataclass
class Cluster:
    server: Server
    folder: Path
    config: Path

    @property
    def env(self) -> dict[str, str]:
        return {"PGBACKREST_STANZA": STANZA, "PGBACKREST_CONFIG": str(self.config)}

    def backrest(self, *args: str) -> subprocess.CompletedProcess:
        """pgbackrest as the cluster's owner, as an operator would run it."""
        account = server_account()
        command = ["pgbackrest", f"--config={self.config}", f"--stanza={STANZA}", *args]
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            user=account.pw_uid if account else None,
            group=account.pw_gid if account else None,
            cwd="/",
        )

    def staging(self, tmp_path: Path) -> Staging:
        s = make_staging(self.server, tmp_path)
        s.env.update(self.env, ROLLBACK_METHOD="pitr", PITR_SIDE_DIR=str(self.folder))
        return s


def _own(path: Path) -> None:
    account = server_account()
    if account is not None:
        os.chown(path, account.pw_uid, account.pw_gid)


@contextmanager
def pitr_cluster(repo_lines: list[str], *, extra_env: dict[str, str] | None = None) -> Iterator[Cluster]:
    """A PostgreSQL 15 cluster archiving into a pgBackRest stanza, with a first full backup."""
    if debian_bin_dir(15) is None or shutil.which("pgbackrest") is None:
        pytest.fail("the pitr tests need Debian's postgresql-15 and pgbackrest: ./setup_and_run.sh test installs them")
    account = server_account()
    folder = Path(tempfile.mkdtemp(prefix="rollback-pitr-", dir=scratch_parent(account)))
    folder.chmod(0o755)
    _own(folder)
    config = folder / "pgbackrest.conf"
    local = LocalServer(debian_bin_dir(15), folder / "server", fast=False)
    archive_push = f"pgbackrest --config={config} --stanza={STANZA} archive-push %p"
    local.settings = ["archive_mode = on", f"archive_command = '{archive_push}'", "wal_level = replica"]
    config.write_text(
        "\n".join(
            [
                "[global]",
                *repo_lines,
                f"log-path={folder}/log",
                f"lock-path={folder}/lock",
                "start-fast=y",
                "repo1-retention-full=100",
                "log-level-console=warn",
                f"[{STANZA}]",
                f"pg1-path={local.data_dir}",
                f"pg1-port={local.port}",
                f"pg1-socket-path={local.base_dir}",
                "pg1-user=postgres",
            ]
        )
        + "\n"
    )
    config.chmod(0o600)
    _own(config)
    for sub in ("log", "lock"):
        (folder / sub).mkdir()
        _own(folder / sub)
    local.init()
    hba = local.data_dir / "pg_hba.conf"
    hba.write_text("local all postgres peer\n" + hba.read_text())  # pgBackRest, as the OS user postgres
    local.start()
    server = Server("15pitr", 15, ConnInfo.parse(local.url()), local, local.bin_dir)
    cluster = Cluster(server, folder, config)
    try:
        _prepare(server)
        for step in (["stanza-create"], ["check"], ["--type=full", "backup"]):
            done = cluster.backrest(*step)
            assert done.returncode == 0, (step, done.stderr, done.stdout)
        yield cluster
    finally:
        local.destroy()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    repo = Path(tempfile.mkdtemp(prefix="rollback-pitr-repo-", dir=scratch_parent(server_account())))
    repo.chmod(0o750)
    _own(repo)
    try:
        with pitr_cluster([f"repo1-path={repo}"]) as made:
            made.repo = repo  # type: ignore[attr-defined]
            yield made
    finally:
        shutil.rmtree(repo, ignore_errors=True)


# ------------------------------------------------------------------ which backups lead to a timeline


def test_a_backup_past_a_branch_does_not_lead_to_the_new_timeline():
    from lib.pg.backrest import Backup, parse_history

    def backup(timeline: int, stop: str) -> Backup:
        return Backup(f"b-{timeline}-{stop}", "incr", stop, stop, 0, 0, 0, timeline)

    # timeline 3 branched from 2 at 0/7000000, which branched from 1 at 0/5000100
    history = parse_history(3, '1\t0/5000100\tat restore point "a"\n\n2\t0/7000000\tbefore 2026-11-22 04:00:00+00\n')
    assert history.holds(backup(3, "0/8000000"))
    assert history.holds(backup(1, "0/5000100")) and not history.holds(backup(1, "0/5000200"))
    assert history.holds(backup(2, "0/6000000")) and not history.holds(backup(2, "0/7000100"))
    assert not history.holds(backup(4, "0/1000000"))  # a timeline that is not an ancestor
    parent = history.parent()
    assert parent.current == 2 and parent.holds(backup(2, "0/7000100")) and not parent.holds(backup(3, "0/8000000"))
    assert parse_history(1, "").holds(backup(1, "0/1")) and not parse_history(1, "").holds(backup(2, "0/1"))


# ------------------------------------------------------------------ taking and restoring


def test_a_point_then_changes_then_restore_beside_gives_the_point_back_exactly(cluster, tmp_path):
    staging = cluster.staging(tmp_path)
    staging.sql("SELECT nextval('customers_id_seq')")
    created = staging.run("create_rollback_point.py", "Before clients import", "--json")
    assert created.returncode == 0, created.stderr
    assert "they come back empty from any pitr restore" in created.stderr and "public.scratch" in created.stderr
    made = json.loads(created.stdout)
    assert made["method"] == "pitr"
    manifest = json.loads((Path(made["path"]) / "manifest.json").read_text())
    assert manifest["restore_point"]["name"] == made["id"] and manifest["backup"]["label"]
    at_point = deep_state(staging.server, staging.name)
    staging.sql("DELETE FROM customers WHERE id > 100")
    staging.sql("INSERT INTO customers (name, email) SELECT 'late ' || g, 'late' || g || '@x' FROM generate_series(1, 50) g")
    restored = staging.run("rollback_manager.py", "restore", made["id"], "--yes", "--json")
    assert restored.returncode == 0, restored.stderr
    outcome = json.loads(restored.stdout)
    assert outcome["mode"] == "pitr beside" and outcome["before_point_id"]
    # sequences too: set back to the point's, not 32 ahead; the UNLOGGED table comes back empty, as warned
    after = deep_state(staging.server, staging.name)
    assert after["row_counts"].pop("public.scratch") == 0
    assert _without("public.scratch", after) == _without("public.scratch", at_point)
    assert not list(cluster.folder.glob("rollback-side-*")), "the side cluster is removed afterwards"
    assert _root_owned(cluster) == []
    listed = {p["id"]: p for p in staging.run_json("rollback_manager.py", "list")}
    assert listed[made["id"]]["method"] == "pitr"
    verified = staging.run_json("rollback_manager.py", "verify", made["id"])
    assert verified["verified"] is True and verified["backup"] == manifest["backup"]["label"]


def _without(table: str, state: dict) -> dict:
    """The state without one table (an UNLOGGED one, which no WAL restores)."""
    return {k: ({t: v for t, v in val.items() if t != table} if isinstance(val, dict) else val) for k, val in state.items()}


def _root_owned(cluster: Cluster) -> list[str]:
    if os.geteuid() != 0:
        return []
    found = subprocess.run(
        ["find", str(cluster.repo), str(cluster.server.local.data_dir), "-uid", "0"], capture_output=True, text=True
    )
    return found.stdout.split()


def test_a_point_after_a_swap_takes_a_backup_first(cluster, tmp_path):
    """Every swap gives staging a new oid, which the repository's backups do not hold yet."""
    staging = cluster.staging(tmp_path)
    first = staging.run_json("create_rollback_point.py", "first")
    staging.sql("DELETE FROM customers WHERE id > 200")
    assert staging.run("rollback_manager.py", "restore", first["id"], "--yes").returncode == 0
    second = staging.run("create_rollback_point.py", "after the swap", "--json")
    assert second.returncode == 0, second.stderr
    assert "No backup in stanza 'staging' holds" in second.stderr and "an incremental backup first" in second.stderr


def test_to_time_restores_any_moment_the_repository_covers(cluster, tmp_path):
    staging = cluster.staging(tmp_path)
    staging.run_json("create_rollback_point.py", "so that a backup holds this database")
    staging.sql("DELETE FROM customers WHERE id > 250")
    time.sleep(1.1)
    moment = datetime.now(UTC)
    at_moment = deep_state(staging.server, staging.name)
    time.sleep(1.1)
    staging.sql("DELETE FROM customers WHERE id > 50")
    latest = deep_state(staging.server, staging.name)
    # a moment after the last commit: the WAL up to now is archived first, and nothing is lost
    now = staging.run("rollback_manager.py", "restore", "--to-time", datetime.now(UTC).isoformat(sep=" "), "--yes")
    assert now.returncode == 0, now.stderr
    state = _without("public.scratch", deep_state(staging.server, staging.name))
    assert _without_sequences(state) == _without_sequences(_without("public.scratch", latest))
    restored = staging.run("rollback_manager.py", "restore", "--to-time", moment.isoformat(sep=" "), "--yes")
    assert restored.returncode == 0, restored.stderr
    # a moment has no recorded sequences: recovery leaves them where it does (never behind)
    state = _without("public.scratch", deep_state(staging.server, staging.name))
    assert _without_sequences(state) == _without_sequences(_without("public.scratch", at_moment))

    unchanged = deep_state(staging.server, staging.name)
    early = staging.run("rollback_manager.py", "restore", "--to-time", "2001-01-01 00:00:00+00", "--yes")
    assert early.returncode == 2 and "outside what the repository covers" in early.stderr
    naive = staging.run("rollback_manager.py", "restore", "--to-time", "2026-01-01 00:00:00", "--yes")
    assert naive.returncode == 2 and "no time zone" in naive.stderr
    before_backups = staging.run("rollback_manager.py", "restore", "--to-lsn", "0/10", "--yes")
    assert before_backups.returncode == 2 and "outside what the repository covers" in before_backups.stderr
    not_an_lsn = staging.run("rollback_manager.py", "restore", "--to-lsn", "yesterday", "--yes")
    assert not_an_lsn.returncode == 2 and "is not an LSN" in not_an_lsn.stderr
    assert deep_state(staging.server, staging.name) == unchanged  # nothing refused touched staging


def _without_sequences(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "sequences"}


def test_broken_archiving_refuses_the_point_and_lists_nothing(cluster, tmp_path):
    staging = cluster.staging(tmp_path)
    first = staging.run_json("create_rollback_point.py", "while archiving works")  # a backup holds staging now
    with closing(cluster.server.connect()) as conn, conn.cursor() as cur:
        cur.execute("SHOW archive_command")
        working = cur.fetchone()[0]
        cur.execute("ALTER SYSTEM SET archive_command = 'false'")
        cur.execute("SELECT pg_reload_conf()")
    try:
        made = staging.run("create_rollback_point.py", "doomed", env={"PITR_ARCHIVE_TIMEOUT": "3"})
        assert made.returncode == 1
        assert "was not archived within 3 s" in made.stderr and "Nothing was listed" in made.stderr
        assert [p["id"] for p in staging.run_json("rollback_manager.py", "list")] == [first["id"]]
        other = cluster.staging(tmp_path / "other")  # a database no backup holds: the backup it needs fails
        refused = other.run("create_rollback_point.py", "doomed too")
        assert refused.returncode == 1 and "could not take the backup this point needs" in refused.stderr
        assert "archive_command" in refused.stderr and other.run_json("rollback_manager.py", "list") == []
    finally:
        with closing(cluster.server.connect()) as conn, conn.cursor() as cur:
            cur.execute("ALTER SYSTEM SET archive_command = %s", (working,))
            cur.execute("SELECT pg_reload_conf()")


def test_without_pgbackrest_or_its_stanza_the_point_is_refused_with_the_fix(cluster, tmp_path):
    staging = cluster.staging(tmp_path)
    empty = tmp_path / "empty-path"
    empty.mkdir()
    missing = staging.run("create_rollback_point.py", "x", env={"PATH": str(empty)})
    assert missing.returncode == 1 and "apt-get install pgbackrest" in missing.stderr
    wrong = staging.run("create_rollback_point.py", "x", env={"PGBACKREST_STANZA": "nope"})
    assert wrong.returncode == 2 and "stanza 'nope'" in wrong.stderr and "stanza-create" in wrong.stderr
    unset = staging.run("create_rollback_point.py", "x", env={"PGBACKREST_STANZA": ""})
    assert unset.returncode == 2 and "PGBACKREST_STANZA is not set" in unset.stderr
    assert staging.run_json("rollback_manager.py", "list") == []
    checked = json.loads(staging.run("check_setup.py", "--json").stdout)
    pitr = next(f for f in checked if f["item"] == "pitr points")
    assert pitr["status"] in ("ok", "warn") and "stanza staging" in pitr["detail"]


def test_a_side_server_killed_half_way_is_removed_by_cleanup(cluster, tmp_path):
    staging = cluster.staging(tmp_path)
    made = staging.run_json("create_rollback_point.py", "before")
    before = deep_state(staging.server, staging.name)
    ready = tmp_path / "ready"
    env = {**staging.env, "ROLLBACK_FAULT_PAUSE": "side server up", "ROLLBACK_FAULT_READY": str(ready)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "rollback_manager.py"), "restore", made["id"], "--yes"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(ready.exists, timeout=120, what="the restore to bring its side server up", process=proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    sides = list(cluster.folder.glob("rollback-side-*"))
    assert len(sides) == 1 and (sides[0] / "data" / "postmaster.pid").exists()
    cleaned = staging.run("rollback_manager.py", "cleanup", "--yes")
    assert cleaned.returncode == 0, cleaned.stderr
    assert "the server restored beside staging" in cleaned.stderr
    assert not list(cluster.folder.glob("rollback-side-*"))
    assert deep_state(staging.server, staging.name) == before  # staging was never touched


def test_delete_removes_the_manifest_only(cluster, tmp_path):
    staging = cluster.staging(tmp_path)
    made = staging.run_json("create_rollback_point.py", "to delete")
    backups = cluster.backrest("--output=json", "info").stdout
    assert staging.run("rollback_manager.py", "delete", made["id"], "--yes").returncode == 0
    assert staging.run_json("rollback_manager.py", "list") == []
    assert cluster.backrest("--output=json", "info").stdout == backups  # the repository's retention is pgBackRest's


# ------------------------------------------------------------------ in place


def test_in_place_brings_the_whole_cluster_back(tmp_path):
    repo = Path(tempfile.mkdtemp(prefix="rollback-pitr-repo-", dir=scratch_parent(server_account())))
    _own(repo)
    try:
        with pitr_cluster([f"repo1-path={repo}"]) as made:
            staging = made.staging(tmp_path)
            point = staging.run_json("create_rollback_point.py", "before")
            at_point = deep_state(staging.server, staging.name)
            staging.sql("DELETE FROM customers WHERE id > 10")
            # a scheduled backup after the point: on the timeline the in-place restore will leave behind
            assert made.backrest("--type=incr", "backup").returncode == 0
            past_branch = json.loads(made.backrest("--output=json", "info").stdout)[0]["backup"][-1]["label"]
            changed = deep_state(staging.server, staging.name)
            refused = staging.run("rollback_manager.py", "restore", point["id"], "--in-place")
            assert refused.returncode == 2 and "Every database on it goes back" in refused.stderr
            assert deep_state(staging.server, staging.name) == changed
            restored = staging.run("rollback_manager.py", "restore", point["id"], "--in-place", "--yes", "--json")
            assert restored.returncode == 0, restored.stderr
            outcome = json.loads(restored.stdout)
            assert outcome["mode"] == "pitr in place" and outcome["before_point_id"]
            assert _without("public.scratch", deep_state(staging.server, staging.name)) == _without("public.scratch", at_point)
            with closing(psycopg2.connect(staging.url)) as conn, conn.cursor() as cur:  # it runs again
                cur.execute("SELECT 1")
            # a point on the new timeline cannot use that backup (same oid, but it lies past the branch): an older one
            later = staging.run_json("create_rollback_point.py", "on the new timeline")
            manifest = json.loads((Path(later["path"]) / "manifest.json").read_text())
            assert manifest["restore_point"]["timeline"] == 2 and manifest["backup"]["label"] != past_branch
            at_later = deep_state(staging.server, staging.name)
            staging.sql("DELETE FROM audit_events")
            back = staging.run("rollback_manager.py", "restore", later["id"], "--yes")
            assert back.returncode == 0, back.stderr
            assert _without("public.scratch", deep_state(staging.server, staging.name)) == _without("public.scratch", at_later)
            # undo: the state kept before is on the timeline the in-place restore left behind
            undone = staging.run("rollback_manager.py", "restore", outcome["before_point_id"], "--yes")
            assert undone.returncode == 0, undone.stderr
            assert _without("public.scratch", deep_state(staging.server, staging.name)) == _without("public.scratch", changed)
    finally:
        shutil.rmtree(repo, ignore_errors=True)


# ------------------------------------------------------------------ an S3 repository


@contextmanager
def s3_emulator(folder: Path) -> Iterator[int]:
    """moto's S3 server behind a TLS endpoint of its own (a self-signed certificate, not
    verified by this test only). The endpoint ends every connection with TLS's
    close_notify, which pgBackRest's OpenSSL requires and moto's development server
    does not send."""
    from moto.server import ThreadedMotoServer

    plain = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=plain, verbose=False)
    moto.start()
    try:
        with tls_endpoint(folder, plain) as port:
            import ssl
            import urllib.request

            request = urllib.request.Request(f"https://127.0.0.1:{port}/rollback-tests", method="PUT")
            urllib.request.urlopen(request, context=ssl._create_unverified_context(), timeout=10)
            yield port
    finally:
        moto.stop()


@contextmanager
def tls_endpoint(folder: Path, upstream: int) -> Iterator[int]:
    import asyncio
    import ssl
    import threading

    cert, key = folder / "cert.pem", folder / "key.pem"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-keyout", str(key), "-out", str(cert)],
        capture_output=True,
    )
    assert made.returncode == 0, made.stderr
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    loop = asyncio.new_event_loop()
    port = free_port()

    async def pump(reader, writer) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def handle(reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream)
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer), return_exceptions=True)

    server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", port, ssl=context))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        server.close()


def test_an_s3_repository_takes_and_restores_points(tmp_path):
    scratch = Path(tempfile.mkdtemp(prefix="rollback-s3-"))
    try:
        with s3_emulator(scratch) as port:
            lines = [
                "repo1-type=s3",
                "repo1-path=/pitr",
                "repo1-s3-bucket=rollback-tests",
                "repo1-s3-endpoint=127.0.0.1",
                f"repo1-s3-port={port}",
                "repo1-s3-region=us-east-1",
                "repo1-s3-uri-style=path",
                "repo1-s3-verify-tls=n",
                "repo1-s3-key=testing-key-id",
                "repo1-s3-key-secret=testing-secret-not-real",  # the server's archive-push reads it here
            ]
            with pitr_cluster(lines) as made:
                staging = made.staging(tmp_path)
                staging.env["PGBACKREST_REPO1_S3_KEY_SECRET"] = "env-secret-not-real"  # the toolkit's pgBackRest: from its env
                point = staging.run_json("create_rollback_point.py", "on S3")
                at_point = deep_state(staging.server, staging.name)
                staging.sql("DELETE FROM customers WHERE id > 100")
                restored = staging.run("rollback_manager.py", "restore", point["id"], "--yes")
                assert restored.returncode == 0, restored.stderr
                assert _without("public.scratch", deep_state(staging.server, staging.name)) == _without(
                    "public.scratch", at_point
                )
                for text in [*_everything_written(staging), restored.stdout, restored.stderr]:
                    assert "testing-secret-not-real" not in text and "env-secret-not-real" not in text
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _everything_written(staging: Staging) -> Iterator[str]:
    for folder in (staging.backup_dir, staging.log_dir):
        for path in folder.rglob("*"):
            if path.is_file():
                yield path.read_text(errors="replace")
