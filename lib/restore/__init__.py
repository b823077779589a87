"""Putting staging back: build beside, verify and swap (swap), in place or by data,
only the rows added (partial), what a rollback would undo (diff), the copy of V2
for a reset (reset), and what interrupted runs left (leftovers).

May import lib.points, lib.pg and the foundation."""
