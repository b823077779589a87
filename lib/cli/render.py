"""Tables and detail views for people; the scripts print JSON themselves."""

from __future__ import annotations

from dataclasses import dataclass

from lib.cli.console import UI
from lib.files import age, human_size, percent
from lib.points.catalog import Point
from lib.points.methods import registry
from lib.points.methods.dump import SEQUENCES_NOT_RECORDED


def Table(*columns, **options):
    """rich's Table, loaded when a table is drawn (a script's quiet call never draws one)."""
    from rich.table import Table as RichTable

    return RichTable(*columns, **options)


@dataclass
class _Column:
    """A column that is cut or left out, never wrapped, when the screen is narrow."""

    header: str
    cells: list[str]
    cap: int = 0  # wider cells are cut to this with an ellipsis (0: never cut)
    shrink_to: int = 0  # the column takes what room is left, down to this, or is left out
    justify: str = "left"

    @property
    def natural(self) -> int:
        from rich.cells import cell_len

        widest = max(cell_len(line) for text in [self.header, *self.cells] for line in text.split("\n"))
        return min(widest, self.cap) if self.cap else widest


def _fit(columns: dict[str, _Column], width: int, leave_out: list[str]) -> dict[str, int]:
    """Column widths for a table of at most ``width`` cells: columns are left out in the
    order of ``leave_out`` until the rest fits, then those left out last are taken back
    where they still fit. A column never named there stays whole."""
    shown = list(columns)
    dropped: list[str] = []
    for name in [None, *leave_out]:
        if name is not None:
            shown.remove(name)
            dropped.append(name)
        if _widths(columns, shown, width) is not None:
            break
    for name in reversed(dropped):
        wider = [n for n in columns if n in shown or n == name]
        if _widths(columns, wider, width) is not None:
            shown = wider
    return _widths(columns, shown, width) or {name: columns[name].natural for name in shown}


def _widths(columns: dict[str, _Column], shown: list[str], width: int) -> dict[str, int] | None:
    """Every column at its natural width, those that shrink given what room is left (in
    order); None when one cannot have its least. A column costs 3 cells more for its
    border and padding, the table 1."""
    widths = {name: columns[name].natural for name in shown}
    flexible = [name for name in shown if columns[name].shrink_to]
    least = {name: min(columns[name].shrink_to, widths[name]) for name in flexible}
    room = width - 1 - 3 * len(shown) - sum(widths[name] for name in shown if name not in flexible)
    for i, name in enumerate(flexible):
        widths[name] = min(widths[name], room - sum(least[n] for n in flexible[i + 1 :]))
        if widths[name] < least[name]:
            return None
        room -= widths[name]
    return widths if room >= 0 else None


def _draw(ui: UI, columns: dict[str, _Column], widths: dict[str, int], **options) -> None:
    table = Table(**options)
    for name, width in widths.items():
        table.add_column(columns[name].header, width=width, no_wrap=True, overflow="ellipsis", justify=columns[name].justify)
    for row in zip(*(columns[name].cells for name in widths), strict=True):
        table.add_row(*row)
    ui.out.print(table)


def points_table(ui: UI, points: list[Point], *, numbered: bool = False) -> None:
    """Every point on one line. An id is never cut or wrapped, so it can be copied from the
    screen: on a narrow screen the description is shortened first, then Table, Database,
    Size, Status, Migration ID and Description are left out, in that order."""
    if not points:
        ui.out.print('No rollback points yet. Take one with: python3 create_rollback_point.py "Before migration"')
        return
    summaries = [registry.summary(p) for p in points]
    columns = {"#": _Column("#", [str(n) for n in range(1, len(points) + 1)], justify="right")} if numbered else {}
    columns.update(
        id=_Column("ID", [s["id"] for s in summaries]),
        migration=_Column("Migration ID", [s["migration_id"] or "-" for s in summaries], cap=30),
        database=_Column("Database", [s["database"] for s in summaries], cap=30),
        table=_Column("Table", [s["table"] or "(all)" for s in summaries], cap=24),
        method=_Column("Method", [s["method"] for s in summaries]),
        size=_Column("Size", [human_size(s["size_bytes"]) for s in summaries], justify="right"),
        status=_Column(
            "Status", [(s["status"] or "?") + (f" ({s['verified']})" if s.get("verified") else "") for s in summaries]
        ),
        created=_Column("Created (UTC)", [(s["created_at"] or "?")[:19].replace("T", " ") for s in summaries]),
        description=_Column("Description", [s["description"] or "" for s in summaries], shrink_to=12),
    )
    # left out first to last: at 80 columns ID, Method and Created stay (the description
    # is shortened, then left out), at 120 the migration id and the description too
    order = ["table", "database", "size", "status", "migration", "description", "method", "created"]
    widths = _fit(columns, ui.out.width, order)
    _draw(ui, columns, widths, title="Rollback points (oldest first)", title_justify="left")


