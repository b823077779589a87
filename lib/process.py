"""The one way the toolkit starts a child process (the shape of Barman's Command).

A ``Command`` runs one program with an argv list, never a shell. It owns the
environment: the caller's without its PG* variables (connections are given
explicitly), messages in English (LC_MESSAGES=C, since the toolkit reads what tools
say), the connection's parameters as PG* variables, the password in a 0600 passfile
that lives as long as the process, and PGOPTIONS with the read-only option where the
work must not write. It logs the masked argv before it runs, keeps stderr, and
turns a failure into a ToolError (a VersionMismatch when the tool refused the
server's or the archive's version) with argv, exit code and stderr.

One small subclass per program builds that program's arguments: ``PgDump``,
``PgRestore``, ``Psql``, ``PgIsReady``, ``PgBackRest``; ``ServerProgram`` runs initdb
and pg_ctl as the server's user; ``OperatorCommand`` runs the commands an operator
configured around a swap; ``PythonModule`` starts the toolkit's own background work
detached. ``pipeline`` joins two commands, as ``pg_dump | pg_restore``."""

from __future__ import annotations

import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from lib.config import PROJECT_ROOT, TOOLKIT_URLS, ConnInfo, child_environment, passfile_line, redact
from lib.errors import ToolError, VersionMismatch

log = logging.getLogger(__name__)

TEMP_PREFIX = "rollback-"  # files and folders in the system's temporary folder: rollback-<what>-<pid>-...
_TEMP_NAME = re.compile(rf"^{re.escape(TEMP_PREFIX)}(pgpass|reset)-(\d+)-")
READ_ONLY = "-c default_transaction_read_only=on"
NO_INPUT = subprocess.DEVNULL  # a child's stdin when it reads nothing

# What the tools say when a version does not fit: they run with LC_MESSAGES=C, so this is
# their own English text, whatever the caller's or the server's language.
_MISMATCH_PATTERNS = (
    re.compile(r"aborting because of server version mismatch", re.I),
    re.compile(r"unsupported version \([\d.]+\) in file header", re.I),
    re.compile(r"server version: [\d.]+; \S+ version: [\d.]+", re.I),
)


def is_version_mismatch(stderr: str) -> bool:
    return any(p.search(stderr) for p in _MISMATCH_PATTERNS)


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a server this toolkit starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def private_temporary_folder(what: str) -> tempfile.TemporaryDirectory:
    """A 0700 folder in the system's temporary folder, named so that a later run removes
    it should this process be killed (dead_temporaries)."""
    return tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{what}-{os.getpid()}-")


@contextmanager
def passfile(info: ConnInfo | None) -> Iterator[Path | None]:
    """A 0600 passfile for one run; the password never reaches argv or the environment."""
    if info is None or info.password is None:
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


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


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


def _drain(stream, into: list[bytes], on_line: Callable[[str], bool] | None = None) -> threading.Thread:
    """Read ``stream`` to its end into ``into``. With ``on_line``, line by line as it
    comes: each line is given to it, and the lines it takes (progress) are not kept."""

    def read_lines() -> None:
        for raw in stream:
            try:
                taken = on_line(raw.decode(errors="replace").rstrip("\r\n"))
            except Exception as exc:  # noqa: BLE001 - a progress reader never loses a line of stderr
                log.debug("stderr line not read for progress: %s", exc)
                taken = False
            if not taken:
                into.append(raw)

    thread = threading.Thread(target=read_lines if on_line else lambda: into.append(stream.read()), daemon=True)
    thread.start()
    return thread


