#!/usr/bin/env python3
"""Benchmark: pitr points on pgBackRest against the tools a user would otherwise use.

usage: python3 bench/bench_pitr.py [--sizes-gb 0.4,1.6] [--json]

On one throwaway PostgreSQL 15 cluster (Debian's, fsync off, as throwaway servers run)
archiving its WAL into a pgBackRest stanza (a posix repository in a temporary folder),
the realistic staging data of bench_rollback.py is built at each of --sizes-gb (the
smallest first, grown to each larger one; archiving is off while rows are loaded and
a full backup is taken after). At each size, each measurement from the same settled
state (checkpoint, sync, warm memory), in one run, as whole processes:

  pitr point        create_rollback_point.py --method pitr (a backup holds staging)
  restore beside    rollback_manager.py restore <the point> --yes, after a change to
                    staging: pgBackRest's restore beside it, the side server's
                    recovery, the copy, the check and the swap
  pgBackRest alone  the same restore by hand, as the guide's "Recovery by hand" runs
                    it: pgbackrest restore --db-include --type=name into a folder, the
                    server started on it and waited for until promoted (no copy, no
                    swap: staging is not back yet at this point)
  pg_dump + pg_restore   pg_dump -Fc of staging, then a single-job pg_restore of it
                    into a new database (what a user would do without the toolkit)

One table (stderr): times per size, ratios, and the targets: a pitr point in at most
2 s at every size; a restore beside in at most 0.7x pg_dump -Fc + pg_restore. The
targets are what the toolkit works towards; the exit code is 0 whenever everything
could be measured. --json prints every figure as one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import psycopg2  # noqa: E402
from bench_rollback import build_staging, console, settle  # noqa: E402
from bench_scale import grow_staging, parse_sizes, warm_bytes  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from lib.sandbox.servers import LocalServer, debian_bin_dir, free_port, scratch_parent, server_account  # noqa: E402

STANZA = "bench"
MB = 1024 * 1024


class Cluster:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.account = server_account()
        self.config = folder / "pgbackrest.conf"
        self.server = LocalServer(debian_bin_dir(15), folder / "server", fast=True)
        self.server.settings = ["archive_mode = on", "archive_command = '/bin/true'", "wal_level = replica"]

    def as_owner(self) -> dict:
        return {"user": self.account.pw_uid, "group": self.account.pw_gid} if self.account else {}

    def own(self, path: Path) -> None:
        if self.account:
            os.chown(path, self.account.pw_uid, self.account.pw_gid)

    def backrest(self, *args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(
            ["pgbackrest", f"--config={self.config}", f"--stanza={STANZA}", *args],
            capture_output=True,
            text=True,
            cwd="/",
            **self.as_owner(),
        )
        if done.returncode != 0:
            raise SystemExit(f"pgbackrest {' '.join(args)} failed: {done.stderr.strip()}")
        return done

    def start(self) -> None:
        for sub in ("repo", "log", "lock"):
            (self.folder / sub).mkdir()
            self.own(self.folder / sub)
        s = self.server
        self.config.write_text(
            f"[global]\nrepo1-path={self.folder}/repo\nlog-path={self.folder}/log\nlock-path={self.folder}/lock\n"
            "start-fast=y\nrepo1-retention-full=100\ncompress-type=lz4\nprocess-max=2\n"
            f"[{STANZA}]\npg1-path={s.data_dir}\npg1-port={s.port}\npg1-socket-path={s.base_dir}\npg1-user=postgres\n"
        )
        self.own(self.config)
        s.init()
        hba = s.data_dir / "pg_hba.conf"
        hba.write_text("local all postgres peer\n" + hba.read_text())
        s.start()

    def archive_into_pgbackrest(self) -> None:
        push = f"pgbackrest --config={self.config} --stanza={STANZA} archive-push %p"
        admin(self.server.url(), "ALTER SYSTEM SET archive_command = %s", (push,))
        admin(self.server.url(), "SELECT pg_reload_conf()")
        self.backrest("stanza-create")
        self.backrest("check")


def admin(url: str, statement: str, params=None) -> None:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        conn.cursor().execute(statement, params)
    finally:
        conn.close()


def timed(argv: list[str], env: dict, admin_url: str, warm: int, **kwargs) -> tuple[float, subprocess.CompletedProcess]:
    settle(admin_url, warm)
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=ROOT, **kwargs)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return elapsed, done


def by_hand(cluster: Cluster, point_id: str, label: str, admin_url: str, warm: int) -> float:
    """pgBackRest's restore to the point, by hand, and its server until promoted."""
    side = Path(tempfile.mkdtemp(prefix="bench-side-", dir=cluster.folder))
    cluster.own(side)
    port = free_port()
    pg_ctl = str(cluster.server.bin_dir / "pg_ctl")
    try:
        settle(admin_url, warm)
        started = time.perf_counter()
        cluster.backrest(
            f"--pg1-path={side}/data",
            f"--set={label}",
            "--type=name",
            f"--target={point_id}",
            "--target-action=promote",
            "--archive-mode=off",
            "--db-include=staging",
            "restore",
        )
        options = f"-c port={port} -c listen_addresses='' -c unix_socket_directories={side}"
        subprocess.run(
            [pg_ctl, "-D", f"{side}/data", "-o", options, "-l", f"{side}/log", "-w", "start"],
            check=True,
            capture_output=True,
            cwd="/",
            **cluster.as_owner(),
        )
        while True:
            ready = subprocess.run(
                [
                    str(cluster.server.bin_dir / "psql"),
                    "-h",
                    str(side),
                    "-p",
                    str(port),
                    "-U",
                    "postgres",
                    "-Atc",
                    "SELECT pg_is_in_recovery()",
                ],
                capture_output=True,
                text=True,
                cwd="/",
                **cluster.as_owner(),
            )
            if ready.stdout.strip() == "f":
                break
            time.sleep(0.1)
        return time.perf_counter() - started
    finally:
        subprocess.run(
            [pg_ctl, "-D", f"{side}/data", "-m", "immediate", "stop"], capture_output=True, cwd="/", **cluster.as_owner()
        )
        shutil.rmtree(side, ignore_errors=True)


