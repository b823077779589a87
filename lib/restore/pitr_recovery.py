"""Putting staging back from a pgBackRest repository: to a pitr point, or to any moment
the repository covers.

Beside, then swap (the default). pgBackRest restores the backup, to the point, into a
side folder on this machine, with only staging's database (--db-include) and archiving
off (the side server must never write into the repository, whose timelines a later
restore would follow). A private server starts on it: unix socket only, in a 0700
folder, on a free port, trusted only there. Once it has recovered to the target and
promoted, staging's database is streamed from it into a new database beside staging,
checked against it, and swapped in as every restore is (lib/restore/rebuild.py's
rebuild_from): staging's other databases and the cluster keep running. The side server
and its files are removed afterwards, also after a failure or Ctrl-C; a run killed
outright leaves a record in BACKUP_DIR/.sides/ that `cleanup` acts on.

In place (--in-place), for a cluster that holds only staging: the cluster is stopped,
`pgbackrest restore --delta` brings all of it back to the target, and it is started
again. Every database on it goes back."""

from __future__ import annotations

import json
import logging
import os
import pwd
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psycopg2

from lib import faults
from lib.config import ConnInfo, Settings
from lib.errors import ConfigError, RollbackError, VerificationError
from lib.files import human_size, make_private_dir, utc_now, write_private_file
from lib.interaction import Reporter
from lib.pg.backrest import Backup, History, Repository, lsn_value
from lib.pg.cluster import LocalCluster
from lib.pg.db import connect, database_properties, query, scalar
from lib.pg.fingerprint import compare, physical_fingerprint, rekeyed, split_qualified
from lib.pg.target import Target
from lib.points.catalog import Catalog, Point
from lib.points.manifest import thawed
from lib.points.methods import data as data_method
from lib.points.methods import pitr as pitr_method
from lib.points.methods.data import Table
from lib.process import ServerProgram, free_port, pid_alive
from lib.restore.rebuild import rebuild_from
from lib.restore.swap import RestoreResult

log = logging.getLogger(__name__)

SIDES = ".sides"  # in BACKUP_DIR: one record per side server while it exists
START_SECONDS = 3600  # recovery of a long stretch of WAL may take this long
# settings a recovering server must not take from the restored configuration: where it
# listens, writes and archives must be the side folder's, or nowhere
_SIDE_SETTINGS = {
    "listen_addresses": "",
    "archive_mode": "off",
    "primary_conninfo": "",
    "external_pid_file": "",
    "logging_collector": "off",
    "ssl": "off",
    "shared_buffers": "256MB",
    "max_logical_replication_workers": "0",  # a restored subscription must not pull from (or move) a real publisher
    "synchronous_standby_names": "",
}
# what a server in recovery needs at least as high as the cluster that wrote the WAL
_AS_HIGH = (
    "max_connections",
    "max_worker_processes",
    "max_wal_senders",
    "max_prepared_transactions",
    "max_locks_per_transaction",
)


@dataclass
class Recovery:
    """What to recover to, as pgBackRest's restore options say it."""

    kind: str  # name, time, lsn
    target: str
    label: str  # for people
    backup: str | None = None  # the backup set; None: pgBackRest chooses by the target
    sequences: dict = field(default_factory=dict)  # positions at a named point (recovery runs them up to 32 ahead)
    properties: dict = field(default_factory=dict)  # the database's, recorded at the point
    timeline: int | None = None  # a named point's: an in-place restore since may have started a newer one

    def options(self) -> list[str]:
        found = [f"--type={self.kind}", f"--target={self.target}", "--target-action=promote"]
        found += [f"--target-timeline={self.timeline}"] if self.timeline else []
        return found + ([f"--set={self.backup}"] if self.backup else [])


def for_point(point: Point) -> Recovery:
    m = point.manifest
    return Recovery(
        "name",
        m.restore_point.name,
        f"point {point.id}",
        backup=m.backup.label,
        sequences=thawed(m.sequences or {}),
        properties=thawed(m.database.properties),
        timeline=m.restore_point.timeline,
    )


