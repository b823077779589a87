"""Progress of long work: what PostgreSQL's progress views and the tools' --verbose lines
tell, read on a connection of its own that never fails the work; shown as a bar with an
ETA on a terminal and as a few plain lines without one; --json stays one document."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

import create_rollback_point
from lib.cli import console
from lib.cli.console import UI, PlainStream
from lib.config import ConnInfo, load_settings
from lib.interaction import Granted, Silent
from lib.operations import commands
from lib.operations.reset import reset_staging
from lib.pg.db import connection
from lib.pg.fingerprint import row_counts
from lib.pg.progress import DumpTracker, ProgressPoller, RestoreTracker, application_name, table_sizes
from lib.points.methods.data import all_tables
from lib.process import Command
from lib.sandbox.servers import free_port
from tests.helpers import wait_for


class Recorder(Silent):
    """A Reporter that keeps every progress it was given: label, total, unit and ticks."""

    def __init__(self) -> None:
        self.bars: list[dict] = []

    @contextmanager
    def progress(self, label, total=None, unit="", *, estimated=False):
        bar = {"label": label, "total": total, "unit": unit, "estimated": estimated, "ticks": []}
        self.bars.append(bar)
        yield lambda detail=None, *, done=None: bar["ticks"].append((detail, done))

    def bar(self, start: str) -> dict:
        found = [b for b in self.bars if b["label"].startswith(start)]
        assert found, f"no progress starting {start!r} among {[b['label'] for b in self.bars]}"
        return found[0]


class HeldCopy:
    """COPY FROM STDIN of ``rows`` lines that then waits for ``release``: a COPY under way
    for as long as a test needs one, on a session named ``app``."""

    def __init__(self, staging, app: str, rows: int) -> None:
        self.release = threading.Event()
        self.conn = staging.server.connect(staging.name)
        with self.conn.cursor() as cur:
            cur.execute("SET application_name = %s", (app,))
        data = [b"".join(b"%d\tprobe row %d\n" % (n, n) for n in range(rows))]
        held = self

        class Source:
            def read(self, size=-1):
                if data:
                    return data.pop()
                held.release.wait(120)
                return b""

        def copy():
            with self.conn.cursor() as cur:
                cur.copy_expert("COPY progress_probe FROM STDIN", Source())

        self.thread = threading.Thread(target=copy, daemon=True)
        self.thread.start()

    def finish(self) -> None:
        self.release.set()
        self.thread.join(60)
        self.conn.close()


def test_the_poller_reads_a_copy_and_an_index_build_under_way_and_only_its_own(staging):
    staging.sql("CREATE TABLE progress_probe (id int, note text)")
    oid = staging.sql("SELECT 'progress_probe'::regclass::oid")[0][0]
    app = application_name("test")
    poller = ProgressPoller(ConnInfo.parse(staging.url), "postgres", staging.name, app)
    ours, theirs = HeldCopy(staging, app, 20000), HeldCopy(staging, "someone else", 5000)
    try:
        reading = wait_for(
            lambda: (r := poller.read_once()) and r.copies and r.copies[0].tuples > 0 and r, timeout=60, what="our COPY under way"
        )
        assert [(c.relid, c.command) for c in reading.copies] == [(oid, "COPY FROM")]  # not the other session's
        assert 0 < reading.rows("COPY FROM") <= 20000
    finally:
        ours.finish()
        theirs.finish()
    writer = staging.connect()
    writer.autocommit = False
    with writer.cursor() as cur:
        cur.execute("INSERT INTO progress_probe VALUES (0, 'an open transaction')")  # CREATE INDEX CONCURRENTLY waits for it
    builder = staging.connect()
    with builder.cursor() as cur:
        cur.execute("SET application_name = %s", (app,))
    build = threading.Thread(target=lambda: builder.cursor().execute("CREATE INDEX CONCURRENTLY ON progress_probe (id)"))
    build.start()
    try:
        reading = wait_for(lambda: (r := poller.read_once()) and r.indexes and r, timeout=60, what="the index build under way")
        assert "waiting" in reading.indexes[0].phase
    finally:
        writer.commit()
        writer.close()
        build.join(60)
        builder.close()
    assert staging.sql("SELECT count(*) FROM pg_indexes WHERE tablename = 'progress_probe'")[0][0] == 1


@pytest.mark.unit
def test_a_server_that_cannot_be_asked_is_logged_at_debug_and_never_fails_or_waits(caplog):
    nowhere = ConnInfo.parse(f"postgresql://nobody:secret-pw-1@127.0.0.1:{free_port()}/staging")
    caplog.set_level(logging.DEBUG, logger="lib.pg.progress")
    poller = ProgressPoller(nowhere, "postgres", "staging", "rollback-toolkit test", every=0.05)
    assert poller.read_once() is None
    started = time.monotonic()
    with poller:
        wait_for(lambda: "progress of staging not read" in caplog.text, timeout=60, what="the debug line")
    assert time.monotonic() - started < 30 and poller.latest is None
    assert "secret-pw-1" not in caplog.text
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "lib.pg.progress")


def _verbose(server, tool: str, dbname: str, args: list[str], tracker) -> None:
    info = ConnInfo.parse(server.url())
    Command(server.bin_dir / tool, conn=info).run(
        [*args, "--verbose", *info.tool_args(dbname)], on_stderr=tracker.line, quiet=True
    )


@pytest.mark.parametrize("jobs", [1, 2])
def test_pg_dump_and_pg_restore_say_every_table_and_entry_as_the_trackers_read_them(staging, tmp_path, jobs):
    """On each major, by one job and by two: the lines pg_dump prints finish every table it
    dumped, and the lines pg_restore prints every entry of the table of contents and
    every row of the point's counts."""
    server = staging.server
    with connection(ConnInfo.parse(staging.url), autocommit=False) as conn:
        tables = table_sizes(conn)
    dumped = DumpTracker(tables, parallel=jobs > 1)
    archive = tmp_path / "archive"
    _verbose(server, "pg_dump", staging.name, ["--format=directory", f"--jobs={jobs}", f"--file={archive}"], dumped)
    assert dumped.total == sum(t.size for t in tables) > 0
    with_rows = {t.key for t in tables}
    assert set(dumped.started) == with_rows  # every table's rows were dumped, and said
    unfinished = with_rows - dumped.finished
    assert len(unfinished) == (0 if jobs > 1 else 1)  # by one job, the last table ends with pg_dump itself
    assert dumped.done(None) == dumped.total - sum(t.size for t in tables if t.key in unfinished)

    point_id = staging.create_point("Rows counted")
    manifest = json.loads((staging.backup_dir / point_id / "manifest.json").read_text())
    rows = manifest["fingerprint"]["row_counts"]
    point_archive = staging.backup_dir / point_id / manifest["archive"]
    listing = Command(server.bin_dir / "pg_restore").output(["--list", str(point_archive)], quiet=True)
    staging.sql(f'CREATE DATABASE "{staging.name}_r{jobs}"')  # dropped with staging
    restored = RestoreTracker(listing, rows)
    target = f"{staging.name}_r{jobs}"
    _verbose(server, "pg_restore", target, ["--exit-on-error", f"--jobs={jobs}", str(point_archive)], restored)
    assert restored.unit == "rows" and restored.total == sum(rows.values()) > 0
    # every table's rows counted as its entry ended; by one job, the last one ends with pg_restore itself
    assert restored.loaded + (restored.rows.get(restored.current, 0) if jobs == 1 else 0) == restored.total
    assert restored.entries_done >= len(restored.listed) - (0 if jobs > 1 else 1) > 0