def measure(cluster: Cluster, size: int, env: dict) -> dict:
    server = cluster.server
    admin_url, warm = server.url(), warm_bytes(size)
    py = sys.executable
    figures: dict = {"staging_bytes": size}
    console.print("  full backup (not measured) …")
    cluster.backrest("--type=full", "backup")
    console.print("  pitr point …")
    figures["pitr point"], made = timed(
        [py, "create_rollback_point.py", "bench", "--method", "pitr", "--json"], env, admin_url, warm
    )
    point = json.loads(made.stdout)
    manifest = json.loads((Path(point["path"]) / "manifest.json").read_text())
    with psycopg2.connect(server.url("staging")) as conn:
        conn.cursor().execute("DELETE FROM orders WHERE id % 10 = 0")
    console.print("  pgBackRest's own restore, by hand …")
    figures["pgBackRest alone"] = by_hand(cluster, point["id"], manifest["backup"]["label"], admin_url, warm)
    console.print("  restore beside, then swap …")
    figures["restore beside"], _ = timed(
        [py, "rollback_manager.py", "restore", point["id"], "--yes", "--json"], env, admin_url, warm
    )
    pg = {**env, "PGPASSWORD": server.password}
    conn_args = ["-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres"]
    dump = cluster.folder / "staging.dump"
    console.print("  pg_dump -Fc …")
    figures["pg_dump -Fc"], _ = timed(
        [str(server.bin_dir / "pg_dump"), "-Fc", "-f", str(dump), *conn_args, "staging"], pg, admin_url, warm
    )
    admin(admin_url, "CREATE DATABASE bench_restored")
    console.print("  pg_restore (one job) …")
    figures["pg_restore"], _ = timed(
        [str(server.bin_dir / "pg_restore"), *conn_args, "-d", "bench_restored", str(dump)], pg, admin_url, warm
    )
    admin(admin_url, "DROP DATABASE bench_restored")
    dump.unlink()
    figures["pg_dump + pg_restore"] = figures["pg_dump -Fc"] + figures["pg_restore"]
    figures["restore beside / pg_dump + pg_restore"] = figures["restore beside"] / figures["pg_dump + pg_restore"]
    figures["restore beside / pgBackRest alone"] = figures["restore beside"] / figures["pgBackRest alone"]
    subprocess.run([py, "rollback_manager.py", "cleanup", "--keep", "1", "--yes"], env=env, capture_output=True, cwd=ROOT)
    return figures