def _sequences(fp) -> str:
    """How many the point recorded, or why it recorded none (a dump point says so)."""
    if "sequences" not in fp and fp.get(SEQUENCES_NOT_RECORDED):
        return f"not recorded: {fp[SEQUENCES_NOT_RECORDED]}"
    return str(len(fp.get("sequences") or {}))


def point_details(ui: UI, point: Point) -> None:
    m = point.manifest
    db = m.database
    fp = m.fingerprint or {}
    tool = m.tool.as_dict() if m.tool else {}
    rows = [
        ("ID", point.id),
        ("Description", m.description or ""),
        ("Migration ID", m.migration_id or "-"),
        ("Kind", f"{m.kind}" + (f" (restoring {m.restored_point})" if m.restored_point else "")),
        ("Created", f"{m.created_at_text} ({age(m.created_at_text)})"),
        ("Status", m.status),
        ("Verified", _verified(point)),
        ("Method", point.method),
        ("Database", f"{db.name} — {db.url}"),
        ("Server", f"PostgreSQL {db.server_version} (system id {db.system_identifier or 'unknown'})"),
        ("Database size", human_size(db.size_bytes)),
        ("Written by", f"{m.tool.path} ({m.tool.version})" if tool else "-"),
        ("Database copy", m.template_database or "-"),
        ("Copied by", f"{m.copy['method']}: {m.copy['why']}" if m.copy else "-"),
        ("Folder", str(point.path)),
        ("Schema digest", f"{fp.get('schema_digest', '?')[:16]}… over {fp.get('schema_objects')} objects"),
        ("Rows", _rows(point)),
        ("Sequences", _sequences(fp)),
        ("Large objects", str(fp.get("large_objects", 0))),
    ]
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for k, v in rows:
        table.add_row(k, str(v))
    ui.out.print(table)
    files = Table("File", "Size", "sha256", title="Files", title_justify="left")
    for f in m.files:
        files.add_row(f.name, human_size(f.size), f.sha256)
    if m.files:
        ui.out.print(files)
    counts = Table("Table", "Rows", title="Row counts", title_justify="left")
    for name, n in sorted(fp.get("row_counts", {}).items()):
        counts.add_row(name, str(n))
    if fp.get("row_counts"):
        ui.out.print(counts)


def file_details(ui: UI, details: dict, point: Point | None) -> None:
    """info --file: a point folder as `info` shows a point, with its files' check; a bare archive's header."""
    if point is not None:
        point_details(ui, point)
        files = details["files"]
        ui.out.print("Files: " + ("every file matches the manifest" if files == "ok" else "; ".join(files)))
        return
    names = {
        "file": "File",
        "size_bytes": "Size",
        "sha256": "sha256",
        "format": "Format",
        "created_at": "Created",
        "database": "Database",
        "server_version": "Dumped from PostgreSQL",
        "pg_dump_version": "Dumped by pg_dump",
        "compression": "Compression",
        "entries": "Table of contents entries",
        "read_by": "Read by",
    }
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in details.items():
        shown = human_size(value) if key == "size_bytes" else value
        table.add_row(names.get(key, key), str(shown))
    ui.out.print(table)


def _verified(point: Point) -> str:
    """Which verification the point has passed, and when."""
    method = registry.find(point.method)
    return method.describe_verification(point) if method else "none: its manifest cannot be read"


def _rows(point: Point) -> str:
    method = registry.find(point.method)
    return method.describe_rows(point) if method else "unknown"