def test_a_dump_point_and_its_restore_report_bytes_and_rows_against_a_known_total(staging, monkeypatch):
    recorder = Recorder()
    settings = load_settings()
    point, _ = commands.create_point(settings, recorder, Granted(), description="Progress", method="dump")
    dumping = recorder.bar("Dumping")
    assert dumping["unit"] == "B" and dumping["estimated"]
    with connection(ConnInfo.parse(staging.url), autocommit=False) as conn:
        assert dumping["total"] == sum(t.size for t in table_sizes(conn)) > 0
    assert dumping["ticks"][-1][1] == dumping["total"]
    dones = [done for _, done in dumping["ticks"]]
    assert dones == sorted(dones)

    for jobs in ("1", "2"):
        monkeypatch.setenv("RESTORE_JOBS", jobs)
        recorder = Recorder()
        commands.restore_point(load_settings(), recorder, Granted(), point.id)
        restoring = recorder.bar(f"Restoring {point.id}")
        assert restoring["unit"] == "rows" and not restoring["estimated"]
        assert restoring["total"] == sum(point.manifest.row_counts.values()) > 0
        assert restoring["ticks"][-1][1] == restoring["total"]


def test_a_data_point_and_its_restore_count_the_rows_they_stream(staging):
    recorder = Recorder()
    point, _ = commands.create_point(load_settings(), recorder, Granted(), description="Rows", method="data")
    rows = sum(t.rows for t in point.manifest.tables)
    copying = recorder.bar("Copying")
    assert copying["unit"] == "rows" and copying["estimated"] and copying["total"] > 0
    assert copying["ticks"][-1][1] == rows  # counted exactly as they passed, against an estimate
    recorder = Recorder()
    commands.restore_point(load_settings(), recorder, Granted(), point.id)
    restoring = recorder.bar("Restoring")
    assert restoring["unit"] == "rows" and restoring["total"] == rows
    assert [done for _, done in restoring["ticks"]][-1] == rows


