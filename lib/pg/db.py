"""psycopg2 connections, server facts, sessions and database-level DDL."""

from __future__ import annotations

import hashlib
import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from lib.config import ConnInfo, redact
from lib.errors import ConnectError, ConnectProblem, DatabaseError
from lib.pg.retry import wait_until

log = logging.getLogger(__name__)

MAINTENANCE_DB = "postgres"
# The toolkit's own bookkeeping inside staging (the ledger of applied migrations): part
# of every point, left out of diffs and partial rollbacks, which are about the data.
TOOLKIT_SCHEMA = "rollback_toolkit"
MAX_IDENTIFIER_BYTES = 63


def _port_answers(info: ConnInfo) -> bool:
    """Does anything accept a connection at the URL's host and port (or socket)?"""
    hosts = (info.host or "").split(",") if info.host else ["/var/run/postgresql", "/tmp"]
    for host in hosts:
        host = host.strip()
        try:
            if host.startswith("/"):
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(3)
                    sock.connect(f"{host}/.s.PGSQL.{info.port}")
            else:
                socket.create_connection((host, info.port), timeout=3).close()
            return True
        except OSError:
            continue
    return False


def _maintenance_probe(info: ConnInfo, dbname: str) -> ConnectProblem | None:
    """Log in to another database of the server with the same role and password: where
    that works, the database itself is the problem, and the catalog says which."""
    for other in ("postgres", "template1"):
        if other == dbname:
            continue
        try:
            conn = psycopg2.connect(**info.connect_kwargs(other), application_name="rollback-toolkit probe")
        except psycopg2.Error:
            continue
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT datallowconn FROM pg_database WHERE datname = %s", (dbname,))
                row = cur.fetchone()
        finally:
            conn.close()
        if row is None:
            return ConnectProblem.NO_DATABASE
        return ConnectProblem.OTHER if row[0] else ConnectProblem.NOT_ACCEPTING
    return None


def classify_connect_failure(info: ConnInfo, dbname: str) -> ConnectProblem:
    """Why a connection failed, by probing: pg_isready's exit code (0 accepting, 1 rejecting,
    2 no answer) or, without it, a socket; then a login to another database."""
    from lib.pg.tools import ping

    answer = ping(info, dbname)
    if answer is None:
        answer = 0 if _port_answers(info) else 2
    if answer == 2:
        return ConnectProblem.UNREACHABLE
    if answer == 1:
        return ConnectProblem.NOT_READY
    return _maintenance_probe(info, dbname) or ConnectProblem.LOGIN_REFUSED


_CONNECT_HINTS = {
    ConnectProblem.UNREACHABLE: "Check that the server is running and that host and port in the URL are right "
    "(try: pg_isready -h HOST -p PORT).",
    ConnectProblem.NOT_READY: "The server answers but does not take connections yet (starting up, shutting down "
    "or recovering); wait and run the command again.",
    ConnectProblem.LOGIN_REFUSED: "The server refused this role's login: check the user name and the password in "
    "the URL (STAGING_DATABASE_URL / V2_DATABASE_URL or .env), and that pg_hba.conf lets this role in from here.",
    ConnectProblem.NO_DATABASE: "Check the database name in the URL; `rollback_manager.py list` shows the points "
    "and their databases.",
    ConnectProblem.NOT_ACCEPTING: "The database has connections disabled (ALLOW_CONNECTIONS false); a rollback "
    "may have been interrupted. See ROLLBACK_GUIDE.md, 'Recovering by hand'.",
    ConnectProblem.OTHER: "See the log for details.",
}


def explain_connect_error(info: ConnInfo, dbname: str, exc: Exception) -> ConnectError:
    """One paragraph: the server's own first line (in whatever language it speaks), and
    the next step chosen by probing, never by reading that line."""
    text = redact(str(exc).strip())
    target = f"database {dbname!r} on {info.server_label()} as {info.user or 'the default user'}"
    problem = classify_connect_failure(info, dbname)
    first = text.splitlines()[0] if text else type(exc).__name__
    return ConnectError(f"Could not connect to {target}: {first}.", _CONNECT_HINTS[problem], problem=problem)


TOOLKIT_APPLICATION = "rollback-toolkit"  # every session of the toolkit's names itself so, or starts so


