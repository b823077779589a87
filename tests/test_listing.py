"""What `list` and `audit` show people: a point id is never wrapped or cut, at any width
down to 80 columns, on a terminal or piped, so it can be copied from the screen; an
audit entry keeps to two lines at 100 columns, and --json keeps every detail."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from lib import audit
from lib.cli import render
from lib.cli.console import UI
from lib.points.catalog import Point
from lib.points.manifest import Manifest

LONGEST_ID = "rb_before_the_client_and_invoice_migrations_20261121_101500_999"  # a 40-character label, the 999th in a second
LONG_TEXT = "Before the client and invoice migration of the legacy system, with the address clean-up and the VAT fix " * 2


def point(point_id: str, description: str, *, migration_id: str | None = None, method: str = "dump") -> Point:
    manifest = {
        "id": point_id,
        "created_at": "2026-11-21T10:15:00.123+00:00",
        "migration_id": migration_id,
        "database": {"name": "staging_for_the_client_migration", "size_bytes": 123_456_789},
        "table": None,
        "method": method,
        "status": "completed",
        "description": description,
        "files": [],
    }
    return Point(Path("/nonexistent") / point_id, Manifest.from_dict(manifest))


POINTS = [
    point("rb_before_migration_test_20261121_101500", "Before migration test"),
    point(LONGEST_ID, LONG_TEXT, migration_id="client_and_invoice_migration_2026"),
    point("rb_before_rollback_staging_20261121_102000", "state before rollback to rb_before_migration_test", method="template"),
]


def rendered(draw, width: int) -> list[str]:
    ui = UI()
    ui._out = Console(width=width, file=io.StringIO(), highlight=False)
    draw(ui)
    return ui._out.file.getvalue().splitlines()


@pytest.mark.unit
@pytest.mark.parametrize("numbered", [False, True], ids=["list", "menu"])
@pytest.mark.parametrize("width", [80, 100, 160])
def test_every_point_id_is_whole_on_one_line_at_any_width(width, numbered):
    lines = rendered(lambda ui: render.points_table(ui, POINTS, numbered=numbered), width)
    assert len(LONGEST_ID) == 63
    for p in POINTS:
        assert any(p.id in line for line in lines), f"{p.id} is not whole on one line at {width} columns:\n" + "\n".join(lines)
    assert all(len(line) <= width for line in lines)
    assert len(lines) == 4 + len(POINTS) + 1  # title, three lines of header, a line per point, the bottom


@pytest.mark.unit
def test_the_description_is_cut_before_columns_are_left_out():
    wide = "\n".join(rendered(lambda ui: render.points_table(ui, POINTS), 240))
    assert "Migration ID" in wide and "client_and_invoice_migration" in wide
    assert "Before the client and" in wide and LONG_TEXT.strip() not in wide
    assert "…" in wide
    narrow = "\n".join(rendered(lambda ui: render.points_table(ui, POINTS), 100))
    assert "Migration ID" not in narrow and "Database" not in narrow and "Size" not in narrow


def test_a_piped_list_keeps_every_id_whole(staging):
    ids = [
        staging.create_point(LONG_TEXT),
        staging.create_point("x", "--migration-id", "client_and_invoice_migration_2026_2026_2026"),
    ]
    listed = staging.run("rollback_manager.py", "list")
    assert listed.returncode == 0, listed.stderr
    for point_id in ids:
        assert any(point_id in line for line in listed.stdout.splitlines()), listed.stdout
    data_id = staging.run_json("simple_rollback.py", "create", LONG_TEXT)["id"]
    simple = staging.run("simple_rollback.py", "list")
    assert simple.returncode == 0, simple.stderr
    assert any(data_id in line for line in simple.stdout.splitlines()), simple.stdout


def entries() -> list[dict]:
    error = "The rebuilt copy of the point does not match its manifest: " + "; ".join(
        f"public.table_{n}: {n} rows, the point has {n + 1}" for n in range(12)
    )
    return [
        {
            "timestamp": "2026-11-22T02:57:20+00:00",
            "event": "restore",
            "point_id": LONGEST_ID,
            "migration_id": "client_and_invoice_migration_2026",
            "user": "operator",
            "host": "staging-jumphost.example.internal",
            "outcome": "failed",
            "error": error,
            "duration_seconds": 12.3456,
            "mode": "swap",
        },
        {
            "timestamp": "2026-11-22T02:58:20+00:00",
            "event": "create",
            "point_id": "rb_before_migration_test_20261121_101500",
            "user": "operator",
            "host": "h",
            "outcome": "succeeded",
            "method": "dump",
            "duration_seconds": 1.2,
        },
    ]


@pytest.mark.unit
@pytest.mark.parametrize("width", [80, 100, 160])
def test_an_audit_entry_keeps_to_two_lines(width):
    lines = rendered(lambda ui: render.audit_trail(ui, entries()), width)
    starts = [n for n, line in enumerate(lines) if "2026-11-22 02:5" in line]
    bottom = next(n for n, line in enumerate(lines) if line.startswith("└"))
    assert [b - a for a, b in zip(starts, [*starts[1:], bottom], strict=True)] == [2, 2]
    assert all(len(line) <= width for line in lines)
    if width >= 100:
        shown = "\n".join(lines)
        assert "The rebuilt" in shown and "…" in shown and "public.table_11" not in shown


def test_audit_json_keeps_every_detail(staging):
    for entry in entries():
        audit.append(staging.log_dir, entry)
    result = staging.run("rollback_manager.py", "audit", "--json")
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found[0]["error"] == entries()[0]["error"] and "public.table_11: 11 rows" in found[0]["error"]
    table = staging.run("rollback_manager.py", "audit")
    assert table.returncode == 0 and LONGEST_ID in table.stdout and "public.table_11" not in table.stdout


@pytest.mark.unit
def test_at_80_columns_a_point_shows_when_it_was_made_and_how_and_at_120_its_migration():
    typical = [
        point("rb_client_migration_20261121_101500", "Before the clients", migration_id="client_migration"),
        point("rb_before_rollback_staging_20261121_102000", "state before rollback to rb_client_migration", method="template"),
    ]
    narrow = "\n".join(rendered(lambda ui: render.points_table(ui, typical), 80))
    assert "Created (UTC)" in narrow and "Method" in narrow and "2026-11-21 10:15:00" in narrow and "template" in narrow
    wide = "\n".join(rendered(lambda ui: render.points_table(ui, typical), 120))
    assert "Migration ID" in wide and "client_migration" in wide and "Description" in wide and "Created (UTC)" in wide
