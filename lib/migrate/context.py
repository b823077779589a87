"""Running a migration against staging.

A dry run runs the whole migration in one transaction and rolls it back, so
nothing changes, and reports what would have changed. A production run takes a
rollback point first, commits in batches, records failed records in a failures
file, and puts staging back to the point by itself when the failure rate passes
the threshold or the migration crashes.

A migration is a Python file with ``def migrate(ctx)`` (see ``MigrationContext``)
or a ``.sql`` file that runs as one unit."""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable, Iterable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import psycopg2
import psycopg2.extensions
import sqlparse
from psycopg2 import sql

from lib.config import PROJECT_ROOT, Settings
from lib.errors import ConfigError, DatabaseError, MigrationError, RecordFailed, RecordSkipped, RollbackError, ThresholdExceeded
from lib.files import percent, slugify
from lib.interaction import Reporter
from lib.migrate.failures import FailuresFile
from lib.pg.db import connect

log = logging.getLogger(__name__)

LIMIT_SETTING = "migration.limit"  # what a .sql migration reads for --limit

# Statements that would end or escape the migration's transaction: refused in .sql files.
_TRANSACTION_CONTROL = {"BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT", "SAVEPOINT", "RELEASE", "PREPARE", "VACUUM"}


class TrackedConnection(psycopg2.extensions.connection):
    """A staging connection that counts its commits (a failure after one needs the
    rollback point, before one a transaction rollback is enough) and can forbid them
    (a dry run commits nothing, also not through ``with conn:``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.commits = 0
        self.forbid_commit: str | None = None

    def commit(self) -> None:
        if self.forbid_commit:
            raise MigrationError(self.forbid_commit, "Remove the commit from the migration; the runner commits.")
        super().commit()
        self.commits += 1

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.rollback()
        return False


def open_staging(settings: Settings, application_name: str, options: str | None = None) -> TrackedConnection:
    """The migration's session; ``options``: settings it starts with (the undo log's run id)."""
    return connect(
        settings.staging(),
        autocommit=False,
        application_name=application_name,
        connection_factory=TrackedConnection,
        options=options,
    )


# ---------------------------------------------------------------- the migration file


@dataclass
class Migration:
    path: Path
    id: str
    description: str
    module: ModuleType | None = None
    sql: str | None = None

    @property
    def kind(self) -> str:
        return "sql" if self.sql is not None else "python"


MIGRATIONS_DIR = PROJECT_ROOT / "migrations"


def available(folder: Path = MIGRATIONS_DIR) -> list[Path]:
    """The migrations in ``folder`` (those shipped in migrations/), in name order; a file
    whose name starts with _ is not one."""
    return sorted(p for p in folder.glob("*") if p.suffix in (".py", ".sql") and not p.name.startswith("_") and p.is_file())


def load(path: str | Path) -> Migration:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"There is no migration file {path}.", "Give the path of a .py or .sql file (see migrations/).")
    if path.suffix == ".sql":
        text = path.read_text(encoding="utf-8")
        _refuse_transaction_control(path, text)
        first = next((ln.strip("- ").strip().rstrip(".") for ln in text.splitlines() if ln.startswith("--")), "")
        return Migration(path, path.stem, first or path.stem, sql=text)
    if path.suffix != ".py":
        raise ConfigError(f"{path} is neither a .py nor a .sql migration.", "See ROLLBACK_GUIDE.md, 'Writing a migration'.")
    spec = importlib.util.spec_from_file_location(f"migration_{slugify(path.stem, 60)}", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as exc:  # noqa: BLE001 - any error in someone else's file is a load failure
        raise ConfigError(
            f"The migration {path} could not be loaded: {type(exc).__name__}: {exc}.", "Fix the file; nothing was run."
        ) from exc
    if not callable(getattr(module, "migrate", None)):
        raise ConfigError(f"{path} has no function migrate(ctx).", "See ROLLBACK_GUIDE.md, 'Writing a migration'.")
    doc = (module.__doc__ or "").strip().splitlines()
    description = doc[0].rstrip(".") if doc else path.stem
    return Migration(path, str(getattr(module, "MIGRATION_ID", path.stem)), description, module=module)


def _refuse_transaction_control(path: Path, text: str) -> None:
    for statement in sqlparse.parse(text):
        first = statement.token_first(skip_cm=True, skip_ws=True)
        if first is not None and first.normalized.upper() in _TRANSACTION_CONTROL:
            raise ConfigError(
                f"{path} contains `{str(statement).strip()[:60]}`: a .sql migration runs as one transaction that the "
                "runner commits (or, in a dry run, rolls back), so it may not control transactions itself.",
                "Remove the statement; nothing was run.",
            )


# ---------------------------------------------------------------- what a migration sees


@dataclass
class Tally:
    migrated: int = 0
    failed: int = 0
    skipped: int = 0
    batches_committed: int = 0
    changes: dict[str, list[int]] = field(default_factory=dict)  # table: [inserted, updated, deleted]
    failures_file: Path | None = None
    threshold_batch: int | None = None  # the batch after which the failure rate passed the threshold
    batches_with_failures: list[int] = field(default_factory=list)
    retry_not_found: list[str] = field(default_factory=list)  # keys of a failures file no record had

    @property
    def processed(self) -> int:
        return self.migrated + self.failed + self.skipped

    @property
    def failure_rate(self) -> float:
        """Exact; printed only through ``lib.files.percent``."""
        return self.failed / self.processed if self.processed else 0.0

    def rate_against(self, threshold: float) -> str:
        return f"{percent(self.failure_rate)} of {percent(threshold)}"

    def add_changes(self, counts: dict[str, list[int]]) -> None:
        _accumulate(self.changes, counts)


def _accumulate(into: dict[str, list[int]], counts: dict[str, list[int]]) -> None:
    for table, values in counts.items():
        now = into.setdefault(table, [0, 0, 0])
        for i, v in enumerate(values):
            now[i] += v


_XACT_CHANGES = """
SELECT c.relnamespace::regnamespace::text || '.' || c.relname,
       pg_stat_get_xact_tuples_inserted(c.oid), pg_stat_get_xact_tuples_updated(c.oid), pg_stat_get_xact_tuples_deleted(c.oid)
  FROM pg_class c
 WHERE c.relkind IN ('r', 'm') AND c.relnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
   AND pg_stat_get_xact_tuples_inserted(c.oid) + pg_stat_get_xact_tuples_updated(c.oid)
       + pg_stat_get_xact_tuples_deleted(c.oid) > 0"""


def _xact_changes(conn, before: str = "") -> dict[str, list[int]]:
    """Rows written so far by this transaction, per table (attempts in rolled-back
    savepoints included: PostgreSQL counts them, the caller subtracts them).
    ``before`` is a statement sent in the same round trip."""
    with conn.cursor() as cur:
        cur.execute(before + _XACT_CHANGES)
        return {r[0]: [int(r[1]), int(r[2]), int(r[3])] for r in cur.fetchall()}


def _minus(a: dict[str, list[int]], b: dict[str, list[int]]) -> dict[str, list[int]]:
    out = {}
    for table in set(a) | set(b):
        x, y = a.get(table, [0, 0, 0]), b.get(table, [0, 0, 0])
        diff = [p - q for p, q in zip(x, y, strict=True)]
        if any(diff):
            out[table] = diff
    return out


class MigrationContext:
    """What ``migrate(ctx)`` gets.

    ``ctx.staging``   the staging connection, inside a transaction (the runner commits)
    ``ctx.v2``        a read-only connection to V2 (opened on first use)
    ``ctx.run_batches(records, handle, key=..., total=...)``  calls ``handle(record)`` for each
                      record in its own savepoint, commits every ``batch_size`` records
                      (production), watches the failure rate, honours ``--limit``
    ``ctx.fail(key, reason)`` / ``ctx.skip(key, reason)``  end this record: rolled back, logged
    ``ctx.limit``     ``--limit`` (None: all), ``ctx.params`` the ``--param KEY=VALUE`` pairs,
    ``ctx.dry_run``, ``ctx.batch_size``, ``ctx.log`` a logger into the run's log file
    """

    def __init__(
        self,
        settings: Settings,
        migration: Migration,
        staging: TrackedConnection,
        ui: Reporter,
        *,
        dry_run: bool,
        batch_size: int,
        threshold: float,
        limit: int | None,
        params: dict[str, str],
        failures_path: Path,
        only_keys: set[str] | None = None,
        before_last_commit: Callable[[MigrationContext], None] | None = None,
    ) -> None:
        self.settings = settings
        self.migration = migration
        self.staging = staging
        self.dry_run = dry_run
        self.batch_size = batch_size
        self.threshold = threshold
        self.limit = limit
        self.params = params
        self.log = logging.getLogger(f"migration.{migration.id}")
        self.tally = Tally()
        self._ui = ui
        self._v2 = None
        self._failures = FailuresFile(failures_path, migration.id)
        self._batch = 0
        self._batch_failed = False
        self._warned_half = False
        self._position = 0  # of the record among all those passed to run_batches: its key when it has no other
        self._only_keys = only_keys  # --retry-failed: the keys of the records to run, as text
        self._keys_left = set(only_keys) if only_keys is not None else None
        self._before_last_commit = before_last_commit
        self._undone: dict[str, list[int]] = {}  # rows written by records that were rolled back
        self._release = ""  # releases the previous record's savepoint, sent with the next one
        # Exact per-table counts need the transaction's counters read before every record
        # (a rolled-back record's attempts stay counted); a dry run reports them, and a
        # .sql migration has no records. A production run of records skips that cost.
        self.count_changes = dry_run or migration.kind == "sql"

    # -- for migrations

    @property
    def v2(self):
        if self._v2 is None:
            info = self.settings.v2()
            if info is None:
                raise ConfigError(
                    f"The migration {self.migration.id} reads V2, and V2_DATABASE_URL is not set.",
                    "Set it in the environment or .env, or pass --v2-url.",
                )
            self._v2 = connect(info, autocommit=False, readonly=True, application_name=f"migration {self.migration.id} (V2)")
        return self._v2

    def fail(self, key, reason: str):
        raise RecordFailed(key, reason)

    def skip(self, key, reason: str = "skipped"):
        raise RecordSkipped(key, reason)

    def run_batches(self, records: Iterable, handle: Callable, *, key: Callable | None = None, total: int | None = None) -> Tally:
        if self._keys_left is not None:
            total = len(self._keys_left)
        if self.limit is not None and total is not None:
            total = min(total, max(0, self.limit - self.tally.processed))
        in_batch = 0
        with self._ui.counter(f"Migrating ({self.migration.id})", total, self._failures_so_far) as tick:
            for record in records:
                if self._keys_left is not None and not self._keys_left:
                    break  # a retry met every record it was given
                if self.limit is not None and self.tally.processed >= self.limit:
                    break
                self._position += 1
                record_key = key(record) if key else self._position
                if not self._wanted(record_key):
                    continue
                self._one(record, handle, record_key)
                in_batch += 1
                tick()
                if in_batch >= self.batch_size:
                    self.end_batch()
                    in_batch = 0
            if in_batch:
                self.end_batch()
        return self.tally

    # -- for the runner

    def _wanted(self, record_key) -> bool:
        """All records, or in a retry those the failures file lists (each once)."""
        if self._only_keys is None:
            return True
        text = str(record_key)
        if text not in self._keys_left:
            return False
        self._keys_left.discard(text)
        return True

    def _failures_so_far(self) -> str:
        return f"{self.tally.failed} failed, {self.tally.rate_against(self.threshold)}"

    def _one(self, record, handle: Callable, record_key) -> None:
        # The previous record's savepoint is released in the same round trip that opens this one.
        opening = self._release + "SAVEPOINT migration_record"
        if self.count_changes:
            before = _xact_changes(self.staging, before=opening + ";")
        else:
            before = {}
            with self.staging.cursor() as cur:
                cur.execute(opening)
        self._release = "RELEASE SAVEPOINT migration_record; "
        try:
            handle(record)
        except RecordFailed as exc:
            self._undo_record(before)
            self._record_failure(
                exc.key if exc.key is not None else record_key, exc.reason, skipped=isinstance(exc, RecordSkipped)
            )
        except (psycopg2.IntegrityError, psycopg2.DataError) as exc:
            self._undo_record(before)
            reason = (exc.pgerror or str(exc)).strip().splitlines()[0].removeprefix("ERROR:").strip()
            self._record_failure(record_key, reason)
        else:
            self.tally.migrated += 1

    def _undo_record(self, before: dict) -> None:
        with self.staging.cursor() as cur:
            cur.execute("ROLLBACK TO SAVEPOINT migration_record")
        if self.count_changes:
            _accumulate(self._undone, _minus(_xact_changes(self.staging), before))

    def _record_failure(self, key, reason: str, *, skipped: bool = False) -> None:
        outcome = "skipped" if skipped else "failed"
        if skipped:
            self.tally.skipped += 1
        else:
            self.tally.failed += 1
            self._batch_failed = True
        self._failures.write(key, outcome, reason, self._batch + 1)
        self.tally.failures_file = self._failures.path
        self.log.info("record %s %s: %s", key, outcome, reason)

    def end_batch(self) -> None:
        """Commit the batch (production) and stop when the failure rate has passed the threshold."""
        self._batch += 1
        if self._batch_failed:
            self.tally.batches_with_failures.append(self._batch)
            self._batch_failed = False
        over = self.tally.failure_rate > self.threshold
        if over and self.tally.threshold_batch is None:
            self.tally.threshold_batch = self._batch
        if over and not self.dry_run:
            raise ThresholdExceeded(
                f"{self.tally.failed} of {self.tally.processed} records failed ({percent(self.tally.failure_rate)}), "
                f"more than the failure threshold of {percent(self.threshold)}; the migration stopped after batch "
                f"{self._batch}.",
                f"The failed records and why are in {self.tally.failures_file}.",
            )
        self._warn_past_half()
        if not self.dry_run:
            self.staging.commit()  # releases the last record's savepoint too
            self._release = ""
            self.tally.batches_committed += 1

    def _warn_past_half(self) -> None:
        """Once, when the rate passes half the threshold (and not the threshold itself)."""
        rate = self.tally.failure_rate
        if self._warned_half or not self.threshold / 2 < rate <= self.threshold:
            return
        self._warned_half = True
        text = (
            f"{self.tally.failed} of {self.tally.processed} records failed ({self.tally.rate_against(self.threshold)}) "
            f"after batch {self._batch}: past half the failure threshold. "
            + ("A production run stops" if self.dry_run else "The run stops and rolls back")
            + f" when it passes {percent(self.threshold)}."
        )
        self._ui.warn(text)
        log.warning("%s", text)

    def finish(self) -> None:
        """Count the changes (one transaction: a dry run or a .sql migration); commit in production."""
        if self.count_changes:
            self.tally.add_changes(_minus(_xact_changes(self.staging), self._undone))
        if self._keys_left:
            self.tally.retry_not_found = sorted(self._keys_left)
        if not self.dry_run:
            if self._before_last_commit:
                self._before_last_commit(self)  # in the last transaction: committed with it, or not at all
            self.staging.commit()

    def close(self) -> None:
        self._failures.close()
        if self._v2 is not None and not self._v2.closed:
            self._v2.close()


_SEQUENCES = """
SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind = 'S' AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND has_table_privilege(c.oid, 'SELECT')"""


def _sequence_states(conn) -> dict[tuple[str, str], tuple[int, bool]]:
    """Sequences are not transactional: what a rolled-back migration drew from them stays drawn."""
    positions = {}
    with conn.cursor() as cur:
        cur.execute(_SEQUENCES)
        for schema, name in cur.fetchall():
            cur.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(sql.Identifier(schema, name)))
            last, called = cur.fetchone()
            positions[(schema, name)] = (int(last), bool(called))
    return positions


class SequenceGuard:
    """Puts back the sequences a rolled-back migration advanced, each only if nobody else
    drew from it in the meantime (it is still where the migration left it)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.before = self._read()
        self.left: dict[tuple[str, str], tuple[int, bool]] = {}

    def _read(self) -> dict[tuple[str, str], tuple[int, bool]]:
        # its own session: sequences are read outside any transaction, also an aborted one
        with closing(connect(self.settings.staging(), application_name="rollback-toolkit sequences")) as conn:
            return _sequence_states(conn)

    def note_where_left(self) -> None:
        """Before the migration's transaction is rolled back."""
        try:
            self.left = {k: v for k, v in self._read().items() if k in self.before and self.before[k] != v}
        except RollbackError as exc:
            log.warning("could not read the sequences after the migration: %s", exc)

    def put_back(self) -> list[str]:
        done: list[str] = []
        if not self.left:
            return done
        with closing(connect(self.settings.staging(), application_name="rollback-toolkit sequences")) as conn:
            with conn.cursor() as cur:
                for (schema, name), (last, called) in self.left.items():
                    old_last, old_called = self.before[(schema, name)]
                    cur.execute(
                        sql.SQL("SELECT setval(%s::regclass, %s, %s) FROM {} WHERE last_value = %s AND is_called = %s").format(
                            sql.Identifier(schema, name)
                        ),
                        (sql.Identifier(schema, name).as_string(conn), old_last, old_called, last, called),
                    )
                    if cur.fetchall():
                        done.append(f"{schema}.{name} {last} → {old_last}")
                    else:
                        log.warning("sequence %s.%s was drawn from by another session; left where it is", schema, name)
        return done


def run_sql(ctx: MigrationContext) -> None:
    with ctx.staging.cursor() as cur:
        cur.execute("SELECT txid_current()")
        xid = cur.fetchone()[0]
        cur.execute(ctx.migration.sql)
        cur.execute("SELECT txid_current()")
        if cur.fetchone()[0] != xid:
            raise DatabaseError(
                f"{ctx.migration.path} ended the runner's transaction itself (a COMMIT or ROLLBACK inside a function "
                "or procedure?).",
                "Check staging: part of it may have been committed.",
            )


def perform(ctx: MigrationContext) -> None:
    """Run the migration inside ``ctx``'s transaction; the caller commits or rolls back."""
    with ctx.staging.cursor() as cur:
        cur.execute("SELECT set_config(%s, %s, false)", (LIMIT_SETTING, "" if ctx.limit is None else str(ctx.limit)))
    started = time.monotonic()
    if ctx.migration.kind == "sql":
        run_sql(ctx)
    else:
        ctx.migration.module.migrate(ctx)  # type: ignore[union-attr]
    ctx.finish()
    log.info("migration %s ran in %.3f s", ctx.migration.id, time.monotonic() - started)