def connect(
    info: ConnInfo,
    dbname: str | None = None,
    *,
    autocommit: bool = True,
    readonly: bool = False,
    application_name: str = TOOLKIT_APPLICATION,
    connection_factory=None,
    options: str | None = None,
) -> psycopg2.extensions.connection:
    """``options``: settings for the session given at its start (libpq's -c ...)."""
    name = dbname or info.dbname
    kwargs = info.connect_kwargs(name)
    kwargs.setdefault("application_name", application_name)
    if options:
        kwargs["options"] = (str(kwargs.get("options", "")) + " " + options).strip()
    if connection_factory is not None:
        kwargs["connection_factory"] = connection_factory
    if readonly:
        kwargs["options"] = (str(kwargs.get("options", "")) + " -c default_transaction_read_only=on").strip()
    try:
        conn = psycopg2.connect(**kwargs)
    except psycopg2.Error as exc:
        raise explain_connect_error(info, name, exc) from None
    conn.autocommit = autocommit
    if readonly:
        conn.set_session(readonly=True, autocommit=autocommit)
    return conn


@contextmanager
def connection(info: ConnInfo, dbname: str | None = None, **kwargs) -> Iterator[psycopg2.extensions.connection]:
    conn = connect(info, dbname, **kwargs)
    try:
        yield conn
    finally:
        conn.close()


def query(conn, statement, params=None) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(statement, params)
        return cur.fetchall() if cur.description else []


def scalar(conn, statement, params=None):
    rows = query(conn, statement, params)
    return rows[0][0] if rows else None


def execute(conn, statement, params=None) -> None:
    with conn.cursor() as cur:
        cur.execute(statement, params)


@contextmanager
def snapshot_session(
    info: ConnInfo, *, application_name: str, snapshot: str | None = None
) -> Iterator[psycopg2.extensions.connection]:
    """A read-only repeatable-read transaction: one consistent view of the database for
    as long as it is open (``snapshot`` imports one exported elsewhere). Rolled back at the end."""
    conn = connect(info, autocommit=False, readonly=True, application_name=application_name)
    try:
        conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
        if snapshot:
            execute(conn, "SET TRANSACTION SNAPSHOT %s", (snapshot,))
        yield conn
        conn.rollback()
    finally:
        conn.close()


@dataclass
class ServerFacts:
    version: str
    major: int
    system_identifier: str | None
    database_oid: int
    database_size: int
    current_user: str
    is_superuser: bool
    can_create_db: bool
    is_db_owner: bool
    db_owner: str
    tablespaces: list[str] = field(default_factory=list)  # the database's own and every one its relations use
    unlogged_tables: list[str] = field(default_factory=list)  # never in the WAL: emptied by crash recovery

    def as_dict(self) -> dict:
        return asdict(self)


def server_facts(conn) -> ServerFacts:
    row = query(
        conn,
        """
        SELECT current_setting('server_version'),
               current_setting('server_version_num')::int / 10000,
               d.oid, pg_database_size(d.oid), current_user,
               r.rolsuper, r.rolcreatedb,
               pg_has_role(current_user, d.datdba, 'USAGE'),
               pg_get_userbyid(d.datdba),
               ARRAY(SELECT DISTINCT t.spcname FROM pg_tablespace t
                      WHERE t.spcname <> 'pg_global'  -- the shared catalogs: never part of a database's copy
                        AND (t.oid = d.dattablespace OR t.oid IN (SELECT reltablespace FROM pg_class WHERE reltablespace <> 0))
                      ORDER BY 1),
               ARRAY(SELECT format('%I.%I', n.nspname, c.relname)
                       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE c.relpersistence = 'u' AND c.relkind IN ('r', 'p', 'm')
                        AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
                      ORDER BY 1)
          FROM pg_database d, pg_roles r
         WHERE d.datname = current_database() AND r.rolname = current_user
        """,
    )[0]
    return ServerFacts(
        version=row[0],
        major=row[1],
        system_identifier=system_identifier(conn),
        database_oid=row[2],
        database_size=row[3],
        current_user=row[4],
        is_superuser=row[5],
        can_create_db=row[5] or row[6],
        is_db_owner=row[5] or row[7],
        db_owner=row[8],
        tablespaces=list(row[9]),
        unlogged_tables=list(row[10]),
    )


