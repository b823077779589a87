"""Undoing exactly what one migration run changed, and keeping everything else:
statement-level triggers with transition tables capture the run's own writes into the
toolkit's schema in staging (capture), and the undo reverts them in one transaction,
in reverse order, where the rows still hold what the run wrote (revert).

May import lib.pg and the foundation."""
