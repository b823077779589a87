"""A run's failures file, LOG_DIR/<migration>_<time>_failures.csv: one line per record
that failed or was skipped, written as the run goes; and read back by --retry-failed,
which runs the migration again for the records that failed.

A record is named by its key: what ``key(record)`` returned to ``ctx.run_batches``, or
its position among the records the migration passed there. The key is all a retry
knows of a record, so it compares keys as the file holds them: as text."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from lib.errors import ConfigError
from lib.files import make_private_dir, slugify, utc_now

COLUMNS = ["record_key", "outcome", "reason", "batch", "time", "migration_id"]
OUTCOMES = ("failed", "skipped")


def path_for(log_dir: Path, migration_id: str, *, dry_run: bool, retry: bool) -> Path:
    stamp = utc_now().strftime("%Y%m%d_%H%M%S")
    kind = ("_retry" if retry else "") + ("_dry_run" if dry_run else "")
    return log_dir / f"{slugify(migration_id, 60)}_{stamp}{kind}_failures.csv"


class FailuresFile:
    """Opened at the first failure, so that a run without any leaves no file; each line
    is flushed as it is written, so a run that is killed keeps what it found."""

    def __init__(self, path: Path, migration_id: str) -> None:
        self.path = path
        self.migration_id = migration_id
        self.written = False
        self._fh = None
        self._writer = None

    def write(self, key, outcome: str, reason: str, batch: int) -> None:
        if self._writer is None:
            make_private_dir(self.path.parent)
            self._fh = open(self.path, "w", newline="", encoding="utf-8")  # noqa: SIM115 - open for the run
            self.path.chmod(0o600)
            self._writer = csv.writer(self._fh)
            self._writer.writerow(COLUMNS)
            self.written = True
        self._writer.writerow([key, outcome, reason, batch, utc_now().isoformat(timespec="seconds"), self.migration_id])
        self._fh.flush()

    def close(self) -> None:
        if self._fh:
            self._fh.close()


@dataclass
class Retry:
    """What --retry-failed runs again: the keys of the records a failures file lists as failed."""

    path: Path
    keys: set[str]


def read_retry(path: str | Path, migration_id: str) -> Retry:
    """The failed records of ``path``, which must be a failures file of ``migration_id``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"There is no failures file {path}.", "Give the file a run wrote: LOG_DIR/<migration>_<time>_failures.csv."
        )
    header, rows = _rows(path)
    _refuse_another_migration(path, header, [row for _, row in rows], migration_id)
    keys: set[str] = set()
    for number, row in rows:
        if not row or not row[0].strip():
            raise ConfigError(f"{path} is damaged: line {number} has no record_key.", _FIX)
        if row[1] not in OUTCOMES:
            raise ConfigError(f"{path} is damaged: line {number} has the outcome {row[1]!r}, not failed or skipped.", _FIX)
        if row[1] == "failed":
            keys.add(row[0])
    if not keys:
        raise ConfigError(f"{path} lists no failed record: there is nothing to retry.", "Skipped records are not retried.")
    return Retry(path, keys)


_FIX = "Retry with the file as the run wrote it (nothing was run)."


def _rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header, and every other line that is not empty with its line number."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, row) for row in reader if row]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{path} is not a failures file of run_migration.py ({exc}).", _FIX) from None
    if not rows or rows[0][1][:5] != COLUMNS[:5] or any(len(row) < 2 for _, row in rows):
        raise ConfigError(
            f"{path} is not a failures file of run_migration.py: its first line is not {','.join(COLUMNS)}, "
            "or a line has fewer than two columns.",
            _FIX,
        )
    return rows[0][1], rows[1:]


def _refuse_another_migration(path: Path, header: list[str], rows: list[list[str]], migration_id: str) -> None:
    """The file says whose it is in its migration_id column; a file written before that
    column existed says it with its name."""
    if len(header) > 5:
        owners = {row[5] for row in rows if len(row) > 5 and row[5]}
        if owners - {migration_id}:
            raise ConfigError(
                f"{path} is a failures file of the migration {', '.join(sorted(owners))}, not of {migration_id}.",
                "Give the migration whose run wrote it, or that migration's own failures file (nothing was run).",
            )
        return
    pattern = rf"{re.escape(slugify(migration_id, 60))}_\d{{8}}_\d{{6}}(_retry)?(_dry_run)?_failures\.csv"
    if not re.fullmatch(pattern, path.name):
        raise ConfigError(
            f"{path} is a failures file of another migration than {migration_id}, by its name "
            f"(a file of {migration_id} is named {slugify(migration_id, 60)}_<time>_failures.csv).",
            "Give the migration whose run wrote it, or that migration's own failures file (nothing was run).",
        )