ROWS = [
    ("staging (MB)", lambda f: f"{f['staging_bytes'] / MB:.0f}", None),
    ("pitr point (s)", lambda f: f"{f['pitr point']:.2f}", lambda f: f["pitr point"] <= 2.0),
    ("pgBackRest alone, by hand (s)", lambda f: f"{f['pgBackRest alone']:.2f}", None),
    ("restore beside (s)", lambda f: f"{f['restore beside']:.2f}", None),
    ("pg_dump -Fc (s)", lambda f: f"{f['pg_dump -Fc']:.2f}", None),
    ("pg_restore, one job (s)", lambda f: f"{f['pg_restore']:.2f}", None),
    ("pg_dump + pg_restore (s)", lambda f: f"{f['pg_dump + pg_restore']:.2f}", None),
    (
        "restore beside / pg_dump + pg_restore",
        lambda f: f"{f['restore beside / pg_dump + pg_restore']:.2f}x",
        lambda f: f["restore beside / pg_dump + pg_restore"] <= 0.7,
    ),
    ("restore beside / pgBackRest alone", lambda f: f"{f['restore beside / pgBackRest alone']:.2f}x", None),
]
TARGETS = {"pitr point (s)": "≤ 2 s", "restore beside / pg_dump + pg_restore": "≤ 0.7x"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-gb", type=parse_sizes, default=[0.4, 1.6], help="staging sizes (default 0.4,1.6)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    args = parser.parse_args(argv)
    if debian_bin_dir(15) is None or shutil.which("pgbackrest") is None:
        raise SystemExit("needs Debian's postgresql-15 and pgbackrest: apt-get install postgresql-15 pgbackrest")
    folder = Path(tempfile.mkdtemp(prefix="rollback-bench-pitr-", dir=scratch_parent(server_account())))
    folder.chmod(0o755)
    cluster = Cluster(folder)
    cluster.own(folder)
    results: dict = {}
    try:
        cluster.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "ROLLBACK_")) and k != "PYTHONDONTWRITEBYTECODE"}
        env.update(
            STAGING_DATABASE_URL=cluster.server.url("staging"),
            BACKUP_DIR=str(folder / "backups"),
            LOG_DIR=str(folder / "logs"),
            ROLLBACK_ENV_FILE=str(folder / "none.env"),
            PGBACKREST_STANZA=STANZA,
            PGBACKREST_CONFIG=str(cluster.config),
            PITR_SIDE_DIR=str(folder),
        )
        for i, gb in enumerate(args.sizes_gb):
            size_mb = max(1, round(gb * 1024))
            if i == 0:
                size = build_staging(cluster.server, size_mb)
                cluster.archive_into_pgbackrest()
            else:
                size = grow_staging(cluster.server, size_mb)
            console.print(f" {gb:g} GB: staging {size / MB:.0f} MB")
            results[f"{gb:g}"] = measure(cluster, size, env)
    finally:
        cluster.server.destroy()
        shutil.rmtree(folder, ignore_errors=True)
    table = Table(title="pitr benchmark: PostgreSQL 15, pgBackRest 2.45 (posix repository), fsync off, one run")
    for col in ("figure", *(f"{s} GB" for s in results), "target", "met"):
        table.add_column(col)
    for label, show, check in ROWS:
        met = "" if check is None else ("met" if all(check(f) for f in results.values()) else "missed")
        table.add_row(label, *(show(f) for f in results.values()), TARGETS.get(label, ""), met)
    Console(stderr=True).print(table)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
