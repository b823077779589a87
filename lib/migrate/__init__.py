"""Migrations with rollback built in: what a migration sees (context) and how it is
run, dry or for real, with its automatic rollback (runner); the failures file a run
writes and a retry reads (failures); the ledger of applied migrations in staging
(ledger), a folder's pending migrations run in order (folder), and what is applied,
rolled back or pending (status).

May import lib.operations and everything below it."""
