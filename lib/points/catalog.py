"""Rollback points on disk: ids, atomic creation, manifests, checksums, listing.

A point is ``<backup dir>/<id>/`` with its files and ``manifest.json``. It is
built in ``.tmp-<id>/`` (hidden from listings), every file fsynced, the manifest
written last, then the folder renamed into place: a failed or killed creation
leaves only a hidden temporary folder, removed the next time the catalog opens.
A point being removed is renamed to ``.tmp-deleting-<id>/`` first (unlisted at
once); that folder is never a creation's, and only the removal that holds the
point's lock (lib/points/retention.py) drops its databases and then removes it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from lib.errors import CatalogError, ConfigError, VerificationError
from lib.files import fsync_path, make_private_dir, sha256_file, slugify, utc_now, write_private_file
from lib.points.manifest import FileEntry, Kind, Manifest, Status, VerificationRecord
from lib.process import pid_alive

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
PENDING = ".pending.json"
DELETING = f"{TMP_PREFIX}deleting-"  # an unlisted point, its databases and folder not yet removed
INTENTS = ".intents"  # one file per database the toolkit is about to create, written before it exists
CATALOG_ID = ".catalog-id"  # ties the databases this catalog creates to it (their comment names it)
VERIFICATION = ".verification.json"  # beside a manifest: what has been verified since, and the rows read in the background


@dataclass
class Point:
    path: Path
    manifest: Manifest

    @property
    def id(self) -> str:
        return self.manifest.id

    @property
    def method(self) -> str:
        return "?" if self.manifest.method is None else self.manifest.method

    @property
    def created_at(self) -> datetime | None:
        return self.manifest.created_at

    @property
    def database_name(self) -> str:
        return "?" if self.manifest.database.name is None else self.manifest.database.name

    @property
    def size(self) -> int:
        return self.manifest.size

    def file_path(self, name: str) -> Path:
        return self.path / name

    @property
    def verification(self) -> VerificationRecord:
        """What was verified since the point was taken, and the rows the background read
        of a database copy: a file of its own beside the manifest, which is never
        rewritten. Empty when it is not about this very manifest."""
        try:
            raw = json.loads((self.path / VERIFICATION).read_text())
            return VerificationRecord.for_manifest(self.manifest, raw)
        except (OSError, ValueError, CatalogError):
            return VerificationRecord.for_manifest(self.manifest, None)

    def record_verification(self, **changes) -> VerificationRecord:
        """``changes`` (VerificationRecord's fields: level, verified_at, baseline) over
        what was recorded, written atomically; returns the record written."""
        record = self.verification.replaced(**changes)
        body = {**record.as_dict(), "manifest_sha256": self.manifest.manifest_sha256}  # null for a point without a checksum
        staged = self.path / f"{VERIFICATION}.{os.getpid()}"
        write_private_file(staged, json.dumps(body, indent=2, sort_keys=True, default=str).encode())
        os.rename(staged, self.path / VERIFICATION)
        return record


def read_manifest(folder: Path) -> Manifest:
    """The manifest of a point folder. OSError when it cannot be read (FileNotFoundError:
    there is none); ValueError or CatalogError when it is not a manifest."""
    return Manifest.from_dict(json.loads((folder / MANIFEST).read_text()))


def point_at(folder: Path) -> Point:
    """The point a folder holds, wherever it is (read as ``read_manifest`` reads it)."""
    return Point(folder, read_manifest(folder))


def refuse_a_file_for_a_folder(root: Path) -> None:
    """BACKUP_DIR that is a file (or lies under one) can hold no point: said at once, so that
    "no points yet" never leads anyone to a V2 reset when the setting is wrong."""
    for folder in (root, *root.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(
                    f"The backup folder {root} cannot be a folder: {folder} is a file. No point was looked at or changed.",
                    "Set BACKUP_DIR (or --backup-dir) to the folder where the points are (`python3 check_setup.py` "
                    "shows the setting in use).",
                )
            return


class Catalog:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.stale_ids: list[str] = []  # ids of creations found interrupted, for their databases
        self.pending: list[Path] = []  # folders of interrupted runs that the next run can finish
        refuse_a_file_for_a_folder(self.root)

    def ensure(self) -> Catalog:
        """Create the folder (0700) and prove it writable, before any work starts. What
        interrupted runs left in it is finished by lib/restore/leftovers.py."""
        try:
            make_private_dir(self.root)
            probe = self.root / f".write-test-{os.getpid()}"
            write_private_file(probe, b"ok")
            probe.unlink()
        except OSError as exc:
            raise CatalogError(
                f"The backup folder {self.root} is not usable: {exc.strerror or exc}.",
                "Make it writable for this user, or set BACKUP_DIR (or --backup-dir) to a folder that is.",
            ) from None
        return self

    # ---- the databases this catalog creates ---------------------------------

    @property
    def id(self) -> str:
        """This catalog's id, made on first use; database comments name it."""
        path = self.root / CATALOG_ID
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            make_private_dir(self.root)
            write_private_file(path, uuid.uuid4().hex.encode())
            fsync_path(self.root)
            return path.read_text().strip()

    def intend(self, database: str, *, purpose: str, server: str | None, staging: str, point_id: str | None = None) -> Path:
        """Record, on disk and fsynced, the name of a database before it is created: whatever
        happens next (a full disk refusing a later COMMENT, kill -9, a power cut), cleanup
        finds it by this record."""
        folder = self.root / INTENTS
        make_private_dir(folder)
        record = {
            "database": database,
            "purpose": purpose,
            "server": server,
            "staging": staging,
            "point_id": point_id,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "created_at": utc_now().isoformat(timespec="seconds"),
        }
        path = folder / f"{hashlib.sha256(f'{server}:{database}'.encode()).hexdigest()[:24]}.json"
        write_private_file(path, json.dumps(record).encode())
        fsync_path(folder)
        return path

    def settle(self, intent: Path) -> None:
        """The database is owned now (a listed point's, or staging itself), or gone."""
        intent.unlink(missing_ok=True)

    def intents(self) -> list[tuple[Path, dict]]:
        folder = self.root / INTENTS
        found = []
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                found.append((path, json.loads(path.read_text())))
            except (OSError, ValueError):
                log.warning("unreadable intent record %s", path)
        return found

    def remove_stale_temporaries(self, dry_run: bool = False) -> list[Path]:
        """Folders of creations whose process is gone (a process on another host is taken
        as alive). Returns them. Never an unlisted point's folder: it holds no ``.owner``
        and may hold the ``.pending.json`` of the swap that made it, but finishing it as a
        creation would list it again (as ``deleting-<id>``) while the background drops its
        database; its removal is finished by retention.finish_removal only."""
        found: list[Path] = []
        if not self.root.is_dir():
            return found
        for entry in self.root.iterdir():
            if not entry.name.startswith(TMP_PREFIX) or not entry.is_dir():
                continue
            if entry.name.startswith(DELETING):
                continue
            owner = entry / ".owner"
            try:
                info = json.loads(owner.read_text())
                alive = info.get("host") != socket.gethostname() or pid_alive(int(info["pid"]))
            except (OSError, ValueError, KeyError):
                alive = False
            if not alive and (entry / PENDING).is_file():
                self.pending.append(entry)  # finished by the next run that can (see restore.recover_pending)
                continue
            if not alive:
                found.append(entry)
                self.stale_ids.append(entry.name[len(TMP_PREFIX) :])
                if not dry_run:
                    log.info("removing %s, left by an interrupted creation", entry)
                    shutil.rmtree(entry, ignore_errors=True)
        return found

    # ---- ids -------------------------------------------------------------

    def reserve(self, label: str, when: datetime | None = None) -> tuple[str, Path]:
        """A new unique id and its private temporary folder (mkdir is the atomic claim)."""
        when = when or utc_now()
        base = f"rb_{slugify(label)}_{when.strftime('%Y%m%d_%H%M%S')}"
        make_private_dir(self.root)
        for n in range(1, 1000):
            point_id = base if n == 1 else f"{base}_{n}"
            if (self.root / point_id).exists():
                continue
            tmp = self.root / f"{TMP_PREFIX}{point_id}"
            try:
                tmp.mkdir(mode=0o700)
            except FileExistsError:
                continue
            tmp.chmod(0o700)
            write_private_file(tmp / ".owner", json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
            if (self.root / point_id).exists():  # lost a race with a finished point
                shutil.rmtree(tmp)
                continue
            return point_id, tmp
        raise CatalogError(f"Could not find a free point id for {base} in {self.root}.")

    @contextmanager
    def writing(self, label: str, when: datetime | None = None) -> Iterator[PointWriter]:
        point_id, tmp = self.reserve(label, when)
        writer = PointWriter(self, point_id, tmp)
        try:
            yield writer
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise CatalogError(
                    f"The backup folder {self.root} ran out of space while point {point_id} was written "
                    f"({exc.strerror}). The unfinished point was removed; older points are untouched.",
                    "Free some space or set BACKUP_DIR to a larger disk; "
                    "`python3 rollback_manager.py cleanup --keep N` removes old points.",
                ) from None
            raise
        except BaseException:
            if not writer.recoverable:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if not writer.committed:
            shutil.rmtree(tmp, ignore_errors=True)

    # ---- reading ---------------------------------------------------------

    def points(self) -> list[Point]:
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                manifest = read_manifest(entry)
            except FileNotFoundError:
                if not any(entry.iterdir()):
                    continue
                log.warning("point folder %s has no manifest", entry)
                manifest = Manifest.damaged(entry.name, Status.MANIFEST_MISSING)
            except (OSError, ValueError, CatalogError) as exc:
                log.warning("unreadable manifest %s: %s", entry / MANIFEST, exc)
                manifest = Manifest.damaged(entry.name, Status.UNREADABLE_MANIFEST)
            found.append(Point(entry, manifest))
        return sorted(found, key=lambda p: (p.manifest.created_at_text or "", p.id))

    def get(self, point_id: str) -> Point:
        point_id = point_id.strip().rstrip("/")
        point_id = Path(point_id).name if "/" in point_id else point_id
        for p in self.points():
            if p.id == point_id:
                return p
        known = [p.id for p in self.points()]
        close = [k for k in known if point_id in k or k.startswith(point_id[:12])]
        hint = "Run `python3 rollback_manager.py list` to see the points"
        if close:
            hint += "; perhaps you meant " + ", ".join(close[:3])
        raise ConfigError(f"Rollback point {point_id} not found in {self.root}.", hint + ".")

    def unlist(self, point: Point) -> Path:
        """The point is no longer listed (its folder renamed aside, atomically); what is
        left of it is removed now or later, by whoever first takes the point's lock
        (lib/points/retention.py, finish_removal)."""
        trash = self.trash(point.id)
        os.rename(point.path, trash)
        fsync_path(self.root)
        return trash

    def trash(self, point_id: str) -> Path:
        return self.root / f"{DELETING}{point_id}"

    def unlisted(self) -> list[str]:
        """Ids of the points unlisted whose removal is not finished (their folders are still there)."""
        if not self.root.is_dir():
            return []
        return sorted(e.name[len(DELETING) :] for e in self.root.iterdir() if e.name.startswith(DELETING) and e.is_dir())

    def remove(self, point: Point) -> None:
        shutil.rmtree(self.unlist(point), ignore_errors=True)


class PointWriter:
    def __init__(self, catalog: Catalog, point_id: str, tmp: Path) -> None:
        self.catalog = catalog
        self.id = point_id
        self.tmp = tmp
        self.committed = False
        self.recoverable = False

    def pending(self, manifest: Manifest) -> None:
        """What the next run needs to finish this point should this one die (its manifest
        but for what ``commit`` adds): from now on a failure leaves the folder for it
        instead of removing it."""
        write_private_file(self.tmp / PENDING, json.dumps(manifest.as_dict(), default=str).encode())
        self.recoverable = True

    def new_file(self, name: str) -> Path:
        """An empty 0600 file for a tool to write into."""
        path = self.tmp / name
        write_private_file(path, b"")
        return path

    def commit(self, manifest: Manifest) -> Point:
        """Checksum and fsync every file (folders of a directory-format archive included,
        the checksums on all cores), write the manifest last (``manifest`` completed: this
        point's id, its files, the current format, sealed), and rename into place."""
        paths = payload_files(self.tmp)
        for path in paths:
            path.chmod(0o600)
        for folder in {p.parent for p in paths} - {self.tmp}:
            folder.chmod(0o700)
        with ThreadPoolExecutor(max_workers=max(1, min(len(paths), os.cpu_count() or 1))) as pool:
            sums = list(pool.map(_sync_and_sum, paths))
        files = [
            FileEntry(name=str(path.relative_to(self.tmp)), size=path.stat().st_size, sha256=digest)
            for path, digest in zip(paths, sums, strict=True)
        ]
        for folder in sorted({p.parent for p in paths} - {self.tmp}, key=lambda f: -len(f.parts)):
            fsync_path(folder)
        manifest = manifest.replaced(id=self.id).completed(files)
        staged = self.tmp / (MANIFEST + ".tmp")
        write_private_file(staged, json.dumps(manifest.as_dict(), indent=2, sort_keys=True).encode())
        os.rename(staged, self.tmp / MANIFEST)
        (self.tmp / ".owner").unlink(missing_ok=True)
        fsync_path(self.tmp)
        final = self.catalog.root / self.id
        os.rename(self.tmp, final)
        fsync_path(self.catalog.root)
        (final / PENDING).unlink(missing_ok=True)  # listed: nothing is pending (only now, or a kill before the rename loses it)
        self.committed = True
        return Point(final, manifest)


def _sync_and_sum(path: Path) -> str:
    fsync_path(path)
    return sha256_file(path)


def payload_files(folder: Path) -> list[Path]:
    """Every file of a point, in folders too; not the manifest, not hidden files."""
    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if relative.parts[0].startswith(".") or relative.parts[0] in (MANIFEST, MANIFEST + ".tmp") or not path.is_file():
            continue
        found.append(path)
    return found


def read_pending(folder: Path) -> Manifest:
    """What ``PointWriter.pending`` recorded in an unfinished point's folder, as the
    manifest it is to become. (Records written before they carried the point's id take
    it from the folder's name.) OSError, ValueError or CatalogError when it cannot be read."""
    raw = json.loads((folder / PENDING).read_text())
    if not isinstance(raw, dict):
        raise CatalogError(f"{folder / PENDING} is not a JSON object.")
    return Manifest.from_dict({"id": folder.name[len(TMP_PREFIX) :], **raw})


def refuse_damaged_manifest(point: Point) -> None:
    if point.manifest.is_damaged:
        raise VerificationError(
            f"Point {point.id} cannot be trusted: its {MANIFEST} is {point.manifest.status.split()[-1]}"
            f" ({point.path / MANIFEST}). Nothing was changed.",
            "Use another point (`python3 rollback_manager.py list`).",
        )


def check_files(point: Point) -> list[str]:
    """The manifest unedited; every file's presence, size and sha256 against it; no file
    that it does not list."""
    problems = []
    if point.manifest.edited:
        problems.append(f"{point.path / MANIFEST} was edited after the point was taken (its own checksum does not match)")
    listed = {entry.name for entry in point.manifest.files}
    if point.path.is_dir() and point.manifest.kind != Kind.FILE:  # a bare archive's folder is anybody's
        for extra in payload_files(point.path):
            if str(extra.relative_to(point.path)) not in listed:
                problems.append(f"{extra} is not part of the point (a file was added)")
    for entry in point.manifest.files:
        path = point.file_path(entry.name)
        if not path.is_file():
            problems.append(f"{path} is {'not a readable file' if path.exists() else 'missing'}")
            continue
        size = path.stat().st_size
        if size != entry.size:
            problems.append(f"{path} is {size} bytes, the manifest says {entry.size} (truncated or replaced)")
            continue
        try:
            digest = sha256_file(path)
        except OSError as exc:
            problems.append(f"{path} cannot be read ({exc.strerror or exc})")
            continue
        if digest != entry.sha256:
            problems.append(f"{path} does not match its sha256 checksum (corrupted)")
    return problems