def system_identifier(conn) -> str | None:
    """The cluster's system identifier; None where the role may not read it."""
    statement = "SELECT system_identifier::text FROM pg_control_system()"
    if conn.autocommit:
        try:
            return scalar(conn, statement)
        except psycopg2.Error:
            return None
    execute(conn, "SAVEPOINT sysid")
    try:
        value = scalar(conn, statement)
    except psycopg2.Error:
        execute(conn, "ROLLBACK TO SAVEPOINT sysid")
        return None
    execute(conn, "RELEASE SAVEPOINT sysid")
    return value


@dataclass
class Session:
    pid: int
    user: str | None
    application: str | None
    client: str | None
    state: str | None
    since: str | None

    def describe(self) -> str:
        return (
            f"pid {self.pid} user {self.user or '?'} app {self.application or '-'} "
            f"from {self.client or 'local socket'} {self.state or '?'} since {self.since or '?'}"
        )


def sessions_on(conn, dbname: str, *, own: bool = True) -> list[Session]:
    """Client sessions on ``dbname``. ``own=False`` leaves out those that name themselves
    the toolkit's (application_name "rollback-toolkit…": a background job reading a
    database's facts, say): they are ended with the others when a copy or swap needs the
    database, but are not listed for a person to agree to."""
    rows = query(
        conn,
        """
        SELECT pid, usename, application_name, client_addr::text, state,
               to_char(backend_start, 'YYYY-MM-DD HH24:MI:SS')
          FROM pg_stat_activity
         WHERE datname = %s AND pid <> pg_backend_pid()
           AND backend_type = 'client backend'
           AND (%s OR coalesce(application_name, '') NOT LIKE %s)
         ORDER BY backend_start
        """,
        (dbname, own, TOOLKIT_APPLICATION + "%"),
    )
    return [Session(*r) for r in rows]


def not_owned(conn, limit: int = 5) -> tuple[int, list[str]]:
    """The user schemas and relations of the connected database whose owner this role is
    not (nor a member of): a restore in place drops and makes them again, which only
    their owner may. Returns how many, and the first ``limit`` of them, named."""
    rows = query(
        conn,
        """
        WITH objects AS (
            SELECT 'schema ' || quote_ident(n.nspname) AS what, n.nspowner AS owner
              FROM pg_namespace n
             WHERE n.nspname NOT IN ('information_schema', %s) AND n.nspname NOT LIKE 'pg\\_%%'
            UNION ALL
            SELECT CASE c.relkind WHEN 'S' THEN 'sequence ' WHEN 'v' THEN 'view ' WHEN 'm' THEN 'materialized view '
                                  ELSE 'table ' END || quote_ident(n.nspname) || '.' || quote_ident(c.relname), c.relowner
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND n.nspname NOT IN ('information_schema', %s)
               AND n.nspname NOT LIKE 'pg\\_%%')
        SELECT what, pg_get_userbyid(owner) FROM objects WHERE NOT pg_has_role(owner, 'MEMBER') ORDER BY what""",
        (TOOLKIT_SCHEMA, TOOLKIT_SCHEMA),
    )
    return len(rows), [f"{what} (owner {owner})" for what, owner in rows[:limit]]


def refuse_prepared_transactions(conn, dbname: str, doing: str) -> None:
    """A prepared transaction keeps a database busy for every copy, rename and drop, and
    no session can be ended to free it: refuse before anything starts, naming each one."""
    rows = query(
        conn,
        "SELECT gid, owner, to_char(prepared, 'YYYY-MM-DD HH24:MI:SS') FROM pg_prepared_xacts WHERE database = %s",
        (dbname,),
    )
    if rows:
        names = "; ".join(f"{gid!r} by {owner}, prepared {when}" for gid, owner, when in rows)
        gid = rows[0][0]
        raise DatabaseError(
            f"Cannot {doing}: {dbname!r} has {len(rows)} prepared transaction(s), which keep it busy until they are "
            f"committed or rolled back: {names}. Nothing was changed.",
            f"Finish each on {dbname}, for example COMMIT PREPARED '{gid}'; or ROLLBACK PREPARED '{gid}'; then run the command again.",
        )


