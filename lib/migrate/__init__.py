"""Migrations with rollback built in: what a migration sees (context) and how it is
run, dry or for real, with its automatic rollback (runner).

May import lib.operations and everything below it."""
