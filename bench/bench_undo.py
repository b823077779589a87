#!/usr/bin/env python3
"""Benchmark: the undo log (capture and undo) against the tools a user would otherwise use.

usage: python3 bench/bench_undo.py [--sizes-gb 0.4,1.6] [--records 10000] [--big-rows 1000000] [--json]

On one throwaway PostgreSQL 15 server (Debian's, fsync off, as throwaway servers run),
the realistic staging data of bench_rollback.py is built at each of --sizes-gb (the
smallest first, grown to each larger one). In one run:

  capture cost      the runner's batched writes (per record one UPDATE of a customer
                    and one INSERT of an order, a commit every 100 records, from a
                    client), --records of them: without capture, with the undo log's
                    statement triggers, and with row-level triggers writing the same
                    images (what an audit-trigger extension does); the median of three
                    rounds of each, taken in turn
  undo, 1,000 rows  a captured run changes 1,000 rows (400 orders inserted, 400
                    customers updated, 200 orders deleted), then
                    `rollback_manager.py undo RUN --yes` as a whole process; its
                    database time is the undo's own transaction
  restore instead   the point taken before that run restored instead
                    (`rollback_manager.py restore ID --yes`), template and dump methods
  undo, 1,000,000   (the largest size) a captured run updates --big-rows/2 orders and
                    inserts as many; rows undone per second of database time

One table (stderr) with the targets: capture at most 5 % over no capture; the undo of
1,000 rows at most 50 ms of database time and 0.5 s for the command, the larger size no
more than 1.3x the smaller; at least 100,000 rows undone per second. The exit code is 0
whenever everything could be measured. --json prints every figure on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import psycopg2  # noqa: E402
from bench_rollback import build_staging, console, timed  # noqa: E402
from bench_scale import grow_staging, parse_sizes, warm_bytes  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from lib.sandbox.servers import LocalServer, debian_bin_dir, scratch_parent, server_account  # noqa: E402
from lib.undo import capture  # noqa: E402

MB = 1024 * 1024
TABLES = [("public", "customers"), ("public", "orders")]
ROUNDS = 3

# an audit-trigger extension's way, for comparison: a row trigger per changed row
ROW_TRIGGERS = """
CREATE TABLE IF NOT EXISTS bench_row_log (table_name text, op text, old_row text, new_row text);
CREATE OR REPLACE FUNCTION bench_row_log() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
    IF current_setting('bench.row_log', true) IS DISTINCT FROM 'on' THEN RETURN NULL; END IF;
    INSERT INTO bench_row_log VALUES (TG_TABLE_NAME, TG_OP,
        CASE WHEN TG_OP <> 'INSERT' THEN OLD::text END, CASE WHEN TG_OP <> 'DELETE' THEN NEW::text END);
    RETURN NULL;
END $f$;
CREATE TRIGGER bench_row_log AFTER INSERT OR UPDATE OR DELETE ON customers FOR EACH ROW EXECUTE FUNCTION bench_row_log();
CREATE TRIGGER bench_row_log AFTER INSERT OR UPDATE OR DELETE ON orders FOR EACH ROW EXECUTE FUNCTION bench_row_log();
"""
NO_ROW_TRIGGERS = """
DROP TRIGGER IF EXISTS bench_row_log ON customers; DROP TRIGGER IF EXISTS bench_row_log ON orders;
DROP TABLE IF EXISTS bench_row_log;
"""


def sql(url: str, statement: str, params=None):
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else None
    finally:
        conn.close()


def batched_writes(url: str, first: int, records: int, options: str | None = None) -> float:
    """The runner's way: one UPDATE and one INSERT per record, a commit every 100."""
    conn = psycopg2.connect(url, options=options) if options else psycopg2.connect(url)
    try:
        cur = conn.cursor()
        started = time.perf_counter()
        for n in range(records):
            cur.execute("UPDATE customers SET notes = left(notes, 90) || %s WHERE id = %s", (str(n), first + n))
            cur.execute(
                "INSERT INTO orders (customer_id, status, amount, items, comment, placed_at) "
                "VALUES (%s, 'new', 12.50, '[{\"sku\": \"x\", \"qty\": 1}]', 'bench', now())",
                (first + n,),
            )
            if n % 100 == 99:
                conn.commit()
        conn.commit()
        return time.perf_counter() - started
    finally:
        conn.close()