def terminate_session(conn, pid: int) -> bool:
    return bool(scalar(conn, "SELECT pg_terminate_backend(%s)", (pid,)))


def terminate_sessions(conn, dbname: str, wait_seconds: float = 10.0) -> list[Session]:
    """Terminate every other session on ``dbname`` and wait until they are gone. Where
    they do not end, the error says why it looks so: sessions the role may not end, or
    clients that reconnect as fast as they are ended (a pooler, an application)."""
    gone = sessions_on(conn, dbname)
    seen: dict[int, Session] = {s.pid: s for s in gone}
    refused: dict[int, Session] = {}

    def ended() -> bool:
        current = sessions_on(conn, dbname)
        for s in current:
            seen.setdefault(s.pid, s)
            if not scalar(conn, "SELECT pg_terminate_backend(%s)", (s.pid,)):
                log.warning("could not terminate pid %s", s.pid)
                refused[s.pid] = s
        return not current

    if not wait_until(ended, timeout=wait_seconds):
        if refused:
            raise DatabaseError(
                f"Sessions on {dbname!r} did not end within {wait_seconds:.0f} s: the role may not end "
                + "; ".join(s.describe() for s in refused.values())
                + ".",
                "Grant it pg_signal_backend (or ask a superuser), or stop those clients; then run the command again.",
            )
        clients = sorted({s.describe() for s in seen.values()})
        raise DatabaseError(
            f"Sessions on {dbname!r} did not end within {wait_seconds:.0f} s: every one was ended, and clients "
            f"reconnected at once ({len(seen)} session(s) in all: {'; '.join(clients[:5])}"
            + (" …" if len(clients) > 5 else "")
            + ").",
            "A pooler or an application reconnects as soon as it is cut off: pause it around the swap "
            "(ROLLBACK_BEFORE_SWAP / ROLLBACK_AFTER_SWAP, e.g. PgBouncer's PAUSE and RESUME), or stop those clients; "
            "then run the command again.",
        )
    return gone


def database_exists(conn, name: str) -> bool:
    return bool(scalar(conn, "SELECT 1 FROM pg_database WHERE datname = %s", (name,)))


def set_allow_connections(conn, name: str, allow: bool) -> None:
    execute(
        conn,
        sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
            sql.Identifier(name), sql.SQL("true" if allow else "false")
        ),
    )


def drop_database(conn, name: str) -> None:
    """Drop ``name`` if it exists; nobody may be connected (our own aside databases only)."""
    rows = query(conn, "SELECT datconnlimit = -2 FROM pg_database WHERE datname = %s", (name,))
    if not rows:
        return
    if not rows[0][0]:  # an invalid database takes no connections, and ALTER on it ends our session
        set_allow_connections(conn, name, False)
        terminate_sessions(conn, name)
    execute(conn, sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


def rename_database(conn, old: str, new: str) -> None:
    execute(conn, sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(old), sql.Identifier(new)))


def derived_name(base: str, suffix: str) -> str:
    """``base`` + ``suffix`` trimmed to 63 bytes, with a hash keeping distinct inputs distinct."""
    name = f"{base}{suffix}"
    if len(name.encode()) <= MAX_IDENTIFIER_BYTES:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    room = MAX_IDENTIFIER_BYTES - len(suffix.encode()) - 9
    head = base.encode()[: max(room, 1)].decode(errors="ignore")
    return f"{head}_{digest}{suffix}"[:MAX_IDENTIFIER_BYTES]