def for_moment(target: Target, repo: Repository, ui: Reporter, *, at_time: str | None, at_lsn: str | None) -> Recovery:
    """--to-time / --to-lsn: refused before anything is touched when the repository
    cannot cover it. The timeline is chosen here (an LSN is read along the current one;
    a time before an in-place restore began the current one, along the timeline that was
    live then), and the backup (the newest on that timeline's history that ends before
    the moment); then the WAL up to now is made recoverable: a commit record (recovery to
    a time stops only at a commit after it), a WAL switch, its archiving waited for."""
    timelines = pitr_method.history(target)
    now_lsn = scalar(target.maint, "SELECT pg_current_wal_lsn()")
    if at_lsn is not None:
        try:
            wanted = lsn_value(at_lsn)
        except ValueError:
            raise ConfigError(f"--to-lsn {at_lsn!r} is not an LSN.", "Write it as PostgreSQL does, e.g. 0/3000100.") from None
        backups = _usable(repo, timelines)
        if not lsn_value(backups[0].stop_lsn) <= wanted <= lsn_value(now_lsn):
            raise ConfigError(
                f"LSN {at_lsn} is outside what the repository covers on timeline {timelines.current}: "
                f"{backups[0].stop_lsn} (the end of backup {backups[0].label}) to {now_lsn} (now). Nothing was touched.",
                "Choose a position in that range.",
            )
        _archive_up_to_now(target, ui)
        backup = [b for b in backups if lsn_value(b.stop_lsn) <= wanted][-1]
        return Recovery("lsn", at_lsn, f"LSN {at_lsn}", backup=backup.label, timeline=timelines.current)
    moment = _parse_time(at_time or "")
    on = timelines
    if timelines.current_since is not None and moment.timestamp() < timelines.current_since:
        on = timelines.parent()  # the cluster was restored in place since: then, the older timeline was live
        if on.left_at:
            raise ConfigError(
                f"{moment.isoformat(sep=' ')} is before the cluster's latest in-place restore, and the cluster has been "
                f"restored in place more than once (it is on timeline {timelines.current}), so the toolkit cannot tell "
                "which of its timelines was live then. Nothing was touched.",
                "Restore a point taken then (`rollback_manager.py list`) instead.",
            )
    backups = _usable(repo, on)
    start = datetime.fromtimestamp(backups[0].stop_time, UTC)
    now = utc_now()
    if not start <= moment <= now:
        raise ConfigError(
            f"{moment.isoformat(sep=' ')} is outside what the repository covers: {start.isoformat(sep=' ')} (the end of "
            f"backup {backups[0].label}) to {now.isoformat(sep=' ', timespec='seconds')} (now). Nothing was touched.",
            "Choose a moment in that range (with its time zone, e.g. 2026-11-21 21:55:00+00).",
        )
    _archive_up_to_now(target, ui)
    backup = [b for b in backups if b.stop_time <= moment.timestamp()][-1]
    return Recovery("time", moment.isoformat(sep=" "), moment.isoformat(sep=" "), backup=backup.label, timeline=on.current)


def _usable(repo: Repository, on: History) -> list[Backup]:
    """The backups a recovery along timeline ``on.current`` can start from, oldest first."""
    backups = [b for b in repo.backups() if on.holds(b)]
    if not backups:
        raise ConfigError(
            f"Stanza {repo.stanza!r} holds no backup on timeline {on.current}'s history, so no moment can be restored.",
            f"Take one first (`pgbackrest --stanza={repo.stanza} --type=full backup`).",
        )
    return backups


def _parse_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"--to-time {text!r} is not a moment.", "Write it with its time zone, e.g. '2026-11-21 21:55:00+00'."
        ) from None
    if moment.tzinfo is None:
        raise ConfigError(
            f"--to-time {text!r} has no time zone, so it could mean several moments.",
            "Add one, e.g. '2026-11-21 21:55:00+00' for UTC.",
        )
    return moment.astimezone(UTC)


