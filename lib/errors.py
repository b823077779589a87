"""One exception root, one subclass per area, and the exit codes every script shares."""

from __future__ import annotations

from enum import IntEnum, StrEnum


class ExitCode(IntEnum):
    """Exit codes of every script; documented in --help and ROLLBACK_GUIDE.md."""

    DONE = 0
    FAILED = 1
    USAGE = 2
    VERIFICATION_FAILED = 3
    LOCKED = 4
    INTERRUPTED = 130


EXIT_CODES_HELP = (
    "exit codes: 0 done, 1 failed (the message says what state things are in; also a server that is down), "
    "2 usage or configuration error (also a URL whose role, password or database is refused), a confirmation "
    "that could not be asked, or a missing or wrong key, "
    "3 verification failed, 4 another operation holds the lock, 130 interrupted (Ctrl-C or SIGTERM)"
)


class RollbackError(Exception):
    """Root of every error the toolkit raises on purpose.

    ``hint`` is the next step for the operator; scripts print message and hint
    as one paragraph and exit with ``exit_code``.
    """

    exit_code: ExitCode = ExitCode.FAILED
    # True where the failure is one method's own (no right to create databases, no room on
    # the server, no fitting pg_dump): --method auto then tries the next method.
    another_method_may_work: bool = False

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def only_this_method(self) -> RollbackError:
        """Marks the failure as this method's own; returns it, for ``raise exc.only_this_method()``."""
        self.another_method_may_work = True
        return self

    def paragraph(self) -> str:
        text = self.message.rstrip()
        if self.hint:
            text = f"{text} {self.hint.strip()}"
        return text


class ConfigError(RollbackError):
    """Missing or malformed settings, bad arguments, unknown point ids."""

    exit_code = ExitCode.USAGE


class ConfirmationRefused(RollbackError):
    """A destructive step was not confirmed, or could not be asked."""

    exit_code = ExitCode.USAGE


class DatabaseError(RollbackError):
    """The server could not be reached, refused us, or a statement failed."""


class ConnectProblem(StrEnum):
    """Why a connection failed, found by probing the server rather than by reading its
    message (psycopg2 gives no SQLSTATE for a failed connection, and before
    authentication the server speaks its own language)."""

    UNREACHABLE = "unreachable"  # nothing answers at host:port, or the host name does not resolve
    NOT_READY = "not ready"  # the server answers but takes no connections yet (starting, stopping, recovering)
    LOGIN_REFUSED = "login refused"  # the server answers and refuses this role or password (or pg_hba.conf)
    NO_DATABASE = "no database"  # the login works elsewhere on the server; the database does not exist
    NOT_ACCEPTING = "not accepting"  # the database exists with ALLOW_CONNECTIONS false
    OTHER = "other"  # none of these: the server's message says what


class ConnectError(DatabaseError):
    """A connection could not be opened; ``problem`` says why."""

    def __init__(self, message: str, hint: str | None = None, *, problem: ConnectProblem) -> None:
        super().__init__(message, hint)
        self.problem = problem
        # The URL is wrong (its role, password or database): a configuration error, 2. The
        # server is down, starting or closed to connections: a failure to retry later, 1.
        if problem in (ConnectProblem.LOGIN_REFUSED, ConnectProblem.NO_DATABASE):
            self.exit_code = ExitCode.USAGE


class ToolError(RollbackError):
    """A PostgreSQL client tool failed or none fits the server / archive."""

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        *,
        argv: list[str] | None = None,
        returncode: int | None = None,
        stderr: str = "",
    ) -> None:
        super().__init__(message, hint)
        self.argv = argv or []
        self.returncode = returncode
        self.stderr = stderr


class VersionMismatch(ToolError):
    """The tool refused because of the server's or the archive's version."""


class VerificationError(RollbackError):
    """Checksums, row counts or schema digest do not match."""

    exit_code = ExitCode.VERIFICATION_FAILED


class CopyDamaged(VerificationError):
    """The server could not read a copy's page or file as it was written."""


class CopyRejected(VerificationError):
    """The copy built beside staging is not the point (its catalog, a page or a row
    differs, or it cannot be read): dropped before the swap, staging untouched."""


class LockHeld(RollbackError):
    """Another mutating operation on the same database is running."""

    exit_code = ExitCode.LOCKED


class CatalogError(RollbackError):
    """The backup folder or a point on disk is unusable."""


class NoPointError(RollbackError):
    """quick_rollback with nothing to go back to."""


class EncryptionError(RollbackError):
    """A key is missing or wrong: nothing is read or touched without the right one."""

    exit_code = ExitCode.USAGE


class ServerStartError(RollbackError):
    """A throwaway server of the demo or the tests did not start."""


class DiffTimeout(RollbackError):
    """A diff would take longer than the caller allowed."""


class MigrationError(RollbackError):
    """The migration could not be loaded, or it failed."""


class ThresholdExceeded(MigrationError):
    """More records failed than the failure threshold allows."""


class RecordFailed(Exception):  # noqa: N818 - what a migration raises through ctx.fail: not an error of the toolkit
    """Raised by ``ctx.fail``: this record is rolled back to its savepoint and logged."""

    def __init__(self, key, reason: str) -> None:
        super().__init__(reason)
        self.key = key
        self.reason = reason


class RecordSkipped(RecordFailed):
    """Raised by ``ctx.skip``: this record is rolled back and counted as skipped."""


class Yielded(Exception):
    """A background reading stopped for an operation on staging, to read again after it
    (lib/points/reading.py). Not an error: it never reaches a person."""


class UndoRefused(RollbackError):
    """A run's undo cannot be made (no log, truncated, undone already)."""
