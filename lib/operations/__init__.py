"""The commands the scripts, the menu and the Python API call, and the one scaffold
every command that changes anything starts with (scaffold): create, restore,
partial rollback, diff, delete, cleanup, audit (commands), reset from V2 (reset),
and check_setup's findings (check).

May import lib.restore, lib.points, lib.pg and the foundation."""