def _archive_up_to_now(target: Target, ui: Reporter) -> None:
    scalar(target.maint, "SELECT txid_current()")  # a transaction of its own: its commit record is written now
    segment = scalar(target.maint, "SELECT pg_walfile_name(pg_switch_wal())")
    pitr_method.wait_archived(target, segment, ui)


# ---------------------------------------------------------------------------- the side server


@dataclass
class Side:
    folder: Path
    socket: Path
    port: int
    cluster: LocalCluster
    bin_dir: Path
    backrest_env: dict[str, str]

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def info(self, dbname: str) -> ConnInfo:
        return ConnInfo(str(self.socket), self.port, self.cluster.superuser, dbname)

    def pg_ctl(self, *args: str, check: bool = False):
        # pgBackRest's settings in the server's environment: its restore_command (archive-get) reads them
        program = ServerProgram(self.bin_dir / "pg_ctl", account=self.cluster.run_as(), cwd=self.folder, env=self.backrest_env)
        return program.run(["-D", str(self.data), *args], check=check)


def _record(settings: Settings, side: Side) -> Path:
    folder = Path(settings.backup_dir) / SIDES
    make_private_dir(folder)
    path = folder / f"{side.folder.name}.json"
    record = {"folder": str(side.folder), "socket": str(side.socket), "bin_dir": str(side.bin_dir), "pid": os.getpid()}
    write_private_file(path, json.dumps(record).encode())
    return path


def _own(path: Path, cluster: LocalCluster) -> None:
    if cluster.run_as() is not None:
        os.chown(path, cluster.owner.pw_uid, cluster.owner.pw_gid)


def check_space(target: Target, cluster: LocalCluster, folder: Path, backup_bytes: int) -> None:
    """The side cluster's restored files, and the new copy of staging on the server."""
    needs = {folder.parent: backup_bytes}
    needs[cluster.data_dir] = needs.get(cluster.data_dir, 0) + target.facts.database_size
    by_device: dict[int, tuple[Path, int]] = {}
    for path, size in needs.items():
        device = path.stat().st_dev
        where, total = by_device.get(device, (path, 0))
        by_device[device] = (where, total + size)
    for where, total in by_device.values():
        free = shutil.disk_usage(where).free
        if free < total:
            raise RollbackError(
                f"Not enough free space for the restore beside staging: it needs about {human_size(total)} ({total} "
                f"bytes) on the filesystem of {where} (the cluster restored beside it, and the new copy of staging), "
                f"and {human_size(free)} ({free} bytes) is free. Nothing was touched.",
                "Free space there, or set PITR_SIDE_DIR to a folder on a larger filesystem.",
            )


@contextmanager
def side_server(target: Target, cluster: LocalCluster, repo: Repository, recovery: Recovery, ui: Reporter) -> Iterator[Side]:
    """The cluster restored to ``recovery`` beside staging, recovered and promoted, on a
    private socket; stopped and removed afterwards, whatever happens."""
    settings = target.settings
    folder = pitr_method.side_folder(settings, cluster, recovery_label(recovery))
    backup_bytes = max((b.size for b in repo.backups() if b.label == recovery.backup), default=cluster_size(target))
    check_space(target, cluster, folder, backup_bytes)
    socket = Path(tempfile.mkdtemp(prefix="rb-side-"))
    side = Side(folder, socket, free_port(), cluster, cluster.bin_dir(settings), settings.pgbackrest_env)
    record = _record(settings, side)
    try:
        for path in (folder, side.data, folder / "tablespaces"):
            path.mkdir(mode=0o700, exist_ok=path != folder)
            _own(path, cluster)
        _own(socket, cluster)
        restore_side(target, side, repo, recovery, ui, backup_bytes)
        start_side(target, side, recovery, ui)
        yield side
    finally:
        remove_side(side)
        record.unlink(missing_ok=True)


def recovery_label(recovery: Recovery) -> str:
    return recovery.target if recovery.kind == "name" else f"{recovery.kind}-{int(time.time())}"


def cluster_size(target: Target) -> int:
    return int(scalar(target.maint, "SELECT sum(pg_database_size(oid)) FROM pg_database WHERE datallowconn"))


