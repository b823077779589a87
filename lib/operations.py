"""The operations the scripts offer: create, list, info, verify, restore, delete.

Each takes settings and a UI, does its work under the database's lock where it
changes anything, leaves an audit entry, and raises on failure."""

from __future__ import annotations

import getpass
import logging
import os
import socket
from pathlib import Path

from .audit import audited
from .catalog import Catalog, Point, check_files, sha256_file
from .config import Settings
from .console import UI
from .errors import ConfigError, VerificationError
from .locking import operation_lock
from .methods import dump as dump_method
from .methods import template as template_method
from .restore import RestoreResult, check_point_usable, plan, restore_in_place, restore_swap
from .target import Target, open_target

log = logging.getLogger(__name__)

METHODS = ("dump",)


def _who() -> dict:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return {"user": user, "host": socket.gethostname(), "pid": os.getpid()}


def _take(
    target: Target, catalog: Catalog, ui: UI, *, description: str, migration_id: str | None, method: str, kind: str = "manual"
) -> Point:
    base = {
        "description": description,
        "migration_id": migration_id,
        "table": None,
        "kind": kind,
        "created_by": _who(),
    }
    label = migration_id or description
    if method == "dump":
        return dump_method.take(target, catalog, ui, label=label, base_manifest=base)
    raise ConfigError(f"Unknown method {method!r}.", f"Choose one of: {', '.join(METHODS)}.")


def create_point(settings: Settings, ui: UI, *, description: str, migration_id: str | None = None, method: str = "dump") -> Point:
    if method not in METHODS:
        raise ConfigError(f"Unknown method {method!r}.", f"Choose one of: {', '.join(METHODS)}.")
    catalog = Catalog(settings.backup_dir).ensure()
    with open_target(settings) as target:
        ui.step(
            f"Rollback point of {target.dbname} on {target.info.server_label()} "
            f"(PostgreSQL {target.facts.version}, method {method})"
        )
        with audited(settings.log_dir, "create", target.masked) as record:
            with operation_lock(catalog.root, target.maint, target.facts.system_identifier, target.dbname, "create"):
                point = _take(target, catalog, ui, description=description, migration_id=migration_id, method=method)
            record.set(point_id=point.id, method=point.method)
    return point


def list_points(settings: Settings) -> list[Point]:
    return Catalog(settings.backup_dir).points()


def get_point(settings: Settings, point_id: str) -> Point:
    return Catalog(settings.backup_dir).get(point_id)


def file_info(settings: Settings, path: Path) -> dict:
    """info --file: a point folder, a manifest, or a bare pg_dump archive."""
    path = Path(path)
    if path.is_dir() and (path / "manifest.json").is_file():
        path = path / "manifest.json"
    if path.name == "manifest.json" and path.is_file():
        point = Catalog(path.parent.parent).get(path.parent.name)
        return {"point": point.manifest, "files": "ok" if not check_files(point) else check_files(point)}
    if not path.is_file():
        raise ConfigError(f"{path} does not exist or is not a file.", "Give the path of an archive or a point folder.")
    header = dump_method.archive_header(path, settings)
    return {"file": str(path), "size_bytes": path.stat().st_size, "sha256": sha256_file(path), **header}


def verify_point(settings: Settings, ui: UI, point_id: str) -> dict:
    catalog = Catalog(settings.backup_dir)
    point = catalog.get(point_id)
    with audited(settings.log_dir, "verify", point.manifest.get("database", {}).get("url"), point.id) as record:
        result: dict = {"id": point.id, "method": point.method}
        problems = check_files(point)
        if problems:
            raise VerificationError(
                f"Point {point.id} failed its checksums: " + "; ".join(problems) + ".",
                "Use an earlier point (`python3 rollback_manager.py list`).",
            )
        result["checksums"] = f"{len(point.manifest.get('files', []))} file(s) match"
        ui.ok(f"Checksums of {point.id} match")
        if point.method == "dump":
            with ui.progress(f"Reading the archive of {point.id} end to end"):
                result.update(dump_method.verify_archive(point, settings))
            ui.ok("Archive read end to end")
        elif point.method == "template":
            with open_target(settings, check_v2=False) as target:
                result.update(template_method.verify_point_database(target, point))
            ui.ok("Database copy matches the manifest")
        result["verified"] = True
        record.set(outcome="verified")
    return result


def restore_point(settings: Settings, ui: UI, point_id: str, *, assume_yes: bool) -> RestoreResult:
    catalog = Catalog(settings.backup_dir).ensure()
    point = catalog.get(point_id)
    with open_target(settings) as target, audited(settings.log_dir, "restore", target.masked, point.id) as record:
        with operation_lock(catalog.root, target.maint, target.facts.system_identifier, target.dbname, "restore"):
            check_point_usable(target, catalog, point)
            rplan = plan(target, point)
            ui.info(rplan.describe(target))
            ui.confirm("Go ahead?", assume_yes=assume_yes, what=f"restore {target.dbname}")
            if rplan.mode == "swap":
                result = restore_swap(target, catalog, rplan, ui)
            else:
                result = restore_in_place(
                    target,
                    catalog,
                    rplan,
                    ui,
                    lambda description, kind: _take(
                        target, catalog, ui, description=description, migration_id=None, method="dump", kind=kind
                    ),
                )
        record.set(mode=result.mode, before_point_id=result.before_point_id, unavailable_seconds=result.unavailable_seconds)
    return result