def capture_cost(url: str, records: int) -> dict:
    """The median of ROUNDS rounds of each way, taken in turn."""
    times: dict[str, list[float]] = {"none": [], "undo log": [], "row triggers": []}
    first = 1
    for r in range(ROUNDS):
        console.print(f"  capture cost, round {r + 1} of {ROUNDS} …")
        sql(url, "CHECKPOINT")
        times["none"].append(batched_writes(url, first, records))
        first += records
        run = f"bench-capture-{r}"
        with closing(psycopg2.connect(url)) as conn:
            conn.autocommit = True
            usable, _ = capture.plan(conn, run, TABLES)
            capture.install(conn, run, usable)
        sql(url, "CHECKPOINT")
        times["undo log"].append(batched_writes(url, first, records, capture.session_options(run)))
        first += records
        with closing(psycopg2.connect(url)) as conn:
            conn.autocommit = True
            capture.finish(conn, run)
        sql(url, ROW_TRIGGERS)
        sql(url, "CHECKPOINT")
        times["row triggers"].append(batched_writes(url, first, records, "-c bench.row_log=on"))
        first += records
        sql(url, NO_ROW_TRIGGERS)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "records": records,
        "seconds": median,
        "rounds": times,
        "undo log / none": median["undo log"] / median["none"],
        "row triggers / none": median["row triggers"] / median["none"],
    }


def captured_run(url: str, run: str, statements: list[str]) -> None:
    with closing(psycopg2.connect(url)) as conn:
        conn.autocommit = True
        usable, _ = capture.plan(conn, run, TABLES)
        capture.install(conn, run, usable)
    conn = psycopg2.connect(url, options=capture.session_options(run))
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
        conn.commit()
    finally:
        conn.close()
    with closing(psycopg2.connect(url)) as conn:
        conn.autocommit = True
        capture.finish(conn, run)


def thousand_rows(url: str) -> list[str]:
    top = sql(url, "SELECT max(id) FROM orders")[0][0]
    return [
        "INSERT INTO orders (customer_id, status, amount, items, comment, placed_at) "
        "SELECT 1 + g, 'new', 1.00, '[]', 'undo bench', now() FROM generate_series(1, 400) g",
        "UPDATE customers SET city = city || ' (moved)' WHERE id BETWEEN 501 AND 900",
        f"DELETE FROM orders WHERE id BETWEEN {top - 1000} AND {top - 801}",
    ]


def measure(server: LocalServer, size: int, env: dict, big_rows: int | None) -> dict:
    url = server.url("staging")
    admin_url, warm = server.url(), warm_bytes(size)
    py = sys.executable
    figures: dict = {"staging_bytes": size, "seconds": {}}
    points = {}
    for method in ("template", "dump"):
        console.print(f"  {method} point (not measured) …")
        _, made = timed([py, "create_rollback_point.py", f"bench {method}", "--method", method, "--json"], env)
        points[method] = json.loads(made.stdout)["id"]
    run = f"bench-1000-{size}"
    console.print("  a captured run changes 1,000 rows …")
    captured_run(url, run, thousand_rows(url))
    console.print("  undo of 1,000 rows …")
    figures["seconds"]["undo 1000, command"], done = timed(
        [py, "rollback_manager.py", "undo", run, "--yes", "--json"], env, admin_url, warm
    )
    result = json.loads(done.stdout)
    figures["undo 1000 rows"] = {k: result[k] for k in ("deleted", "restored", "reinserted")}
    figures["seconds"]["undo 1000, database"] = result["seconds"]
    for method, point in points.items():
        console.print(f"  restore of the {method} point instead …")
        figures["seconds"][f"restore {method} point"], _ = timed(
            [py, "rollback_manager.py", "restore", point, "--yes", "--json"], env, admin_url, warm
        )
        figures[f"undo / restore {method} point"] = (
            figures["seconds"]["undo 1000, command"] / figures["seconds"][f"restore {method} point"]
        )
    if big_rows:
        half = big_rows // 2
        run = f"bench-big-{size}"
        console.print(f"  a captured run changes {big_rows:,} rows …")
        captured_run(
            url,
            run,
            [
                f"UPDATE orders SET status = 'audited' WHERE id IN (SELECT id FROM orders ORDER BY id LIMIT {half})",
                "INSERT INTO orders (customer_id, status, amount, items, comment, placed_at) "
                f"SELECT 1 + g % 1000, 'new', 1.00, '[]', 'undo bench', now() FROM generate_series(1, {half}) g",
            ],
        )
        console.print(f"  undo of {big_rows:,} rows …")
        figures["seconds"]["undo big, command"], done = timed(
            [py, "rollback_manager.py", "undo", run, "--yes", "--json"], env, admin_url, warm
        )
        seconds = json.loads(done.stdout)["seconds"]
        figures["seconds"]["undo big, database"] = seconds
        figures["big rows"] = big_rows
        figures["rows undone per second"] = big_rows / seconds
    subprocess_env_cleanup(env)
    return figures