def diff_lines(ui: UI, found) -> None:
    ui.out.print(f"Restoring {found.point_id} would undo:")
    for line in found.lines():
        ui.out.print(f"  {line}")


def partial_outcome(ui: UI, outcome: dict) -> None:
    ui.ok(f"{sum(outcome['deleted'].values())} row(s) added since {outcome['point_id']} deleted; every other row kept.")
    if outcome.get("before_point_id"):
        ui.info(f"Undo with: python3 rollback_manager.py restore {outcome['before_point_id']}")


def restore_outcome(ui: UI, result, *, as_json: bool, headline: str) -> int:
    """The end of a restore: the result as JSON, or a line and the way to undo it; the
    exit code (1 when the command after the swap failed: something is left paused)."""
    if as_json:
        ui.emit_json(result.as_dict())
    else:
        ui.ok(headline)
        if getattr(result, "verified", None):
            ui.info(f"Checked before it was swapped in: {result.verified}")
        if result.before_point_id:
            ui.info(
                f"The state before is kept as point {result.before_point_id}; "
                f"undo with: python3 rollback_manager.py restore {result.before_point_id}"
            )
    if getattr(result, "after_swap_failed", None):
        ui.error(result.after_swap_failed)
        return 1
    return 0


def migration_report(ui: UI, report) -> None:
    """run_migration.py's summary: counts, rate, duration, point, what changed."""
    d = report.as_dict()
    table = Table(show_header=False, box=None, pad_edge=False, title=f"{d['migration_id']}: {d['mode']}", title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    rate = f"{percent(report.tally.failure_rate)} (threshold {percent(report.threshold)})"
    for key, value in (
        ("Outcome", d["outcome"]),
        ("Migrated", f"{d['migrated']} (undone by the rollback)" if d["restored_to"] or d["undone"] else d["migrated"]),
        ("Failed", d["failed"]),
        ("Skipped", d["skipped"]),
        ("Failure rate", rate + (", passed" if d["threshold_exceeded"] else "")),
        ("Batches committed", d["batches_committed"] if d["mode"] == "production" else "none (dry run)"),
        ("Duration", f"{d['duration_seconds']:.1f} s"),
        ("Rollback point", d["point_id"] or "none"),
        ("Restored to", d["restored_to"] or "-"),
        *([("Undo log", f"run {d['undo_run']}" + (", undone" if d["undone"] else ""))] if d["undo_run"] else []),
        ("Failures file", d["failures_file"] or "-"),
        *([("Retry of", d["retry_of"])] if d["retry_of"] else []),
    ):
        table.add_row(key, str(value))
    ui.out.print(table)
    verb = "would change" if d["mode"] == "dry run" else "changed"
    if d["changes"] and d["outcome"] in ("dry run", "succeeded"):  # counted for dry runs and .sql migrations
        changes = Table("Table", "Inserted", "Updated", "Deleted", title=f"Rows the migration {verb}", title_justify="left")
        for name, c in d["changes"].items():
            changes.add_row(name, str(c["inserted"]), str(c["updated"]), str(c["deleted"]))
        ui.out.print(changes)
    for note in d["notes"]:
        ui.info(note)
    if d["before_rollback_point_id"]:
        ui.info(f"The migrated state is kept as point {d['before_rollback_point_id']}.")


def migrations_folder(ui: UI, folder) -> None:
    """run_migration.py FOLDER: each run's summary (where it stopped was said as it stopped)."""
    for report in folder.reports:
        migration_report(ui, report)
    if folder.already_applied:
        ui.info(f"Already applied (not run again): {', '.join(folder.already_applied)}.")
    if folder.stopped_at is None and folder.reports:
        ui.ok(f"{len(folder.reports)} migration(s) of {folder.folder} ran ({folder.mode}).")


def migration_status(ui: UI, found) -> None:
    """run_migration.py --status: applied, rolled back and pending migrations with their points."""
    table = Table(title=f"Migrations of {found.database}", title_justify="left")
    for col in ("Migration", "File", "State", "Point", "When (UTC)", "Detail"):
        table.add_column(col, overflow="fold")
    style = {"applied": "green", "rolled back": "yellow", "pending": "cyan"}
    for m in found.migrations:
        table.add_row(
            m.migration_id,
            m.file or "-",
            f"[{style.get(m.state, 'bold')}]{m.state}[/]",
            m.point_id or "-",
            (m.when or "-")[:19].replace("T", " "),
            m.detail,
        )
    ui.out.print(table)
    if not found.ledger:
        ui.info("Staging has no ledger yet: no production run has applied a migration to it.")
    if found.runs:
        runs = Table(title="Captured runs (rollback_manager.py undo RUN)", title_justify="left")
        for col in ("Run", "Started (UTC)", "Tables", "Undo"):
            runs.add_column(col, overflow="fold")
        colour = {"available": "green", "undone": "yellow"}
        for r in found.runs:
            state = r["undo"] + (f" at {r['undone_at'][:19].replace('T', ' ')}" if r.get("undone_at") else "")
            runs.add_row(
                r["run_id"],
                (r["started_at"] or "-")[:19].replace("T", " "),
                str(len(r["tables"])),
                f"[{colour.get(r['undo'], 'red')}]{state}[/]",
            )
        ui.out.print(runs)


def audit_trail(ui: UI, entries: list[dict]) -> None:
    """One entry in two lines at most: when and by whom, what and how it ended, the point
    and migration, and the details cut with an ellipsis (--json has them whole)."""
    from lib.audit import details

    if not entries:
        ui.out.print("The audit trail is empty.")
        return
    columns = {
        "when": _Column(
            "Time (UTC) / by",
            [
                f"{str(e.get('timestamp', '?'))[:19].replace('T', ' ')}\n{e.get('user', '?')}@{e.get('host', '?')}"
                for e in entries
            ],
            cap=19,
        ),
        "what": _Column("Event / outcome", [f"{e.get('event', '?')}\n{e.get('outcome') or '?'}" for e in entries], cap=18),
        "point": _Column(
            "Point / migration",
            [f"{e.get('point_id') or '-'}\n{e.get('migration_id') or ''}".rstrip() for e in entries],
            shrink_to=24,
        ),
        "details": _Column("Details", [details(e) for e in entries], shrink_to=12),
    }
    widths = _fit(columns, ui.out.width, ["details"])
    if "details" in widths:
        columns["details"].cells = [_two_lines(text, widths["details"]) for text in columns["details"].cells]
    _draw(ui, columns, widths, title="Audit trail (oldest first)", title_justify="left")


def _two_lines(text: str, width: int) -> str:
    """``text`` wrapped to ``width`` in two lines at most, the second cut with an ellipsis."""
    import textwrap

    lines = textwrap.wrap(text, width=width) or [""]
    if len(lines) > 2:
        lines = [lines[0], lines[1][: width - 1] + "…"]
    return "\n".join(lines)


def findings(ui: UI, found: list) -> None:
    """check_setup.py's table: one line per finding, with the fix where it is not ok."""
    mark = {"ok": "[green]ok[/]", "warn": "[yellow]warning[/]", "fail": "[bold red]FAILED[/]"}
    table = Table(title="Configuration and connections", title_justify="left")
    for col in ("Check", "Status", "Detail", "Fix"):
        table.add_column(col, overflow="fold")
    for f in found:
        table.add_row(f.item, mark.get(f.status, f.status), f.detail, f.fix)
    ui.out.print(table)
    failed = sum(f.status == "fail" for f in found)
    warned = sum(f.status == "warn" for f in found)
    ui.out.print(f"{failed} failed, {warned} warning(s), {len(found) - failed - warned} ok")


def undo_outcome(ui: UI, done: dict) -> None:
    """rollback_manager.py undo: what was (or, in a dry run, would be) put back."""
    conflicts = len(done["conflicts"])
    if done["dry_run"]:
        ui.ok(f"Dry run: nothing was changed ({conflicts} conflict(s))")
        return
    rows = sum(done["deleted"].values()) + sum(done["restored"].values()) + sum(done["reinserted"].values())
    skipped = f"; {conflicts} conflict(s) left as they are now" if conflicts else ""
    ui.ok(f"Run {done['run_id']} undone: {rows} row(s) put back in {done['seconds']} s{skipped}")
    ui.info("Other sessions' writes were kept; sequences were left where they are.")