@dataclass
class DatabaseProperties:
    """What pg_dump without --create leaves out, and what a rename leaves with the old
    database (PostgreSQL keys it by the database's oid): the database's own settings,
    the settings of roles in it, its rights, comment, security labels, tablespace."""

    owner: str
    encoding: str
    collate: str
    ctype: str
    locale_provider: str
    icu_locale: str | None
    comment: str | None
    acl: list[dict]
    settings: list[str]
    connection_limit: int
    role_settings: list[dict] = field(default_factory=list)  # [{"role": name, "settings": ["key=value", ...]}]
    security_labels: list[dict] = field(default_factory=list)  # [{"provider": name, "label": text}]
    tablespace: str = "pg_default"
    is_template: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def database_properties(conn, dbname: str) -> DatabaseProperties:
    major = int(scalar(conn, "SELECT current_setting('server_version_num')::int")) // 10000
    provider = "d.datlocprovider::text" if major >= 15 else "'c'"
    icu = "d.datlocale" if major >= 17 else ("d.daticulocale" if major >= 15 else "NULL")
    row = query(
        conn,
        sql.SQL(
            """
        SELECT pg_get_userbyid(d.datdba), pg_encoding_to_char(d.encoding), d.datcollate, d.datctype,
               {provider}, {icu}, shobj_description(d.oid, 'pg_database'), d.datconnlimit,
               d.datacl IS NULL, t.spcname, d.datistemplate
          FROM pg_database d JOIN pg_tablespace t ON t.oid = d.dattablespace WHERE d.datname = %s
        """
        ).format(provider=sql.SQL(provider), icu=sql.SQL(icu)),
        (dbname,),
    )[0]
    settings, role_settings = _settings_in(conn, dbname)
    return DatabaseProperties(
        owner=row[0],
        encoding=row[1],
        collate=row[2],
        ctype=row[3],
        locale_provider=row[4],
        icu_locale=row[5],
        comment=row[6],
        acl=[] if row[8] else _database_acl(conn, dbname),
        settings=settings,
        connection_limit=row[7],
        role_settings=role_settings,
        security_labels=_security_labels(conn, dbname),
        tablespace=row[9],
        is_template=row[10],
    )


def _database_acl(conn, dbname: str) -> list[dict]:
    return [
        {"grantee": g, "privilege": p, "grantable": w}
        for g, p, w in query(
            conn,
            """
            SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END,
                   a.privilege_type, a.is_grantable
              FROM pg_database d, aclexplode(d.datacl) a
             WHERE d.datname = %s ORDER BY 1, 2
            """,
            (dbname,),
        )
    ]


def _settings_in(conn, dbname: str) -> tuple[list[str], list[dict]]:
    """The database's own settings, and each role's settings in it."""
    settings: list[str] = []
    role_settings = []
    for role, cfg in query(
        conn,
        """
        SELECT CASE WHEN s.setrole = 0 THEN NULL ELSE pg_get_userbyid(s.setrole) END, s.setconfig
          FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase
         WHERE d.datname = %s ORDER BY 1 NULLS FIRST
        """,
        (dbname,),
    ):
        if role is None:
            settings = list(cfg or [])
        else:
            role_settings.append({"role": role, "settings": list(cfg or [])})
    return settings, role_settings


def _security_labels(conn, dbname: str) -> list[dict]:
    return [
        {"provider": p, "label": lbl}
        for p, lbl in query(
            conn,
            """
            SELECT l.provider, l.label FROM pg_shseclabel l JOIN pg_database d ON d.oid = l.objoid
             WHERE l.classoid = 'pg_database'::regclass AND d.datname = %s ORDER BY 1
            """,
            (dbname,),
        )
    ]


def create_database_like(conn, name: str, props: dict, server_major: int) -> None:
    """An empty database with the encoding, locale and tablespace recorded in ``props``;
    its other properties come with apply_database_properties."""
    parts = [
        sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING {} LC_COLLATE {} LC_CTYPE {}").format(
            sql.Identifier(name),
            sql.Literal(props["encoding"]),
            sql.Literal(props["collate"]),
            sql.Literal(props["ctype"]),
        )
    ]
    if server_major >= 15 and props.get("locale_provider") == "i" and props.get("icu_locale"):
        parts.append(sql.SQL("LOCALE_PROVIDER icu ICU_LOCALE {}").format(sql.Literal(props["icu_locale"])))
    if props.get("tablespace") not in (None, "pg_default"):
        parts.append(sql.SQL("TABLESPACE {}").format(sql.Identifier(props["tablespace"])))
    execute(conn, sql.SQL(" ").join(parts))
    owner = props.get("owner")
    if owner and owner != scalar(conn, "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (name,)):
        execute(conn, sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(name), sql.Identifier(owner)))


# Settings whose value is a list of quoted names (pg_dump's variable_is_guc_list_quote):
# stored as '"$user", public', given back as separate literals, or they become one name.
_LIST_QUOTE = {
    "local_preload_libraries",
    "search_path",
    "session_preload_libraries",
    "shared_preload_libraries",
    "temp_tablespaces",
    "unix_socket_directories",
}


