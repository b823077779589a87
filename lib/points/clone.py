"""Whether the server's copies of a database can share blocks with the original.

PostgreSQL 18 copies a database's files by cloning them (``file_copy_method =
clone``) where asked; on a filesystem that shares blocks (XFS with reflink, btrfs,
ZFS with block cloning, APFS) that takes a few hundredths of a second whatever the
size, elsewhere it quietly falls back to a plain copy, slower than ``copy``. So
``FILE_COPY_METHOD=auto`` (the default) decides by evidence, per tablespace staging
uses:

- where the tablespace's folder is reachable from this machine and belongs to this
  very server (its ``postmaster.pid`` names the server's start time), a FICLONE
  ioctl on two scratch files in the tablespace's own temporary folder (pgsql_tmp,
  owned by the server's user, removed afterwards);
- otherwise a measured copy of a scratch database, once with each method: clone is
  taken when it is at most half the time of copy.

The answer is remembered per server (BACKUP_DIR/.servers/<system id>.json) and said
in every template point's manifest, in ``info`` and in ``check_setup.py``. An
explicit ``copy`` or ``clone`` always wins."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psycopg2
from psycopg2 import sql

from lib.files import make_private_dir, utc_now, write_private_file
from lib.pg.cluster import find_local_cluster, readable_setting
from lib.pg.db import connection, derived_name, drop_database, execute, scalar
from lib.pg.target import Target
from lib.points import intents

log = logging.getLogger(__name__)

FICLONE = getattr(fcntl, "FICLONE", 0x40049409)  # Linux's ioctl number where Python does not name it
SERVERS = ".servers"
PROBE_BYTES = 64 * 1024
MEASURE_MB = 64
CLONE_SHARE = 0.5  # a measured clone at most this share of a copy's time shares blocks


@dataclass
class CopyChoice:
    method: str  # "clone" or "copy": what the server is asked to do
    why: str  # one sentence for people
    evidence: dict  # per tablespace: how it was found

    def as_dict(self) -> dict:
        return asdict(self)


def choose_copy(target: Target) -> CopyChoice:
    settled = _without_evidence(target.settings.file_copy_method, target.facts.major)
    if settled:
        return settled
    remembered = _remembered(_cache(target.settings, target.facts, target.info.server_label()))
    evidence = {}
    for name, location in staging_tablespaces(target):
        known = remembered.get(name)
        if known and known.get("location") == location:
            evidence[name] = known
            continue
        evidence[name] = {"location": location, **_probe(target, name, location)}
    _remember(target, {**remembered, **evidence})
    return _decided(evidence)


def _without_evidence(asked: str, major: int) -> CopyChoice | None:
    if asked in ("copy", "clone"):
        return CopyChoice(asked, f"asked for (FILE_COPY_METHOD={asked})", {})
    if major < 18:
        return CopyChoice("copy", f"PostgreSQL {major} copies files one way only (clone needs 18)", {})
    return None


def _decided(evidence: dict) -> CopyChoice:
    slow = sorted(name for name, found in evidence.items() if not found["shares_blocks"])
    if slow:
        return CopyChoice("copy", f"the filesystem of {', '.join(slow)} does not share blocks", evidence)
    return CopyChoice("clone", "every tablespace staging uses is on a filesystem that shares blocks", evidence)


def known_choice(settings, facts, server_label: str) -> CopyChoice | None:
    """What the next template point will do, from the setting and what was remembered,
    without probing anything (check_setup.py changes nothing); None when not decided yet."""
    settled = _without_evidence(settings.file_copy_method, facts.major)
    if settled:
        return settled
    remembered = _remembered(_cache(settings, facts, server_label))
    if not facts.tablespaces or any(name not in remembered for name in facts.tablespaces):
        return None
    return _decided({name: remembered[name] for name in facts.tablespaces})


def staging_tablespaces(target: Target) -> list[tuple[str, str | None]]:
    """(name, folder) of staging's default tablespace and of every tablespace its relations use."""
    datadir = readable_setting(target.maint, "data_directory")
    found = []
    for name in target.facts.tablespaces:
        if name == "pg_default":
            location = f"{datadir}/base" if datadir else None
        else:
            location = scalar(target.maint, "SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = %s", (name,))
        found.append((name, location or None))
    return found


def _probe(target: Target, name: str, location: str | None) -> dict:
    folder = _local_temp_folder(target, location)
    if folder is not None:
        return _ficlone(folder)
    return _measure(target, name)


