"""advanced_rollback.py: choose a point from a numbered list, choose full or partial,
see what it would undo, confirm. Every step is the operations the other scripts use."""

from __future__ import annotations

from lib.cli import render
from lib.cli.console import UI
from lib.config import Settings
from lib.errors import ConfigError, ConfirmationRefused, RollbackError
from lib.interaction import Confirmer
from lib.operations import commands as operations
from lib.points.catalog import refuse_damaged_manifest
from lib.points.manifest import Kind
from lib.points.methods import registry


def choose_point(settings: Settings, ui: UI, ask: Confirmer):
    points = operations.list_points(settings)
    if not points:
        raise ConfigError(
            f"There are no rollback points in {settings.backup_dir}.",
            'Take one with `python3 create_rollback_point.py "Before migration"`, or rebuild staging from V2 '
            "with `python3 reset_staging.py`.",
        )
    render.points_table(ui, points, numbered=True)
    # the default is the newest point taken on purpose, never a state kept before a rollback
    taken = [n for n, p in enumerate(points, start=1) if p.manifest.kind != Kind.BEFORE_ROLLBACK]
    answer = ask.choose(
        "Restore which point? (number)",
        what="the point to restore",
        choices=[str(n) for n in range(1, len(points) + 1)],
        default=str(taken[-1]) if taken else None,
    )
    point = points[int(answer) - 1]
    refuse_damaged_manifest(point)  # its method is unknown: nothing to restore it with
    return point


def walk_through(settings: Settings, ui: UI, ask: Confirmer) -> dict:
    if not ask.person:
        raise ConfirmationRefused(
            "advanced_rollback.py asks which point and how, and there is no terminal to ask on.",
            "Use `python3 rollback_manager.py restore <id> [--type partial] --yes` instead (nothing has been changed).",
        )
    point = choose_point(settings, ui, ask)
    kind = ask.choose(
        "Full restore (the whole point) or partial (only delete the rows added since)?",
        what="full or partial",
        choices=["full", "partial"],
        default="full",
    )
    found = None
    if not registry.of(point).read_by_rebuilding:  # a dump has no row keys to compare without restoring it
        try:
            found = operations.diff_point(settings, ui, point.id)
            ui.info(f"Restoring {point.id} would undo:")
            for line in found.lines():
                ui.info(f"  {line}")
        except RollbackError as exc:
            ui.warn(f"What it would undo could not be computed: {exc.message}")
    if kind == "partial":
        tables = None
        if found is not None:
            # only where rows were added; tables without a primary key cannot be compared row by row
            tables = [t.table for t in found.tables if t.has_primary_key and t.added]
            left = [t.table for t in found.tables if not t.has_primary_key and t.touched]
            if left:
                ui.warn(f"Left out (no primary key, so rows cannot be told apart): {', '.join(left)}")
            if not tables:
                ui.ok(f"No rows were added since {point.id} in tables with a primary key: nothing to delete.")
                return {"deleted": {}}
        outcome = operations.partial_rollback(settings, ui, ask, point.id, tables=tables)
        render.partial_outcome(ui, outcome)
        return outcome
    result = operations.restore_point(settings, ui, ask, point.id)
    render.restore_outcome(ui, result, as_json=False, headline=f"{result.database} restored to {result.point_id}.")
    return result.as_dict()