class Command:
    """One program; see the module's docstring."""

    name = "program"

    def __init__(
        self,
        path: Path | str,
        *,
        conn: ConnInfo | None = None,
        readonly: bool = False,
        options: str = "",
        account: pwd.struct_passwd | None = None,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        major: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.conn = conn
        self.readonly = readonly
        self.options = options
        self.account = account
        self.cwd = cwd
        self.extra_env = env or {}
        self.major = major

    @property
    def label(self) -> str:
        return f"{self.name} {self.major}" if self.major else self.name

    def environment(self, pass_file: Path | None) -> dict[str, str]:
        env = self.conn.tool_env(pass_file) if self.conn else child_environment()
        options = " ".join(o for o in (self.options, READ_ONLY if self.readonly else "") if o)
        if options:
            env["PGOPTIONS"] = f"{env.get('PGOPTIONS', '')} {options}".strip()
        env.update(self.extra_env)
        return env

    def _popen_kwargs(self) -> dict:
        kwargs: dict = {"cwd": self.cwd}
        if self.account is not None:
            kwargs.update(user=self.account.pw_uid, group=self.account.pw_gid, extra_groups=[])
        return kwargs

    def argv(self, args: Sequence[str]) -> list[str]:
        return [str(self.path), *args]

    def stop(self, proc: subprocess.Popen) -> None:
        """Stopped before its end (a timeout, Ctrl-C)."""
        proc.kill()

    def failure(self, finished: Finished, argv: list[str]) -> ToolError | None:
        """The error ``finished`` is, or None: a non-zero exit, a version refused."""
        if finished.returncode == 0:
            return None
        first = _first_error_line(finished.stderr) or f"exit code {finished.returncode}"
        cls = VersionMismatch if is_version_mismatch(finished.stderr) else ToolError
        return cls(
            f"{self.label} failed: {first}",
            argv=[redact(a) for a in argv],
            returncode=finished.returncode,
            stderr=finished.stderr,
        )

    def run(
        self,
        args: Sequence[str],
        *,
        stdin: int | None = subprocess.DEVNULL,
        stdout_path: Path | None = None,
        pass_fds: tuple[int, ...] = (),
        timeout: float | None = None,
        on_tick: Callable[[float], None] | None = None,
        on_stderr: Callable[[str], bool] | None = None,
        check: bool = True,
        quiet: bool = False,
    ) -> Finished:
        """Run to the end. ``pass_fds``: pipes the program reads or writes as /dev/fd/N.
        ``on_stderr`` reads each line of stderr as it comes (see ``_drain``)."""
        argv = self.argv(args)
        if not quiet:
            log.info("running: %s", redact(" ".join(argv)))
        with passfile(self.conn) as pf:
            out_handle = open(stdout_path, "wb") if stdout_path else subprocess.PIPE  # noqa: SIM115
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=stdin,
                    stdout=out_handle,
                    stderr=subprocess.PIPE,
                    env=self.environment(pf),
                    pass_fds=pass_fds,
                    **self._popen_kwargs(),
                )
                errs: list[bytes] = []
                outs: list[bytes] = []
                readers = [_drain(proc.stderr, errs, on_stderr)] + ([_drain(proc.stdout, outs)] if stdout_path is None else [])
                try:
                    _wait(proc, timeout, on_tick, time.monotonic())
                except BaseException:
                    self.stop(proc)
                    proc.wait()
                    raise
                for reader in readers:
                    reader.join(timeout=10)
            finally:
                if stdout_path:
                    out_handle.close()
        finished = Finished(
            proc.returncode, b"".join(outs).decode(errors="replace"), redact(b"".join(errs).decode(errors="replace"))
        )
        if finished.stderr.strip() and not quiet:
            log.info("%s stderr: %s", self.name, finished.stderr.strip())
        if check:
            error = self.failure(finished, argv)
            if error is not None:
                raise error
        return finished

    def output(self, args: Sequence[str], **kwargs) -> str:
        """Run and return what it printed on stdout."""
        return self.run(args, **kwargs).stdout


class PgTool(Command):
    """A PostgreSQL client program of a known major."""

    def __init__(self, tool, **kwargs) -> None:
        super().__init__(tool.path, major=tool.major, **kwargs)
        self.tool = tool


class PgDump(PgTool):
    name = "pg_dump"

    def archive(self, *, snapshot: str | None, file: str, compress: str | None = None, fmt: str = "custom") -> list[str]:
        """Arguments for an archive of the whole database, in one snapshot."""
        args = [f"--format={fmt}", f"--file={file}"]
        if snapshot:
            args.append(f"--snapshot={snapshot}")
        if compress is not None:
            args.append(f"--compress={compress}")
        return [*args, *self.conn.tool_args()]


