#!/usr/bin/env python3
"""Benchmark: rebuilding staging from V2 against pgcopydb and pg_dump | pg_restore.

Two throwaway PostgreSQL 18 servers, V2 and staging (fsync off, as throwaway servers
run); V2 gets the same ~1 GB database as bench_rollback.py. Measured once, in one run:

  ours:      reset_staging.py
  baselines: pgcopydb clone (Debian's package; installed when missing and root) and
             pg_dump -Fc | pg_restore into a new database

usage: python3 bench/bench_reset.py [--size-mb 1000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import psycopg2  # noqa: E402
from bench_rollback import build_staging, console, timed  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from lib.sandbox.servers import LocalServer, embedded_bin_dir  # noqa: E402


def pgcopydb() -> str | None:
    found = shutil.which("pgcopydb")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    console.print("  installing pgcopydb from Debian")
    subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "pgcopydb"],
        check=False,
        capture_output=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    return shutil.which("pgcopydb")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    bin_dir = embedded_bin_dir()
    v2_server, staging_server = LocalServer(bin_dir), LocalServer(bin_dir)
    work = Path(tempfile.mkdtemp(prefix="rollback-bench-reset-"))
    results: dict[str, float] = {}
    try:
        v2_server.start()
        staging_server.start()
        size = build_staging(v2_server, args.size_mb)
        admin = staging_server.url()
        conn = psycopg2.connect(admin)
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE staging")
        conn.close()
        v2_url, staging_url = v2_server.url("staging"), staging_server.url("staging")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(
            STAGING_DATABASE_URL=staging_url,
            V2_DATABASE_URL=v2_url,
            BACKUP_DIR=str(work / "backups"),
            LOG_DIR=str(work / "logs"),
            ROLLBACK_ENV_FILE=str(work / "none.env"),
            ROLLBACK_SPARE="0",
        )
        warm = int(size * 3)
        py = sys.executable

        console.print("pg_dump -Fc | pg_restore …")
        conn = psycopg2.connect(admin)
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE piped")
        conn.close()
        passfile = work / "pgpass"
        passfile.write_text("".join(f"127.0.0.1:{srv.port}:*:postgres:{srv.password}\n" for srv in (v2_server, staging_server)))
        passfile.chmod(0o600)
        pipe = (
            f"{bin_dir}/pg_dump -Fc -h 127.0.0.1 -p {v2_server.port} -U postgres staging | "
            f"{bin_dir}/pg_restore -h 127.0.0.1 -p {staging_server.port} -U postgres -d piped"
        )
        env_pipe = {**env, "PGPASSFILE": str(passfile)}
        results["pg_dump -Fc | pg_restore"], _ = timed(["bash", "-o", "pipefail", "-c", pipe], env_pipe, admin, warm)

        copier = pgcopydb()
        if copier:
            console.print("pgcopydb clone …")
            conn = psycopg2.connect(admin)
            conn.autocommit = True
            conn.cursor().execute("CREATE DATABASE copied")
            conn.close()
            copy_env = {
                **env,
                "PATH": f"{bin_dir}:{env.get('PATH', '')}",
                "PGCOPYDB_SOURCE_PGURI": v2_url,
                "PGCOPYDB_TARGET_PGURI": staging_server.url("copied"),
            }
            results["pgcopydb clone"], _ = timed(
                [copier, "clone", "--dir", str(work / "pgcopydb"), "--no-owner", "--no-acl"], copy_env, admin, warm
            )

        console.print("reset_staging.py …")
        results["reset_staging.py"], _ = timed([py, "reset_staging.py", "--yes", "--json"], env, admin, warm)
    finally:
        v2_server.destroy()
        staging_server.destroy()
        shutil.rmtree(work, ignore_errors=True)

    table = Table(title=f"Reset from V2, {size / 1048576:.0f} MB, PostgreSQL 18 to 18 (fsync off), one run")
    for col in ("ours", "s", "against", "s", "ratio", "target", "met"):
        table.add_column(col)
    for ours in ("reset_staging.py",):
        for base, target in (("pgcopydb clone", 1.0), ("pg_dump -Fc | pg_restore", 0.7)):
            if base in results and ours in results:
                ratio = results[ours] / results[base]
                table.add_row(
                    ours,
                    f"{results[ours]:.2f}",
                    base,
                    f"{results[base]:.2f}",
                    f"{ratio:.2f}x",
                    f"<= {target}x",
                    "yes" if ratio <= target else "NO",
                )
    Console(stderr=args.json).print(table)
    if args.json:
        print(json.dumps({"size_bytes": size, "seconds": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
