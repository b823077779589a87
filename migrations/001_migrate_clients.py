"""Move V2's clients into staging's customers.

A client without a phone number is refused, and so is a client whose code is
already a customer (V2 holds some clients twice). A client migrated by an earlier
run is skipped, so a run that stopped can simply be run again. With ``--param strict=1`` (or
MIGRATE_CLIENTS_STRICT=1) a client without an e-mail address is refused too; on
the demo's sample that passes the 10% failure threshold part-way through, which
shows the automatic rollback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":  # run as seed 000 shows it: python3 migrations/001_migrate_clients.py --production
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import lib.cli.venv  # noqa: F401  (runs this file again under .venv when its packages are missing)

from psycopg2.extras import RealDictCursor

MIGRATION_ID = "001_migrate_clients"


def migrate(ctx) -> None:
    strict = (ctx.params.get("strict") or os.environ.get("MIGRATE_CLIENTS_STRICT", "")).lower() in ("1", "true", "yes")
    with ctx.v2.cursor() as cur:
        cur.execute("SELECT count(*) FROM clients")
        total = cur.fetchone()[0]
    clients = ctx.v2.cursor(name="clients", cursor_factory=RealDictCursor)  # streamed from V2, not loaded whole
    clients.itersize = 1000
    clients.execute("SELECT id, client_code, name, phone, email, address FROM clients ORDER BY id")

    def migrate_client(c: dict) -> None:
        if not c["phone"]:
            ctx.fail(c["id"], f"client {c['client_code']} has no phone number")
        if strict and not c["email"]:
            ctx.fail(c["id"], f"client {c['client_code']} has no e-mail address (strict)")
        with ctx.staging.cursor() as cur:
            cur.execute("SELECT id, legacy_id FROM customers WHERE legacy_id = %s OR code = %s", (c["id"], c["client_code"]))
            existing = cur.fetchone()
            if existing and existing[1] == c["id"]:
                ctx.skip(c["id"], f"client {c['client_code']} was migrated before (customer {existing[0]})")
            if existing:
                ctx.fail(c["id"], f"duplicate client code {c['client_code']} (already customer {existing[0]})")
            cur.execute(
                "INSERT INTO customers (code, name, phone, email, address, legacy_id, migrated_at) "
                "VALUES (%s, %s, %s, %s, %s, %s, now())",
                (c["client_code"], c["name"], c["phone"], c["email"], c["address"], c["id"]),
            )

    ctx.run_batches(clients, migrate_client, key=lambda c: c["id"], total=total)


if __name__ == "__main__":  # exactly `python3 run_migration.py THIS_FILE ...`: a dry run, --production, --rollback [ID]
    from run_migration import main

    sys.exit(main([__file__, *sys.argv[1:]]))
