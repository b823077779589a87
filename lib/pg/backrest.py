"""pgBackRest, as the toolkit drives it: through its command line (``--output=json``
where it offers it), as the cluster's owner, with its own configuration (its
configuration file, PGBACKREST_* variables; credentials stay there). The toolkit never
writes into the repository itself: pgBackRest takes the backups and archives the WAL;
a restore reads them."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lib.config import Settings
from lib.errors import ConfigError, ToolError
from lib.pg.cluster import LocalCluster
from lib.process import PgBackRest

log = logging.getLogger(__name__)

# pgbackrest info's status codes (its documentation: "Stanza Status")
_STATUS_FIX = {
    1: "the stanza does not exist in the repository: create it with `pgbackrest --stanza={stanza} stanza-create`",
    2: "the repository holds no valid backup yet",
    3: "the stanza's data is missing from the repository: recreate it with `pgbackrest --stanza={stanza} stanza-create`",
    4: "the repositories use different ciphers",
    5: "the repository belongs to another cluster (database mismatch): check pg1-path in the stanza's configuration",
}


@dataclass
class Backup:
    label: str
    kind: str  # full, diff, incr
    start_lsn: str
    stop_lsn: str
    start_time: int
    stop_time: int
    size: int  # bytes of the cluster it restores
    timeline: int = 1  # the timeline it was taken on (its first WAL segment's)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class History:
    """The cluster's current timeline and the ones it descends from, each with the LSN at
    which the next one branched off (its .history file). An in-place restore starts a new
    timeline; a backup taken on the old one after the branch point cannot start a
    recovery along the new one."""

    current: int
    left_at: dict[int, int]  # ancestor timeline -> the LSN (as a number) where it was left
    current_since: float | None = None  # when the current timeline began (epoch seconds), when known

    def holds(self, backup: Backup) -> bool:
        """A recovery along the current timeline can start from ``backup``."""
        if backup.timeline == self.current:
            return True
        end = self.left_at.get(backup.timeline)
        return end is not None and lsn_value(backup.stop_lsn) <= end

    def parent(self) -> History:
        """The history as it was on the timeline the current one branched from."""
        parent = max(self.left_at)
        return History(parent, {t: lsn for t, lsn in self.left_at.items() if t < parent})


def parse_history(current: int, text: str, since: float | None = None) -> History:
    """A timeline's .history file: one line per ancestor, ``<timeline> <LSN> <reason>``."""
    left = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            left[int(parts[0])] = lsn_value(parts[1])
    return History(current, left, since)


class Repository:
    """One stanza of pgBackRest, for the cluster it backs up."""

    def __init__(self, settings: Settings, cluster: LocalCluster) -> None:
        self.stanza = settings.pgbackrest_stanza
        if not self.stanza:
            raise ConfigError(
                "PGBACKREST_STANZA is not set, so there is no pgBackRest stanza to take pitr points with.",
                "Set it (and PGBACKREST_CONFIG where the configuration is not /etc/pgbackrest/pgbackrest.conf) in the "
                "environment or in .env; `python3 check_setup.py` then says whether pitr points work.",
            )
        binary = shutil.which("pgbackrest", path=_search_path(settings))
        if binary is None:
            raise ToolError(
                "pgBackRest is not installed on this machine (no `pgbackrest` on PATH), and pitr points are made "
                "and restored through it.",
                "Install it (Debian: apt-get install pgbackrest) and configure the stanza; or take template or dump "
                "points instead.",
            )
        self.cluster = cluster
        self.command = PgBackRest(Path(binary), account=cluster.run_as(), env=settings.pgbackrest_env)

    # ---- what the repository holds --------------------------------------------

    def info(self, *args: str) -> dict:
        """``pgbackrest info`` of this stanza; a stanza that is not usable is an error naming the fix."""
        found = self.command.json("info", f"--stanza={self.stanza}", *args)
        entry = next((s for s in found or [] if s.get("name") == self.stanza), None)
        if entry is None:
            raise ConfigError(f"pgBackRest knows no stanza {self.stanza!r}.", self._fix(1))
        code = entry.get("status", {}).get("code", 99)
        if code not in (0, 2):
            message = entry.get("status", {}).get("message", "unknown status")
            raise ConfigError(f"pgBackRest stanza {self.stanza!r} is not usable: {message}.", self._fix(code))
        return entry

    def _fix(self, code: int) -> str:
        fix = _STATUS_FIX.get(code, "run `pgbackrest --stanza={stanza} info` and `check` to see why").format(stanza=self.stanza)
        return f"Fix it: {fix} (as {self.cluster.owner.pw_name}); then `pgbackrest --stanza={self.stanza} check`."

    def backups(self) -> list[Backup]:
        """Every backup, oldest first."""
        return [_backup(b) for b in self.info().get("backup", [])]

    def databases_in(self, label: str) -> dict[str, int]:
        """The databases a backup holds, by name, with their oids (from its manifest)."""
        entry = self.info(f"--set={label}")
        for found in entry.get("backup", []):
            if found.get("label") == label:
                return {d["name"]: int(d["oid"]) for d in found.get("database-ref") or []}
        return {}

    def backup_holding(self, dbname: str, oid: int, history: History) -> Backup | None:
        """The newest backup that holds database ``dbname`` as it is now (by oid: a swap
        gives staging a new one, which older backups do not hold), on the current
        timeline's history."""
        for backup in reversed(self.backups()):
            if history.holds(backup) and self.databases_in(backup.label).get(dbname) == oid:
                return backup
        return None

    def archived_range(self) -> tuple[str, str] | None:
        """The oldest and newest WAL segment names archived for the current database id."""
        archives = self.info().get("archive", [])
        if not archives:
            return None
        newest = archives[-1]
        return newest.get("min"), newest.get("max")

    # ---- what it does ----------------------------------------------------------

    def backup(self, kind: str, on_tick: Callable[[float], None] | None = None) -> None:
        self.command.run([f"--stanza={self.stanza}", f"--type={kind}", "--start-fast", "backup"], on_tick=on_tick)

    def restore(self, args: list[str], on_tick: Callable[[float], None] | None = None) -> None:
        self.command.run([f"--stanza={self.stanza}", *args, "restore"], on_tick=on_tick)


def _backup(raw: dict) -> Backup:
    return Backup(
        label=raw["label"],
        kind=raw.get("type", "?"),
        start_lsn=raw.get("lsn", {}).get("start", ""),
        stop_lsn=raw.get("lsn", {}).get("stop", ""),
        start_time=int(raw.get("timestamp", {}).get("start", 0)),
        stop_time=int(raw.get("timestamp", {}).get("stop", 0)),
        size=int(raw.get("info", {}).get("size", 0)),
        timeline=int((raw.get("archive", {}).get("start") or "00000001")[:8], 16),
    )


def _search_path(settings: Settings) -> str:
    return ":".join([*(str(d) for d in settings.pg_bin_dirs), os.environ.get("PATH", "/usr/bin:/bin")])


def lsn_value(lsn: str) -> int:
    """'16/B374D848' as a number, to compare two positions."""
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) + int(low, 16)