@pytest.mark.servers(15)
def test_a_reset_from_v2_reports_rows_streamed_and_entries_built(server, new_staging, monkeypatch):
    v2 = new_staging(server, "v2")
    staging = new_staging(server, "stg")
    for key, value in {**staging.env, "V2_DATABASE_URL": v2.url}.items():
        monkeypatch.setenv(key, value)
    recorder = Recorder()
    reset_staging(load_settings(), recorder, Granted(), jobs=2)
    streaming = recorder.bar("Streaming")
    with connection(ConnInfo.parse(v2.url)) as conn:
        counts = row_counts(conn)
        v2_rows = sum(counts[t.key] for t in all_tables(conn))
    assert streaming["unit"] == "rows" and streaming["total"] == v2_rows > 0
    assert streaming["ticks"][-1][1] == streaming["total"]
    building = recorder.bar("Building indexes")
    assert building["unit"] == "entries" and building["total"] > 0
    assert building["ticks"][-1][1] == building["total"]


# ---------------------------------------------------------------- how it is shown


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def plain_ui() -> tuple[UI, io.StringIO, FakeClock]:
    ui = UI()
    out = io.StringIO()
    ui.err = PlainStream(out)
    ui.clock = FakeClock()
    return ui, out, ui.clock


@pytest.mark.unit
def test_without_a_terminal_a_line_every_ten_seconds_with_an_eta_and_no_control_characters():
    ui, out, clock = plain_ui()
    with ui.progress("Dumping staging", total=4 * 2**30, unit="B", estimated=True) as tick:
        for step in range(1, 71):  # 35 s of ticks, twice a second
            clock.now += 0.5
            tick("copying \x1b[31mpublic.orders\x1b[0m\r", done=step * 2**30 / 20)
    lines = out.getvalue().splitlines()
    assert lines[0] == "• Dumping staging …"
    progress = [line for line in lines[1:] if "of about" in line]
    assert len(progress) == 3  # at 10, 20 and 30 s
    assert progress[0].startswith("  Dumping staging: 1.0 GiB of about 4.0 GiB, 25%, about 30 s left, 10 s so far — copying")
    assert lines[-1] == "  Dumping staging: finished after 35 s"
    assert not any(ch in out.getvalue() for ch in "\x1b\r\x07")


@pytest.mark.unit
def test_without_a_terminal_short_work_says_one_line_long_work_its_time_and_failed_work_no_finish():
    ui, out, clock = plain_ui()
    with ui.progress("Restoring", total=10, unit="rows") as tick:
        tick(done=5)
    assert out.getvalue().splitlines() == ["• Restoring …"]
    ui, out, clock = plain_ui()
    with ui.progress("Copying staging into staging_rb_restoring on the server"):
        clock.now += 754  # nothing to tell while it runs
    assert out.getvalue().splitlines()[-1] == "  Copying staging into staging_rb_restoring on the server: finished after 13 min"
    ui, out, clock = plain_ui()
    with pytest.raises(RuntimeError), ui.progress("Restoring", total=10, unit="rows") as tick:
        clock.now += 11
        tick(done=5)
        raise RuntimeError("stopped")
    assert "finished" not in out.getvalue() and "5 of 10 rows, 50%, about 11 s left, 11 s so far" in out.getvalue()


@pytest.mark.unit
def test_on_a_terminal_a_bar_with_the_amount_and_an_eta():
    from rich.console import Console

    ui = UI()
    ui.err = Console(file=io.StringIO(), force_terminal=True, width=160)
    ui.clock = FakeClock()
    with ui.progress("Restoring rb_x into staging", total=2_000_000, unit="rows") as tick:
        ui.clock.now += 20
        tick("building an index: scanning table 45%", done=500_000)
    shown = ui.err.file.getvalue()
    assert "500,000 of 2,000,000 rows" in shown and "about 60 s left" in shown and "scanning table 45%" in shown
    with ui.progress("Copying staging on the server") as tick:  # nothing to count: what, and for how long
        tick("[bold]a detail in brackets[/]")
    shown = ui.err.file.getvalue()
    assert "Copying staging on the server" in shown and "0:00:00" in shown and "[bold]a detail in brackets[/]" in shown


def test_json_stays_one_document_on_stdout_while_progress_goes_to_stderr(staging, capsys, monkeypatch):
    monkeypatch.setattr(console, "PROGRESS_EVERY", 0.0)
    assert create_rollback_point.main(["Progress as JSON", "--method", "dump", "--json"]) == 0
    captured = capsys.readouterr()
    document = json.loads(captured.out)
    assert document["method"] == "dump" and Path(document["path"]).is_dir()
    assert "Dumping" in captured.err and "of about" in captured.err
    assert "\x1b" not in captured.err and "\r" not in captured.err
