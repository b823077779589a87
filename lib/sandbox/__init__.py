"""Throwaway PostgreSQL servers for the demo, the tests and the benchmarks: never the
product's own path (no module of lib/points, lib/restore, lib/operations, lib/migrate
or lib/api imports this package).

May import lib.pg and the foundation."""