def split_setting_list(value: str) -> list[str]:
    """'"$user", public' -> ['$user', 'public'], as PostgreSQL's SplitGUCList reads it."""
    items, current, quoted, i = [], "", False, 0
    while i < len(value):
        ch = value[i]
        if quoted:
            if ch == '"' and value[i + 1 : i + 2] == '"':
                current += '"'
                i += 1
            elif ch == '"':
                quoted = False
            else:
                current += ch
        elif ch == '"':
            quoted = True
        elif ch == ",":
            items.append(current.strip())
            current = ""
        else:
            current += ch
        i += 1
    items.append(current.strip())
    return items


def setting_clause(setting: str) -> sql.Composed:
    """'key=value' from pg_db_role_setting as the SET clause that stores it again."""
    key, _, value = setting.partition("=")
    if key.lower() in _LIST_QUOTE:
        values = sql.SQL(", ").join(sql.Literal(v) for v in split_setting_list(value))
        return sql.SQL("SET {} TO {}").format(sql.Identifier(key), values)
    return sql.SQL("SET {} = {}").format(sql.Identifier(key), sql.Literal(value))


def apply_database_properties(conn, name: str, props: dict) -> None:
    """Give database ``name`` the recorded owner, comment, connection limit, settings
    (its own and its roles'), rights and security labels."""
    ident = sql.Identifier(name)
    current_owner = scalar(conn, "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (name,))
    if props.get("owner") and props["owner"] != current_owner:
        execute(conn, sql.SQL("ALTER DATABASE {} OWNER TO {}").format(ident, sql.Identifier(props["owner"])))
    execute(conn, sql.SQL("COMMENT ON DATABASE {} IS {}").format(ident, sql.Literal(props.get("comment"))))
    execute(
        conn,
        sql.SQL("ALTER DATABASE {} WITH CONNECTION LIMIT {} IS_TEMPLATE {}").format(
            ident, sql.Literal(props.get("connection_limit", -1)), sql.Literal(bool(props.get("is_template", False)))
        ),
    )
    execute(conn, sql.SQL("ALTER DATABASE {} RESET ALL").format(ident))
    for setting in props.get("settings", []):
        execute(conn, sql.SQL("ALTER DATABASE {} ").format(ident) + setting_clause(setting))
    for entry in props.get("role_settings", []):
        role = sql.Identifier(entry["role"])
        for setting in entry["settings"]:
            execute(conn, sql.SQL("ALTER ROLE {} IN DATABASE {} ").format(role, ident) + setting_clause(setting))
    if props.get("acl"):
        execute(conn, sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(ident))
        for entry in props["acl"]:
            grantee = sql.SQL("PUBLIC") if entry["grantee"] == "PUBLIC" else sql.Identifier(entry["grantee"])
            execute(
                conn,
                sql.SQL("GRANT {} ON DATABASE {} TO {}{}").format(
                    sql.SQL(entry["privilege"]),
                    ident,
                    grantee,
                    sql.SQL(" WITH GRANT OPTION" if entry["grantable"] else ""),
                ),
            )
    for entry in props.get("security_labels", []):
        execute(
            conn,
            sql.SQL("SECURITY LABEL FOR {} ON DATABASE {} IS {}").format(
                sql.Identifier(entry["provider"]), ident, sql.Literal(entry["label"])
            ),
        )


def replication_ties(conn, dbname: str) -> list[str]:
    """Logical replication slots and subscriptions of ``dbname``: PostgreSQL ties them to
    the database's oid, so a swap by rename leaves them with the database swapped out."""
    ties = [
        f"logical replication slot {name!r} ({'active' if active else 'inactive'})"
        for name, active in query(
            conn, "SELECT slot_name, active FROM pg_replication_slots WHERE database = %s ORDER BY 1", (dbname,)
        )
    ]
    ties += [
        f"subscription {name!r} ({'enabled' if enabled else 'disabled'})"
        for name, enabled in query(
            conn,
            "SELECT s.subname, s.subenabled FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid "
            "WHERE d.datname = %s ORDER BY 1",
            (dbname,),
        )
    ]
    return ties