def restore_side(target: Target, side: Side, repo: Repository, recovery: Recovery, ui: Reporter, total: int) -> None:
    args = [
        f"--pg1-path={side.data}",
        *recovery.options(),
        "--archive-mode=off",
        f"--db-include={target.dbname}",
        f"--tablespace-map-all={side.folder / 'tablespaces'}",
    ]
    with ui.progress(f"pgBackRest restoring the cluster to {recovery.label} into {side.folder}", total=total, unit="B") as tick:
        repo.restore(args, on_tick=lambda _e: tick(done=_bytes_under(side.folder)))


def _bytes_under(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_blocks * 512  # sparse files count what they hold
    return total


def start_side(target: Target, side: Side, recovery: Recovery, ui: Reporter) -> None:
    """Start it on the side folder alone, and wait until it has recovered and promoted."""
    hba = side.folder / "side_hba.conf"
    hba.write_text("local all all trust\n")  # its socket is in a 0700 folder: only the cluster's owner and root reach it
    ident = side.folder / "side_ident.conf"
    ident.write_text("")
    for path in (hba, ident):
        _own(path, side.cluster)
    conf = side.data / "postgresql.conf"
    if not conf.exists():  # the configuration lives outside the data directory (Debian's /etc/postgresql)
        needed = {name: scalar(target.maint, "SELECT current_setting(%s)", (name,)) for name in _AS_HIGH}
        conf.write_text("".join(f"{k} = '{v}'\n" for k, v in needed.items()))
        _own(conf, side.cluster)
    options = {
        **_SIDE_SETTINGS,
        "port": str(side.port),
        "unix_socket_directories": str(side.socket),
        "data_directory": str(side.data),
        "hba_file": str(hba),
        "ident_file": str(ident),
    }
    if side.cluster.major < 15:
        options["stats_temp_directory"] = str(side.folder / "pg_stat_tmp")
    argv = " ".join(f"-c {k}={_quoted(v)}" for k, v in options.items())
    started = side.pg_ctl("-l", str(side.folder / "side.log"), "-o", argv, "-W", "start")
    if started.returncode != 0:
        raise RollbackError(f"The server restored beside staging did not start: {_log_tail(side)}")
    _wait_promoted(side, recovery, target.dbname, ui)


def _quoted(value: str) -> str:
    return "''" if value == "" else "'" + value.replace("'", "''") + "'"


def _wait_promoted(side: Side, recovery: Recovery, dbname: str, ui: Reporter) -> None:
    started = time.monotonic()
    with ui.progress(f"Recovering the side cluster to {recovery.label}") as tick:
        while True:
            if not (side.data / "postmaster.pid").exists() and time.monotonic() - started > 2:
                raise RollbackError(
                    f"The server restored beside staging stopped during recovery: {_log_tail(side)}",
                    "The target may lie outside what the repository's WAL reaches; staging was not touched.",
                )
            try:
                conn = connect(side.info("postgres"), application_name="rollback-toolkit side")
            except RollbackError:
                conn = None
            if conn is not None:
                try:
                    in_recovery, replayed = query(conn, "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text")[0]
                finally:
                    conn.close()
                if not in_recovery:
                    return
                tick(f"replayed to {replayed}")
            if time.monotonic() - started > START_SECONDS:
                raise RollbackError(f"The side cluster did not finish recovering within {START_SECONDS} s: {_log_tail(side)}")
            time.sleep(0.2)


def _log_tail(side: Side) -> str:
    try:
        lines = (side.folder / "side.log").read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    important = [ln for ln in lines if "FATAL" in ln or "PANIC" in ln or "ERROR" in ln]
    return " ".join((important or lines)[-3:]) or "(empty log)"


def remove_side(side: Side) -> None:
    _stop_and_remove(side.pg_ctl, side.data, side.folder, side.socket)


def _stop_and_remove(pg_ctl: Callable[..., object], data: Path, folder: Path, socket_dir: Path) -> None:
    """A side server stopped at once (its data is thrown away) and its folders removed."""
    if (data / "postmaster.pid").exists():
        pg_ctl("-m", "immediate", "-w", "stop")
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(socket_dir, ignore_errors=True)


def leftover_sides(settings: Settings, *, dry_run: bool) -> list[str]:
    """Side servers of runs that were killed: stopped and removed (cleanup's work)."""
    found = []
    folder = Path(settings.backup_dir) / SIDES
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if pid_alive(int(record.get("pid", 0))):
            continue
        found.append(f"the server restored beside staging in {record['folder']}, left by a run that was killed")
        if dry_run:
            continue
        data = Path(record["folder"]) / "data"

        def pg_ctl(*args: str, data: Path = data, bin_dir: str = record["bin_dir"]) -> None:
            owner = data.stat().st_uid
            account = pwd.getpwuid(owner) if os.geteuid() == 0 and owner != 0 else None
            ServerProgram(Path(bin_dir) / "pg_ctl", account=account, cwd=Path("/")).run(["-D", str(data), *args], check=False)

        _stop_and_remove(pg_ctl, data, Path(record["folder"]), Path(record["socket"]))
        if not Path(record["folder"]).exists():  # else the next cleanup tries again
            path.unlink(missing_ok=True)
    return found


# ---------------------------------------------------------------------------- the two paths


def restore_beside(target: Target, catalog: Catalog, ui: Reporter, recovery: Recovery, *, jobs: int) -> RestoreResult:
    cluster, repo = pitr_method.repository_for(target, needed_for="Restoring from pgBackRest")
    with side_server(target, cluster, repo, recovery, ui) as side:
        faults.pause("side server up")
        props = recovery.properties or _current_properties(target)
        result = rebuild_from(
            target,
            catalog,
            ui,
            side.info(target.dbname),
            cluster.major,
            props=props,
            jobs=jobs,
            restored=recovery.target if recovery.kind == "name" else recovery.label,
            what=f"the cluster restored to {recovery.label}",
            sequences=recovery.sequences,
        )
    result.mode = "pitr beside"
    return result


def _current_properties(target: Target) -> dict:
    return database_properties(target.maint, target.dbname).as_dict()


def databases_on(target: Target) -> list[str]:
    """Every database of the cluster but template0: an in-place restore takes them all back,
    database copies of points and kept states included."""
    return [r[0] for r in query(target.maint, "SELECT datname FROM pg_database WHERE datname <> 'template0' ORDER BY 1")]


class ClusterControl:
    """Stopping and starting the cluster itself: through Debian's pg_ctlcluster where the
    cluster is one of its (its configuration in /etc/postgresql/<major>/<name>/) and the
    toolkit runs as root, so that systemd keeps managing it; else pg_ctl as its owner."""

    def __init__(self, target: Target, cluster: LocalCluster) -> None:
        self.cluster = cluster
        parts = cluster.config_file.parts
        debian = len(parts) >= 6 and parts[:3] == ("/", "etc", "postgresql") and shutil.which("pg_ctlcluster")
        self.debian = (parts[3], parts[4]) if debian and os.geteuid() == 0 else None
        env = target.settings.pgbackrest_env  # the restore_command (archive-get) reads them
        self.pg_ctl = ServerProgram(cluster.bin_dir(target.settings) / "pg_ctl", account=cluster.run_as(), cwd=Path("/"), env=env)
        self.log = cluster.data_dir / "rollback-restore.log"  # the one folder the owner surely may write

    def command(self, what: str) -> str:
        if self.debian:
            return f"pg_ctlcluster {self.debian[0]} {self.debian[1]} {what}"
        folder = self.cluster.config_file.parent if what == "start" else self.cluster.data_dir
        return f"pg_ctl -D {folder} {what}" + (f" -l {self.log}" if what == "start" else "")

    def log_hint(self) -> str:
        return f"its log: {self.log}" if not self.debian else "its log: /var/log/postgresql/ or `journalctl -u postgresql@…`"

    def run(self, what: str) -> None:
        if self.debian:  # no pg_ctl options: with any, pg_ctlcluster bypasses systemd (its stop is fast already)
            ServerProgram(Path(shutil.which("pg_ctlcluster")), account=None, cwd=Path("/")).run(
                [self.debian[0], self.debian[1], what]
            )
        elif what == "stop":
            self.pg_ctl.run(["-D", str(self.cluster.data_dir), "-m", "fast", "-w", "-t", "300", "stop"])
        else:
            self.pg_ctl.run(
                ["-D", str(self.cluster.config_file.parent), "-l", str(self.log), "-w", "-t", str(START_SECONDS), "start"]
            )


def restore_in_place(target: Target, ui: Reporter, recovery: Recovery) -> dict:
    """The whole cluster back to ``recovery``: stopped, `pgbackrest restore --delta`, started.
    Everything that can be checked is checked before the stop; a failure after it says in
    which state the cluster is, and the commands that finish the work by hand."""
    cluster, repo = pitr_method.repository_for(target, needed_for="An in-place restore")
    if recovery.backup and recovery.backup not in {b.label for b in repo.backups()}:
        raise VerificationError(f"Backup {recovery.backup} is no longer in stanza {repo.stanza}. Nothing was touched.")
    control = ClusterControl(target, cluster)
    args = [f"--pg1-path={cluster.data_dir}", *recovery.options(), "--delta", *_config_option(target)]
    target.close()  # our own sessions first
    with ui.progress(f"Stopping the cluster in {cluster.data_dir}"):
        control.run("stop")
    phase = "restore"
    try:
        with ui.progress(f"pgBackRest restoring the whole cluster to {recovery.label} (--delta)"):
            repo.restore(args)
        phase = "start"
        with ui.progress("Starting the cluster and recovering"):
            control.run("start")
            _wait_recovered(target)
    except BaseException as exc:
        said = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        restore = shlex.join(["pgbackrest", f"--stanza={repo.stanza}", *args, "restore"])
        if phase == "restore":
            state, steps = "STOPPED", f"`{restore}`, then `{control.command('start')}`"
        else:
            state, steps = "restored but not (yet) recovered", f"`{control.command('start')}` if it is down, and watch it"
        raise RollbackError(
            f"The in-place restore stopped half-way ({said}): the cluster in {cluster.data_dir} is {state}.",
            f"As {cluster.owner.pw_name}, with the same PGBACKREST_* settings, finish by hand: {steps}; "
            f"{control.log_hint()}. Or restore the state kept before the restore once it runs.",
        ) from None
    return {"cluster": str(cluster.data_dir), "log": str(control.log)}


def _config_option(target: Target) -> list[str]:
    """PGBACKREST_CONFIG also on the command line: pgBackRest writes the restore's own
    options into the restore_command, which a server started by systemd (without the
    toolkit's environment) then runs."""
    config = target.settings.pgbackrest_env.get("PGBACKREST_CONFIG")
    return [f"--config={config}"] if config else []


def _wait_recovered(target: Target) -> None:
    """Until the restarted server takes connections and has left recovery (a server
    started by systemd is waited for here, not by pg_ctl)."""
    deadline = time.monotonic() + START_SECONDS
    while True:
        try:
            target.reopen()
            if not scalar(target.maint, "SELECT pg_is_in_recovery()"):
                return
        except (psycopg2.Error, RollbackError):
            pass
        if time.monotonic() > deadline:
            raise RollbackError(f"The cluster did not finish recovering within {START_SECONDS} s.")
        time.sleep(0.5)


def set_sequences(conn, sequences: dict) -> None:
    for key, (last, called) in rekeyed(sequences, (t.key for t in data_method.all_sequences(conn))).items():
        with suppress(psycopg2.Error):
            query(conn, "SELECT setval(%s::regclass, %s, %s)", (data_method.quoted(Table(*split_qualified(key))), last, called))


def check_schema(conn, point: Point) -> None:
    expected = {k: v for k, v in thawed(point.manifest.fingerprint or {}).items() if k in ("schema_digest", "sequences")}
    problems = compare(expected, physical_fingerprint(conn))
    if problems:
        raise VerificationError(f"After the in-place restore, staging does not match point {point.id}: " + "; ".join(problems))