class PgRestore(PgTool):
    name = "pg_restore"

    def into(self, dbname: str, source: list[str], *, jobs: int = 1, verbose: bool = False) -> list[str]:
        """Arguments to restore ``source`` into ``dbname``, stopping at the first error;
        ``verbose``: a line on stderr per archive entry, for the progress."""
        args = ["--exit-on-error", *([f"--jobs={jobs}"] if jobs > 1 else []), *(["--verbose"] if verbose else [])]
        return [*args, *self.conn.tool_args(dbname), *source]

    def failure(self, finished: Finished, argv: list[str]) -> ToolError | None:
        if finished.returncode == 0 and "errors ignored on restore" in finished.stderr:
            return ToolError(
                f"{self.label} reported errors it ignored "
                f"({_first_error_line(finished.stderr) or 'errors ignored on restore'}): "
                "a restore with ignored errors is incomplete, so it counts as failed",
                argv=[redact(a) for a in argv],
                returncode=finished.returncode,
                stderr=finished.stderr,
            )
        return super().failure(finished, argv)


class Psql(PgTool):
    name = "psql"

    def script(self, dbname: str, *, files: Sequence[str] = ("-",), single_transaction: bool = False) -> list[str]:
        """Arguments to run SQL files (``-``: stdin) into ``dbname``, stopping at the first error."""
        args = ["--no-psqlrc", "--quiet", "--set=ON_ERROR_STOP=1"]
        if single_transaction:
            args.append("--single-transaction")
        return [*args, *(f"--file={f}" for f in files), *self.conn.tool_args(dbname)]

    def commands(self, dbname: str, *statements: str) -> list[str]:
        """Arguments to run ``statements`` one after another with -c, stopping at the first error."""
        args = ["--no-psqlrc", "--quiet", "--set=ON_ERROR_STOP=1"]
        for statement in statements:
            args += ["-c", statement]
        return [*args, *self.conn.tool_args(dbname)]


class PgIsReady(PgTool):
    """Asks whether a server accepts connections, without logging in."""

    name = "pg_isready"

    def answer(self, info: ConnInfo, dbname: str) -> int | None:
        """0 accepting, 1 rejecting (starting up, shutting down), 2 no answer; None when it did not run."""
        args = ["--timeout=5", *[a for a in info.tool_args(dbname) if a != "--no-password"]]
        try:
            finished = self.run(args, timeout=20, check=False, quiet=True)
        except (OSError, ToolError) as exc:
            log.debug("pg_isready did not run: %s", exc)
            return None
        return finished.returncode if finished.returncode in (0, 1, 2) else None