def subprocess_env_cleanup(env: dict) -> None:
    """The points of this size removed, so the next size starts alike."""
    import subprocess

    subprocess.run(
        [sys.executable, "rollback_manager.py", "cleanup", "--keep", "1", "--yes"], env=env, capture_output=True, cwd=ROOT
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-gb", type=parse_sizes, default=[0.4, 1.6], help="staging sizes (default 0.4,1.6)")
    parser.add_argument("--records", type=int, default=10000, help="records of the batched writes (default 10000)")
    parser.add_argument("--big-rows", type=int, default=1_000_000, help="rows of the large undo (default 1000000; 0: none)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    args = parser.parse_args(argv)
    if debian_bin_dir(15) is None:
        raise SystemExit("needs Debian's postgresql-15: apt-get install postgresql-15")
    folder = Path(tempfile.mkdtemp(prefix="rollback-bench-undo-", dir=scratch_parent(server_account())))
    folder.chmod(0o755)
    server = LocalServer(debian_bin_dir(15), folder / "server", fast=True)
    results: dict = {"sizes": {}}
    try:
        server.init()
        server.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "ROLLBACK_")) and k != "PYTHONDONTWRITEBYTECODE"}
        env.update(
            STAGING_DATABASE_URL=server.url("staging"),
            BACKUP_DIR=str(folder / "backups"),
            LOG_DIR=str(folder / "logs"),
            ROLLBACK_ENV_FILE=str(folder / "none.env"),
            ROLLBACK_SPARE="0",
        )
        for i, gb in enumerate(args.sizes_gb):
            size_mb = max(1, round(gb * 1024))
            size = build_staging(server, size_mb) if i == 0 else grow_staging(server, size_mb)
            console.print(f" {gb:g} GB: staging {size / MB:.0f} MB")
            if i == 0:
                results["capture"] = capture_cost(server.url("staging"), args.records)
            last = i == len(args.sizes_gb) - 1
            results["sizes"][f"{gb:g}"] = measure(server, size, env, args.big_rows if last else None)
    finally:
        server.destroy()
        shutil.rmtree(folder, ignore_errors=True)
    show(results)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def show(results: dict) -> None:
    sizes = results["sizes"]
    names = list(sizes)
    table = Table(title="undo benchmark: PostgreSQL 15, fsync off, one run")
    for col in ("figure", *(f"{s} GB" for s in names), "target", "met"):
        table.add_column(col)

    def row(label: str, values: list[str], target: str = "", met: bool | None = None) -> None:
        table.add_row(label, *values, target, "" if met is None else ("met" if met else "missed"))

    c = results["capture"]
    spread = ["" for _ in names]
    row(f"batched writes, no capture ({c['records']} records, s)", [f"{c['seconds']['none']:.2f}", *spread[1:]])
    row("… with the undo log (s)", [f"{c['seconds']['undo log']:.2f}", *spread[1:]])
    row("… with row-level triggers (s)", [f"{c['seconds']['row triggers']:.2f}", *spread[1:]])
    row("undo log / no capture", [f"{c['undo log / none']:.3f}x", *spread[1:]], "≤ 1.05x", c["undo log / none"] <= 1.05)
    row("row triggers / no capture", [f"{c['row triggers / none']:.3f}x", *spread[1:]])
    db = [f["seconds"]["undo 1000, database"] for f in sizes.values()]
    cmd = [f["seconds"]["undo 1000, command"] for f in sizes.values()]
    row("staging (MB)", [f"{f['staging_bytes'] / MB:.0f}" for f in sizes.values()])
    row("undo 1,000 rows, database (ms)", [f"{x * 1000:.0f}" for x in db], "≤ 50 ms", max(db) <= 0.05)
    row("undo 1,000 rows, command (s)", [f"{x:.2f}" for x in cmd], "≤ 0.5 s", max(cmd) <= 0.5)
    if len(cmd) > 1:
        row("undo 1,000 rows, largest / smallest", [f"{cmd[-1] / cmd[0]:.2f}x", *spread[1:]], "≤ 1.3x", cmd[-1] / cmd[0] <= 1.3)
    for method in ("template", "dump"):
        row(f"restore the {method} point instead (s)", [f"{f['seconds'][f'restore {method} point']:.2f}" for f in sizes.values()])
        row(f"undo / restore {method} point", [f"{f[f'undo / restore {method} point']:.3f}x" for f in sizes.values()])
    big = sizes[names[-1]]
    if "rows undone per second" in big:
        rate = big["rows undone per second"]
        row(
            f"undo of {big['big rows']:,} rows, rows per second",
            [*spread[:-1], f"{rate:,.0f}"],
            "≥ 100,000",
            rate >= 100_000,
        )
    Console(stderr=True).print(table)


if __name__ == "__main__":
    sys.exit(main())
