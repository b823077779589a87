"""The methods there are, which one `auto` chooses, and which one it tries next when
the first fails for a reason of its own. Adding a method is one module and one line
in METHODS (see tests/README.md, "Adding a method")."""

from __future__ import annotations

from lib.errors import ConfigError
from lib.pg.target import Target
from lib.points.catalog import Point
from lib.points.methods.base import Method
from lib.points.methods.data import DataMethod
from lib.points.methods.dump import DumpMethod
from lib.points.methods.pitr import PitrMethod
from lib.points.methods.template import TemplateMethod

AUTO = "auto"
METHODS: dict[str, Method] = {m.name: m for m in (TemplateMethod(), DumpMethod(), DataMethod(), PitrMethod())}
NAMES = (AUTO, *METHODS)

# --method auto: the next method, where the first one's failure is its own (RollbackError.another_method_may_work)
FALLBACKS = {"template": "dump", "dump": "data"}
FOR_TABLES = "data"  # a point of chosen tables (--table, the Python API's table_name)


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"Unknown method {name!r}.", f"Choose one of: {', '.join(NAMES)}.") from None


def of(point: Point) -> Method:
    """The method of a point (a point with a damaged manifest has none: check it first)."""
    return get(point.method)


def check_name(name: str, *, setting: str | None = None) -> str:
    if name not in NAMES:
        if setting:
            raise ConfigError(f"{setting}={name!r} is not a method.", f"Use one of: {', '.join(NAMES)}.")
        raise ConfigError(f"Unknown method {name!r}.", f"Choose one of: {', '.join(NAMES)}.")
    return name


def fallback(method: Method) -> Method | None:
    after = FALLBACKS.get(method.name)
    return METHODS[after] if after else None


def choose(target: Target, requested: str) -> tuple[Method, str]:
    """auto: a server-side copy where the role may create databases, a dump otherwise;
    with encryption asked for, a method that can encrypt."""
    f = target.facts
    if requested != AUTO:
        method = get(requested)
        if target.settings.encrypt and not method.encryptable:
            raise ConfigError(
                f"A {method.name} point is a database on the server, which this toolkit cannot encrypt, and encryption "
                "was asked for (--encrypt or ROLLBACK_ENCRYPT_TO). Nothing was written.",
                "Use --method dump or --method data (or auto, which then takes a dump).",
            )
        return method, "asked for"
    if target.settings.encrypt:
        return METHODS["dump"], "encryption asked for: a template point would be an unencrypted database copy"
    if f.can_create_db:
        return METHODS["template"], f"role {f.current_user} may create databases on this server: a server-side copy is fastest"
    return METHODS["dump"], f"role {f.current_user} may not create databases on this server"


def find(name: str) -> Method | None:
    """The method of that name, or None (a damaged manifest names none)."""
    return METHODS.get(name)


def summary(point: Point) -> dict:
    """A point as `list` and `--json` show it, with the deepest verification it has passed."""
    m = point.manifest
    return {
        "id": point.id,
        "created_at": m.created_at_text,
        "migration_id": m.migration_id,
        "database": point.database_name,
        "server": m.database.server,
        "table": m.table,
        "method": point.method,
        "size_bytes": point.size,
        "status": m.status,
        "verified": (
            ("verify failed" if point.verification.failed else of(point).verified_level(point))
            if m.is_completed and find(point.method)
            else None
        ),
        "kind": m.kind,
        "description": m.description,
    }
