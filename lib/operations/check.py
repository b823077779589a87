"""check_setup.py's work: is everything in place for taking points and rolling back?
Each finding is ok, a warning or a failure, and says how to fix what is not ok."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from lib.config import ConnInfo, Settings
from lib.errors import RollbackError
from lib.files import human_size
from lib.pg.db import connection, not_owned, query, server_facts
from lib.pg.target import open_target
from lib.pg.tools import candidates_for_server
from lib.points.catalog import Catalog, refuse_a_file_for_a_folder
from lib.points.clone import known_choice
from lib.points.methods import pitr as pitr_method
from lib.undo import capture


@dataclass
class Finding:
    item: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _server(name: str, info: ConnInfo, settings: Settings, *, staging: bool) -> tuple[list[Finding], object | None]:
    findings = [Finding(f"{name} URL", "ok", info.masked())]
    try:
        with connection(info, readonly=not staging, application_name="rollback-toolkit check") as conn:
            facts = server_facts(conn)
            can_signal = staging and bool(
                query(conn, "SELECT pg_has_role(current_user, 'pg_signal_backend', 'MEMBER') OR %s", (facts.is_superuser,))[0][0]
            )
            undo = _undo_finding(conn, settings) if staging else None
            unowned = not_owned(conn) if staging else (0, [])
    except RollbackError as exc:
        findings.append(Finding(f"{name} server", "fail", exc.message, exc.hint or "Check the URL, the server and the password."))
        return findings, None
    findings.append(
        Finding(
            f"{name} server",
            "ok",
            f"PostgreSQL {facts.version} at {info.server_label()}, database {info.dbname}, role {facts.current_user}",
        )
    )
    for tool in ("pg_dump", "pg_restore"):
        try:
            chosen = candidates_for_server(tool, facts.major, settings)[0]
            findings.append(Finding(f"{tool} for {name}", "ok", chosen.describe()))
        except RollbackError as exc:
            findings.append(
                Finding(
                    f"{tool} for {name}",
                    "warn" if staging else "fail",
                    exc.message.split(" Installed copies:")[0],
                    "Install the client tools of that major, or set PG_BIN_DIR; data points (simple_rollback.py) need none.",
                )
            )
    if staging:
        findings.append(
            Finding("create databases", "ok", f"role {facts.current_user} may: template points and swaps work")
            if facts.can_create_db
            else Finding(
                "create databases",
                "warn",
                f"role {facts.current_user} may not: points are dumps, restores run in place in one transaction",
                f"For template points and swap restores: ALTER ROLE {facts.current_user} CREATEDB;",
            )
        )
        findings.append(_restore_finding(facts, info, unowned))
        findings.append(_copy_finding(settings, facts, info))
        findings.append(_pitr_finding(settings, conn_info=info))
        findings.append(undo)
        findings.append(
            Finding("end sessions", "ok", f"role {facts.current_user} may end other sessions on staging")
            if can_signal
            else Finding(
                "end sessions",
                "warn",
                f"role {facts.current_user} may not end other roles' sessions; a restore waits for them to disconnect",
                f"GRANT pg_signal_backend TO {facts.current_user};",
            )
        )
    return findings, facts


def _restore_finding(facts, info: ConnInfo, unowned: tuple[int, list[str]]) -> Finding:
    """Whether this role can put staging back at all: by a swap (owner with CREATEDB, or a
    superuser), else in place (owner of every object the restore makes again)."""
    role = facts.current_user
    if facts.is_superuser or (facts.can_create_db and facts.is_db_owner):
        return Finding("restores", "ok", f"role {role} may swap a restored copy in")
    count, named = unowned
    if not count:
        return Finding("restores", "ok", f"role {role} owns every object: restores run in place, in one transaction")
    return Finding(
        "restores",
        "fail",
        f"role {role} may neither swap a copy in (it needs to own {info.dbname} and CREATEDB) nor restore in place: "
        f"{count} object(s) are not its own: {', '.join(named)}" + (" …" if count > len(named) else ""),
        f"Run restores as the owner (or a superuser), or ALTER DATABASE {info.dbname} OWNER TO {role}; "
        f"REASSIGN OWNED BY <old owner> TO {role}; (and ALTER ROLE {role} CREATEDB for swaps)",
    )


def _undo_finding(conn, settings: Settings) -> Finding:
    """Whether a production run can capture its changes for an undo here (ROLLBACK_UNDO),
    and exactly what is missing where it cannot; reads only."""
    if settings.rollback_undo == "off":
        return Finding("undo log", "ok", "ROLLBACK_UNDO=off: production runs are put back by their point only")
    role = query(conn, "SELECT current_user")[0][0]
    if not capture.readable(conn) and not query(conn, "SELECT has_database_privilege(current_database(), 'CREATE')")[0][0]:
        return Finding(
            "undo log",
            "fail",
            f"role {role} may not create the schema {capture.SCHEMA} the undo log lives in",
            f"GRANT CREATE ON DATABASE … TO {role}; (or create the schema for it), or ROLLBACK_UNDO=off",
        )
    tables = capture.user_tables(conn)
    no_trigger = [
        f"{s}.{n}"
        for s, n in query(
            conn,
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema', %s) "
            "AND n.nspname NOT LIKE 'pg\\_%%' AND NOT (has_schema_privilege(n.oid, 'USAGE') "
            "AND has_table_privilege(c.oid, 'TRIGGER')) ORDER BY 1, 2",
            (capture.SCHEMA,),
        )
    ]
    if no_trigger:
        return Finding(
            "undo log",
            "fail",
            f"role {role} may not put triggers on {len(no_trigger)} table(s): {', '.join(no_trigger[:5])}"
            + (" …" if len(no_trigger) > 5 else ""),
            f"Let {role} own them (or GRANT USAGE on their schema and TRIGGER ON them); or ROLLBACK_UNDO=off",
        )
    _, keyless = capture.plan(conn, "", tables)
    ddl = "DDL seen by an event trigger" if capture.may_watch_ddl(conn) else "DDL found by a digest of the tables' columns"
    if keyless and settings.rollback_undo == "on":
        names = ", ".join(f"{s}.{n}" for s, n in keyless[:5]) + (" …" if len(keyless) > 5 else "")
        return Finding(
            "undo log",
            "warn",
            f"{len(keyless)} table(s) without a primary key: a production run that does not name its tables refuses ({names})",
            "Give them a key, name a migration's tables (TABLES = [...]), or ROLLBACK_UNDO=keyed / --undo-keyed-only",
        )
    return Finding("undo log", "ok", f"production runs capture their changes ({len(tables)} table(s); {ddl})")


def _pitr_finding(settings: Settings, *, conn_info: ConnInfo) -> Finding:
    """Whether pitr points will work here, and why not; nothing is changed (no backup, no WAL switch)."""
    if not settings.pgbackrest_stanza:
        return Finding("pitr points", "ok", "not configured (PGBACKREST_STANZA is not set): template, dump and data points only")
    try:
        with open_target(settings, check_v2=False) as target:
            cluster, repo = pitr_method.repository_for(target, needed_for="A pitr point")
            pitr_method.check_archiving(target, repo)
            backups = repo.backups()
            holds = repo.backup_holding(target.dbname, target.facts.database_oid, pitr_method.history(target))
    except RollbackError as exc:
        return Finding("pitr points", "fail", exc.message, exc.hint or "")
    if holds is None:
        return Finding(
            "pitr points",
            "warn",
            f"stanza {repo.stanza}: {len(backups)} backup(s), none holding {conn_info.dbname} as it is now",
            "The first pitr point takes one (incremental when a full one exists), which takes longer.",
        )
    return Finding(
        "pitr points",
        "ok",
        f"stanza {repo.stanza} (cluster {cluster.data_dir}, run as {cluster.owner.pw_name}): {len(backups)} backup(s), "
        f"newest holding {conn_info.dbname}: {holds.label}; archiving on",
    )


def _copy_finding(settings: Settings, facts, info: ConnInfo) -> Finding:
    """How the server will copy staging for a template point, and why; nothing is probed here."""
    choice = known_choice(settings, facts, info.server_label())
    if choice is None:
        return Finding(
            "database copies",
            "ok",
            "FILE_COPY_METHOD=auto, not decided yet for this server: the first template point decides (an FICLONE "
            "probe in each tablespace's folder, or a measured 64 MB copy) and remembers it in BACKUP_DIR/.servers/",
        )
    how = "; ".join(f"{name}: {found.get('how')}" for name, found in choice.evidence.items())
    return Finding("database copies", "ok", f"{choice.method}: {choice.why}" + (f" ({how})" if how else ""))


def run_checks(settings: Settings) -> list[Finding]:
    findings: list[Finding] = []
    try:
        staging_info = settings.staging()
    except RollbackError as exc:
        findings.append(Finding("staging URL", "fail", exc.message, exc.hint or "Set STAGING_DATABASE_URL in .env."))
        staging_info = None
    staging_facts = None
    if staging_info:
        more, staging_facts = _server("staging", staging_info, settings, staging=True)
        findings += more
    try:
        v2_info = settings.v2()
    except RollbackError as exc:
        findings.append(Finding("V2 URL", "fail", exc.message, exc.hint or "Fix V2_DATABASE_URL in .env."))
        v2_info = None
    if v2_info is None and not any(f.item == "V2 URL" for f in findings):
        findings.append(Finding("V2 URL", "warn", "not set", "Set V2_DATABASE_URL for migrations and reset_staging.py."))
    v2_facts = None
    if v2_info:
        more, v2_facts = _server("V2", v2_info, settings, staging=False)
        findings += more
    if staging_facts and v2_facts:
        same = (
            staging_facts.system_identifier == v2_facts.system_identifier and staging_facts.database_oid == v2_facts.database_oid
        )
        findings.append(
            Finding("V2 is not staging", "fail", "both URLs reach the same database", "Fix one of the URLs: V2 is never written.")
            if same
            else Finding("V2 is not staging", "ok", "different databases")
        )
    findings += _backup_dir(settings, staging_facts)
    findings.append(log_dir_finding(settings.log_dir))
    return findings


def _backup_dir(settings: Settings, staging_facts) -> list[Finding]:
    root = settings.backup_dir
    try:
        refuse_a_file_for_a_folder(root)
    except RollbackError as exc:
        return [Finding("backup folder", "fail", exc.message, exc.hint or "")]
    existing = _nearest_existing(root)
    if not os.access(existing, os.W_OK | os.X_OK):
        return [Finding("backup folder", "fail", f"{root} cannot be written", f"Make {existing} writable, or set BACKUP_DIR.")]
    points = Catalog(root).points() if root.is_dir() else []
    free = shutil.disk_usage(existing).free
    found = [Finding("rollback points", "ok", f"{len(points)} in {root}")]
    need = staging_facts.database_size if staging_facts else 0
    detail = f"{human_size(free)} free in {root}" + (f"; staging is {human_size(need)}" if need else "")
    if need and free < need:
        found.append(
            Finding("free space", "warn", detail, "A dump point may not fit: free space or set BACKUP_DIR to a larger disk.")
        )
    else:
        found.append(Finding("free space", "ok", detail))
    return found


def _nearest_existing(path: Path) -> Path:
    """The folder itself, or the nearest parent that exists (where it would be created)."""
    return next(p for p in [path, *path.parents] if p.exists())


def log_dir_finding(log_dir: Path) -> Finding:
    existing = _nearest_existing(log_dir)
    if os.access(existing, os.W_OK | os.X_OK):
        return Finding("log folder", "ok", str(log_dir))
    return Finding("log folder", "fail", f"{log_dir} cannot be written", "Make it writable, or set LOG_DIR.")