class ServerProgram(Command):
    """initdb, pg_ctl: run as the server's user, in the server's folder."""

    name = "server program"

    def __init__(self, path: Path, *, account: pwd.struct_passwd | None, cwd: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(path, account=account, cwd=cwd, env=env)
        self.name = self.path.name


class PgBackRest(Command):
    """pgBackRest, run as the cluster's owner when the toolkit runs as root, with its own
    settings (PGBACKREST_*, credentials included) in its environment, never in argv."""

    name = "pgbackrest"

    def __init__(self, path: Path, *, account: pwd.struct_passwd | None, env: dict[str, str]) -> None:
        super().__init__(path, account=account, env=env, cwd=Path("/"))

    def json(self, command: str, *args: str, **kwargs) -> object:
        """``pgbackrest --output=json COMMAND ARGS``, parsed."""
        return json.loads(self.output(["--output=json", *args, command], **kwargs) or "null")


class OperatorCommand(Command):
    """A command the operator configured (ROLLBACK_BEFORE_SWAP, ROLLBACK_AFTER_SWAP): run
    without a shell, in the operator's own environment (their PG* variables, PGPASSFILE
    for a pooler's admin console, their locale) but for the toolkit's URLs and the
    passwords in them; what it needs to know comes as ROLLBACK_* variables."""

    def __init__(self, argv: Sequence[str], *, env: dict[str, str]) -> None:
        super().__init__(argv[0], env=env)
        self.args = list(argv[1:])
        self.name = self.path.name

    def environment(self, pass_file: Path | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in TOOLKIT_URLS}
        env.update(self.extra_env)
        return env

    def _popen_kwargs(self) -> dict:
        return {**super()._popen_kwargs(), "start_new_session": True}  # a group of its own, stopped whole

    def stop(self, proc: subprocess.Popen) -> None:
        """A script that started others (a wrapper around psql) is stopped with all of them."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def outcome(self, timeout: float) -> str | None:
        """None when it exited 0; otherwise what went wrong, in one sentence."""
        try:
            finished = self.run(self.args, timeout=timeout, check=False)
        except ToolError as exc:  # did not finish in time: stopped
            return exc.message
        except OSError as exc:
            return f"{self.path} could not be started: {exc.strerror or exc}"
        if finished.returncode != 0:
            said = _first_error_line(finished.stderr) or _first_error_line(finished.stdout)
            return f"{self.name} exited with code {finished.returncode}" + (f": {said}" if said else "")
        return None


class PythonModule(Command):
    """The toolkit's own work in a second Python process."""

    name = "python"

    def __init__(self, *, env: dict[str, str] | None = None) -> None:
        super().__init__(sys.executable, cwd=PROJECT_ROOT, env=env)

    def start_detached(self, module: str, *args: str) -> None:
        """Detached from the terminal and from the caller's output, so that a script that
        captures the caller's output is not kept waiting for it."""
        argv = self.argv(["-m", module, *args])
        log.info("starting in the background: %s", redact(" ".join(argv)))
        subprocess.Popen(
            argv,
            env=self.environment(None),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            **self._popen_kwargs(),
        )

    def script(self, script: str, *args: str) -> Finished:
        """A script of the toolkit, to the end; its exit code is the caller's to judge."""
        return self.run([script, *args], check=False)


def pipeline(
    producer: Command,
    producer_args: Sequence[str],
    consumer: Command,
    consumer_args: Sequence[str],
    *,
    line_filter: Callable[[bytes], bool] | None = None,
    on_tick: Callable[[float], None] | None = None,
    on_producer_stderr: Callable[[str], bool] | None = None,
    producer_stdin=subprocess.DEVNULL,
) -> None:
    """``producer | consumer``: pg_restore's SQL script into psql, or pg_dump from one
    server into pg_restore on another. With ``line_filter``, lines for which it returns
    False are dropped on the way; without, the two are joined by an OS pipe.
    ``on_producer_stderr`` reads the producer's stderr as ``Command.run``'s ``on_stderr``."""
    p_argv, c_argv = producer.argv(producer_args), consumer.argv(consumer_args)
    log.info("running: %s | %s", redact(" ".join(p_argv)), redact(" ".join(c_argv)))
    with (
        passfile(producer.conn) as ppf,
        passfile(consumer.conn) if consumer.conn is not producer.conn else nullcontext(ppf) as cpf,
    ):
        prod = subprocess.Popen(
            p_argv, stdin=producer_stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=producer.environment(ppf)
        )
        direct = line_filter is None
        cons = subprocess.Popen(
            c_argv,
            stdin=prod.stdout if direct else subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=consumer.environment(cpf),
        )
        if direct:
            prod.stdout.close()  # the consumer holds the pipe; a dying consumer ends the producer
        p_err: list[bytes] = []
        c_err: list[bytes] = []
        readers = [_drain(prod.stderr, p_err, on_producer_stderr), _drain(cons.stderr, c_err)]
        started = last_tick = time.monotonic()
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
        for reader in readers:
            reader.join(timeout=10)
    for command, proc, errs, argv in ((consumer, cons, c_err, c_argv), (producer, prod, p_err, p_argv)):
        finished = Finished(proc.returncode, "", redact(b"".join(errs).decode(errors="replace")))
        if finished.stderr.strip():
            log.info("%s stderr: %s", command.name, finished.stderr.strip())
        error = command.failure(finished, argv)
        if error is not None:
            raise error