def _local_temp_folder(target: Target, location: str | None) -> Path | None:
    """The tablespace's pgsql_tmp folder, when its folder is this machine's and this server's."""
    if not location or find_local_cluster(target.maint) is None:  # not here, or another server's folder of that name
        return None
    base = Path(location)
    if base.name != "base":  # a tablespace: its files live in PG_<major>_<catalog version>/
        versions = sorted(base.glob(f"PG_{target.facts.major}_*"))
        if not versions:
            return None
        base = versions[0]
    return base / "pgsql_tmp"


def _ficlone(folder: Path) -> dict:
    """Two scratch files in ``folder``, owned by the folder's owner; does FICLONE share the first's blocks?"""
    owner = folder.parent.stat()
    made_folder = not folder.exists()
    try:
        if made_folder:
            folder.mkdir(mode=0o700)
            os.chown(folder, owner.st_uid, owner.st_gid)
        source, clone = folder / f"rollback-toolkit-probe-{os.getpid()}", folder / f"rollback-toolkit-probe-{os.getpid()}.clone"
        fds = []
        try:
            for path in (source, clone):
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                fds.append(fd)
                os.fchown(fd, owner.st_uid, owner.st_gid)
            os.write(fds[0], os.urandom(PROBE_BYTES))
            os.fsync(fds[0])
            try:
                fcntl.ioctl(fds[1], FICLONE, fds[0])
                shares, detail = True, "FICLONE shared the blocks"
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.EXDEV, errno.ENOTTY, errno.ENOSYS, errno.EPERM):
                    raise
                shares, detail = False, f"FICLONE refused ({errno.errorcode.get(exc.errno, exc.errno)})"
        finally:
            for fd in fds:
                os.close(fd)
            for path in (source, clone):
                path.unlink(missing_ok=True)
    except OSError as exc:
        return {"shares_blocks": False, "how": f"could not probe {folder}: {exc.strerror or exc}", "at": _now()}
    finally:
        if made_folder:
            try:
                folder.rmdir()
            except OSError:
                pass
    return {"shares_blocks": shares, "how": f"{detail} in {folder}", "at": _now()}


def _measure(target: Target, tablespace: str) -> dict:
    """A scratch database of MEASURE_MB in the tablespace, copied once with each method."""
    scratch = derived_name(f"rb_clone_probe_{os.getpid()}", "")
    times = {}
    with intents.new_database(target, scratch, "measurement of clone against copy"):
        try:
            execute(
                target.maint,
                sql.SQL("CREATE DATABASE {} TEMPLATE template0 TABLESPACE {}").format(
                    sql.Identifier(scratch), sql.Identifier(tablespace)
                ),
            )
            with connection(target.info, scratch, application_name="rollback-toolkit clone") as conn:
                execute(
                    conn,
                    "CREATE TABLE filler AS SELECT g, repeat(md5(g::text), 30) AS pad FROM generate_series(1, %s) g",
                    (MEASURE_MB * 1024 * 1024 // 1000,),
                )
            for method in ("copy", "clone", "copy", "clone"):
                copy = f"{scratch}_{method}"
                execute(target.maint, "SET file_copy_method = %s", (method,))
                started = time.monotonic()
                execute(
                    target.maint,
                    sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                        sql.Identifier(copy), sql.Identifier(scratch)
                    ),
                )
                times[method] = min(times.get(method, 1e9), time.monotonic() - started)
                drop_database(target.maint, copy)
        except psycopg2.Error as exc:
            return {"shares_blocks": False, "how": f"could not measure: {str(exc).strip().splitlines()[0]}", "at": _now()}
        finally:
            execute(target.maint, "RESET file_copy_method")
            drop_database(target.maint, scratch)
    shares = times["clone"] <= CLONE_SHARE * times["copy"]
    how = f"measured {MEASURE_MB} MB: clone {times['clone']:.3f} s, copy {times['copy']:.3f} s"
    return {"shares_blocks": shares, "how": how, "at": _now()}


def _now() -> str:
    return utc_now().isoformat(timespec="seconds")


def _cache(settings, facts, server_label: str) -> Path:
    return Path(settings.backup_dir) / SERVERS / f"{facts.system_identifier or server_label}.json"


def _remembered(path: Path) -> dict:
    try:
        return json.loads(path.read_text()).get("tablespaces", {})
    except (OSError, ValueError):
        return {}


def _remember(target: Target, tablespaces: dict) -> None:
    path = _cache(target.settings, target.facts, target.info.server_label())
    try:
        make_private_dir(path.parent)
        write_private_file(
            path, json.dumps({"server": target.info.server_label(), "tablespaces": tablespaces}, indent=2).encode()
        )
    except OSError as exc:
        log.warning("could not remember how %s copies: %s", target.info.server_label(), exc)
