"""A point's ``manifest.json`` as a typed, frozen record, read from every shape the
toolkit has written and written back key for key.

Why key for key: a manifest carries its own checksum (``manifest_sha256``, the
sha256 of its canonical JSON without that key), and points outlive the toolkit that
wrote them. So ``Manifest.from_dict(raw).as_dict() == raw`` for every earlier shape:
keys this toolkit does not know are kept (``extra``), and a record read from JSON
remembers which of its keys the JSON held (``written``), so that an absent key stays
absent and a written ``null`` stays ``null``.

Formats:

- ``format: 1`` is every manifest on disk so far. Every writer since the first has
  set it; no manifest on disk lacks it. Its shape grew within format 1: created_at
  to the millisecond, template points (counted row by row, later a physical
  fingerprint and ``copy``), data points, ``manifest_sha256`` and ``encryption``,
  more database properties, dump points in the directory format, pitr points (their
  backup's ``timeline`` later). tests/fixtures/manifests/README.md lists each shape
  with the commit that first wrote it.
- Dicts without ``format`` are never on disk: the one made for a bare pg_dump archive
  (``kind: file``) and the one that stands for a damaged manifest.
- ``format: 2`` (``FORMAT_VERSION``) is what ``as_dict`` writes for a manifest made
  here rather than read: the same keys as format 1, and a key whose value is None is
  left out instead of written as ``null`` (readers take an absent key as None), but
  for the keys format 1 wrote as ``null`` in every point (``Manifest.NULLABLE``), so
  that `info --json` keeps them.

Sections are typed records (``DatabaseSection``, ``FileEntry``, ``TableEntry``,
``ToolSection``, ``CreatedBy``, ``RestorePointSection``, ``BackupSection``,
``RepositorySection``, ``ClusterSection``). Fields whose content is a structured
record another module produces stay read-only mappings (``types.MappingProxyType``,
lists as tuples, all the way down): ``fingerprint`` (lib/pg/fingerprint.py),
``copy`` (lib/points/clone.py), ``encryption`` (lib/points/crypto.py), ``sequences``
and ``database.properties`` (lib/pg/db.py). ``thawed`` gives any of them back as
plain JSON values, for code that compares them with freshly read dicts.

Method names stay strings here. Build changed copies with ``replaced`` (not
``dataclasses.replace``): it marks the changed keys as written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from datetime import datetime
from enum import Enum, StrEnum
from functools import cache
from types import MappingProxyType
from typing import Any, ClassVar, Self

from lib.errors import CatalogError

FORMAT_VERSION = 2  # what as_dict writes for a manifest made here; every manifest on disk so far is 1
CHECKSUM_KEY = "manifest_sha256"
EPOCH = "1970-01-01T00:00:00+00:00"  # the created_at of a damaged manifest: listed first


class Status(StrEnum):
    COMPLETED = "completed"
    MANIFEST_MISSING = "manifest missing"  # a point folder with files and no manifest.json
    UNREADABLE_MANIFEST = "unreadable manifest"  # manifest.json that is not JSON, or cannot be read


DAMAGED = frozenset({Status.MANIFEST_MISSING, Status.UNREADABLE_MANIFEST})


class Kind(StrEnum):
    """Why a point exists."""

    MANUAL = "manual"  # asked for: create_rollback_point.py, a migration's point, the API
    BEFORE_ROLLBACK = "before_rollback"  # the state a restore replaced, kept so that the restore can be undone
    FILE = "file"  # a bare pg_dump archive given to restore --file; never listed, never on disk


DEFAULT_KIND = Kind.MANUAL  # the kind of a manifest that names none


class VerificationLevel(StrEnum):
    """How deep a point has been verified."""

    PHYSICAL = "physical"  # a database copy, checked by its catalog: no row read
    DEEP = "deep"  # every row read and compared
    REPOSITORY = "repository"  # a pitr point: pgBackRest holds its backup and WAL


# ---------------------------------------------------------------- frozen values


def frozen(value: Any) -> Any:
    """A JSON value made read-only all the way down: objects as MappingProxyType, arrays as tuples."""
    if isinstance(value, _Record):
        return value
    if isinstance(value, Mapping):
        return MappingProxyType({key: frozen(item) for key, item in value.items()})
    if isinstance(value, list | tuple):
        return tuple(frozen(item) for item in value)
    return value


def thawed(value: Any) -> Any:
    """Plain JSON values again (dicts, lists, strings): of a frozen value, a record, an enum."""
    if isinstance(value, _Record):
        return value.as_dict()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {key: thawed(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [thawed(item) for item in value]
    return value


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON, its own digest left out: an edit shows."""
    body = {key: value for key, value in thawed(manifest).items() if key != CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _one_of(names: type[StrEnum]) -> Callable[[Any], Any]:
    """A member of ``names``; a value it does not know (a later toolkit's) is kept as written."""

    def coerce(value: Any) -> Any:
        if value is None or isinstance(value, names):
            return value
        try:
            return names(value)
        except ValueError:
            return value

    return coerce


def _section(record: type[_Record]) -> Callable[[Any], Any]:
    return lambda value: value if value is None or isinstance(value, record) else record.from_dict(value)


def _sections(record: type[_Record]) -> Callable[[Any], Any]:
    def coerce(value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, Mapping) or not isinstance(value, Iterable):
            raise CatalogError(
                f"A manifest's list of {record.__name__} entries is a {type(value).__name__}.",
                "Use another point (`python3 rollback_manager.py list`).",
            )
        return tuple(item if isinstance(item, record) else record.from_dict(item) for item in value)

    return coerce


def _key(name: str, default: Any = None, *, coerce: Callable[[Any], Any] = frozen, factory: Any = None, shown: bool = True):
    """A field written under the JSON key ``name`` and coerced on construction by
    ``coerce``. A field declared without it is written under its own name, frozen."""
    meta = {"coerce": coerce, "key": name}
    if factory is not None:
        return field(default_factory=factory, metadata=meta, repr=shown)
    return field(default=default, metadata=meta, repr=shown)


def _no_extra() -> Mapping[str, Any]:
    return MappingProxyType({})


@cache
def _json_fields(record: type) -> tuple[Field, ...]:
    return tuple(f for f in fields(record) if f.name not in ("extra", "written"))


@cache
def _keys_of(record: type) -> dict[str, str]:
    """attribute name -> JSON key"""
    return {f.name: f.metadata.get("key") or f.name for f in _json_fields(record)}


@dataclass(frozen=True, slots=True)
class _Record:
    """A JSON object as a frozen record: ``extra`` holds the keys this toolkit does not
    know, as read; ``written`` the known keys the JSON held (None for a record made
    here, whose None fields are left out)."""

    extra: Mapping[str, Any] = field(default_factory=_no_extra, kw_only=True, repr=False)
    written: frozenset[str] | None = field(default=None, kw_only=True, repr=False)
    NULLABLE: ClassVar[frozenset[str]] = frozenset()  # keys a record made here writes as null rather than leaving out

    def __post_init__(self) -> None:
        for f in _json_fields(type(self)):
            object.__setattr__(self, f.name, f.metadata.get("coerce", frozen)(getattr(self, f.name)))
        object.__setattr__(self, "extra", frozen(self.extra))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Self:
        if not isinstance(raw, Mapping):
            raise CatalogError(
                f"A manifest's {cls.__name__} must be a JSON object; this one is a {type(raw).__name__}.",
                "Use another point (`python3 rollback_manager.py list`).",
            )
        keys = _keys_of(cls)
        required = [
            keys[f.name]
            for f in _json_fields(cls)
            if keys[f.name] not in raw and f.default is MISSING and f.default_factory is MISSING
        ]
        if required:
            raise CatalogError(
                f"A manifest's {cls.__name__} lacks {', '.join(map(repr, required))}.",
                "Use another point (`python3 rollback_manager.py list`).",
            )
        known = set(keys.values())
        return cls(
            **{name: raw[key] for name, key in keys.items() if key in raw},
            extra={key: value for key, value in raw.items() if key not in known},
            written=frozenset(key for key in raw if key in known),
        )

    def as_dict(self) -> dict[str, Any]:
        """The exact JSON object: what was read, key for key; or, for a record made
        here, every field that is not None."""
        found: dict[str, Any] = {}
        for name, key in _keys_of(type(self)).items():
            value = getattr(self, name)
            wanted = (value is not None or key in self.NULLABLE) if self.written is None else key in self.written
            if wanted:
                found[key] = thawed(value)
        found.update(thawed(self.extra))
        return found

    def replaced(self, **changes: Any) -> Self:
        """A copy with ``changes``; the changed keys are written even where the JSON it
        was read from lacked them."""
        keys = _keys_of(type(self))
        written = None if self.written is None else self.written | {keys[name] for name in changes}
        return replace(self, **changes, written=written)


# ---------------------------------------------------------------- sections


@dataclass(frozen=True, slots=True)
class CreatedBy(_Record):
    """Who took the point (absent from the states a restore kept)."""

    user: str | None = None
    host: str | None = None
    pid: int | None = None


@dataclass(frozen=True, slots=True)
class DatabaseSection(_Record):
    """The database the point is of, and the server it was on. ``properties`` (a
    read-only mapping, lib/pg/db.py's DatabaseProperties) is what pg_dump without
    --create leaves out: owner, encoding, locale, rights, settings; empty for a bare
    archive, which records none."""

    name: str | None = None
    url: str | None = None  # masked: the password is ***
    server: str | None = None  # host:port
    server_version: str | None = None  # as the server says it: "15.18 (Debian 15.18-0+deb12u1)"
    server_major: int | None = None
    system_identifier: str | None = None  # None where the role could not read it
    database_oid: int | None = None
    size_bytes: int | None = None
    properties: Mapping[str, Any] = _key("properties", factory=_no_extra, shown=False)


@dataclass(frozen=True, slots=True)
class FileEntry(_Record):
    """A file of the point, its path relative to the point's folder (a directory-format
    archive's files are under ``database.dir/``)."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class TableEntry(_Record):
    """One table of a data point: its rows, COPY text in a gzip file."""

    schema: str
    name: str
    file: str
    rows: int
    columns: tuple[tuple[str, str, str], ...]  # (name, type, attgenerated) in column order

    @property
    def key(self) -> str:
        """``schema.name`` as the data point's fingerprint names the table (never split it on a dot)."""
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True, slots=True)
class ToolSection(_Record):
    """The pg_dump that wrote a dump point's archive (a bare archive: only its major)."""

    name: str | None = None
    path: str | None = None
    major: int | None = None
    version: str | None = None  # its --version line


@dataclass(frozen=True, slots=True)
class RestorePointSection(_Record):
    """A pitr point's named restore point in the WAL."""

    name: str | None = None
    lsn: str | None = None
    wal: str | None = None  # the segment that holds it
    timeline: int | None = None


@dataclass(frozen=True, slots=True)
class BackupSection(_Record):
    """The pgBackRest backup a pitr point's recovery starts from."""

    label: str | None = None
    kind: str | None = None  # pgBackRest's: full, diff, incr
    start_lsn: str | None = None
    stop_lsn: str | None = None
    start_time: int | None = None
    stop_time: int | None = None
    size: int | None = None
    timeline: int | None = None  # not recorded before pitr points knew timelines: taken on timeline 1


@dataclass(frozen=True, slots=True)
class RepositorySection(_Record):
    stanza: str | None = None
    config: str | None = None  # PGBACKREST_CONFIG, when set


@dataclass(frozen=True, slots=True)
class ClusterSection(_Record):
    """The local cluster a pitr point is of."""

    data_directory: str | None = None
    owner: str | None = None
    major: int | None = None


# ---------------------------------------------------------------- the manifest


@dataclass(frozen=True, slots=True)
class Manifest(_Record):
    """Every field any version of the toolkit has written into a point's manifest.json.
    A field a method does not write is None (``files``: empty; ``kind``: manual)."""

    NULLABLE: ClassVar[frozenset[str]] = frozenset({"description", "migration_id", "table", "encryption"})

    id: str
    format: int | None = None
    status: Status | str | None = _key("status", coerce=_one_of(Status))
    kind: Kind | str | None = _key("kind", DEFAULT_KIND, coerce=_one_of(Kind))
    method: str | None = None  # template, dump, data, pitr
    created_at_text: str | None = _key("created_at")  # ISO 8601 as written (to the second, or the millisecond)
    description: str | None = None
    migration_id: str | None = None
    table: str | None = None  # a table-level data point: its tables, "schema.name, schema.name"
    created_by: CreatedBy | None = _key("created_by", coerce=_section(CreatedBy))
    restored_point: str | None = None  # a state before rollback: the point (or moment) whose restore replaced it
    database: DatabaseSection = _key("database", coerce=_section(DatabaseSection), factory=DatabaseSection)
    files: tuple[FileEntry, ...] = _key("files", (), coerce=_sections(FileEntry))
    fingerprint: Mapping[str, Any] | None = _key("fingerprint", shown=False)  # lib/pg/fingerprint.py's, read-only
    duration_seconds: float | None = None
    # template points (and the states a restore kept by a swap)
    template_database: str | None = None
    sessions_terminated: int | None = None
    copy: Mapping[str, Any] | None = _key("copy", shown=False)  # lib/points/clone.py's CopyChoice: method, why, evidence
    copy_seconds: float | None = None
    # dump points (and a bare archive)
    tool: ToolSection | None = _key("tool", coerce=_section(ToolSection))
    archive: str | None = None  # the archive's name in the point's folder
    archive_format: str | None = None  # custom or directory; absent: custom
    compression: str | None = None
    jobs: int | None = None
    archive_table_count: int | None = None  # a bare archive: its TABLE DATA entries
    # dump and data points
    encryption: Mapping[str, Any] | None = _key("encryption", shown=False)  # lib/points/crypto.py's: format, suffix, tool
    # data points
    tables: tuple[TableEntry, ...] | None = _key("tables", coerce=_sections(TableEntry), shown=False)
    # pitr points
    restore_point: RestorePointSection | None = _key("restore_point", coerce=_section(RestorePointSection))
    backup: BackupSection | None = _key("backup", coerce=_section(BackupSection))
    repository: RepositorySection | None = _key("repository", coerce=_section(RepositorySection))
    cluster: ClusterSection | None = _key("cluster", coerce=_section(ClusterSection))
    sequences: Mapping[str, Any] | None = _key("sequences", shown=False)  # "schema.name" -> (last_value, is_called)
    unlogged_tables: tuple[str, ...] | None = None
    archive_wait_seconds: float | None = None
    manifest_sha256: str | None = None  # absent from manifests written before the toolkit checksummed them

    def __post_init__(self) -> None:
        _Record.__post_init__(self)
        if not isinstance(self.id, str) or not self.id:
            raise CatalogError(f"A manifest's id must be a non-empty string, not {self.id!r}.")

    @classmethod
    def damaged(cls, point_id: str, status: Status) -> Manifest:
        """What stands for a point folder whose manifest is missing or unreadable."""
        if status not in DAMAGED:
            raise ValueError(f"{status!r} is not a damaged manifest's status")
        return cls(
            id=point_id,
            status=Status(status),
            created_at_text=EPOCH,
            written=frozenset({"id", "status", "created_at"}),
        )

    # ---- what readers ask

    @property
    def created_at(self) -> datetime | None:
        return datetime.fromisoformat(self.created_at_text) if self.created_at_text else None

    @property
    def is_completed(self) -> bool:
        return self.status == Status.COMPLETED

    @property
    def is_damaged(self) -> bool:
        return self.status in DAMAGED

    @property
    def is_table_level(self) -> bool:
        """Of some tables, not of staging as a whole."""
        return bool(self.table)

    @property
    def size(self) -> int:
        """Bytes of the point's files; of the database for a point that is a database (template, pitr)."""
        return sum(entry.size for entry in self.files) or int(self.database.size_bytes or 0)

    @property
    def tool_major(self) -> int | None:
        """The major of the pg_dump that wrote the archive: pg_restore of at least that major reads it."""
        return self.tool.major if self.tool else None

    @property
    def encrypted(self) -> bool:
        return bool(self.encryption)

    @property
    def row_counts(self) -> Mapping[str, int] | None:
        """Rows per table as counted when the point was taken; None where they were not
        (a physical fingerprint, a pitr point, a bare archive)."""
        return (self.fingerprint or {}).get("row_counts")

    @property
    def from_a_newer_toolkit(self) -> bool:
        return isinstance(self.format, int) and self.format > FORMAT_VERSION

    # ---- its own checksum

    def digest(self) -> str:
        return manifest_digest(self.as_dict())

    @property
    def edited(self) -> bool:
        """Changed after it was written: its own checksum no longer matches. (A manifest
        written before checksums existed carries none: no edit can be seen.)"""
        return self.manifest_sha256 is not None and self.manifest_sha256 != self.digest()

    def sealed(self) -> Manifest:
        """With its own checksum, as the last step before it is written."""
        return self.replaced(manifest_sha256=self.digest())

    def completed(self, files: Iterable[FileEntry]) -> Manifest:
        """A point's manifest as committed: the current format, its files, completed, sealed."""
        return self.replaced(format=FORMAT_VERSION, files=tuple(files), status=Status.COMPLETED).sealed()


# ---------------------------------------------------------------- .verification.json


@dataclass(frozen=True, slots=True)
class Baseline(_Record):
    """Every row of a template point's database, read once (in the background, or by the
    first restore that needed it) while nobody else could write to it: what its copies'
    rows are compared with. ``unknown`` says why it never can be (its reading was killed
    and the database stood open since), and then it has no rows."""

    row_counts: Mapping[str, int] | None = _key("row_counts", shown=False)
    content: Mapping[str, str] | None = _key("content", shown=False)  # order-independent hash of each table's rows
    read_at: str | None = None
    unknown: str | None = None
    row_hash: str | None = None  # how each row was hashed (lib/pg/rowhash.py); none written: "md5"

    @property
    def known(self) -> bool:
        return self.unknown is None and self.content is not None

    @property
    def hashed_with(self) -> str:
        return self.row_hash or "md5"


@dataclass(frozen=True, slots=True)
class VerificationRecord(_Record):
    """What has been verified since a point was taken (``.verification.json``, beside
    a manifest that is never rewritten), tied to that manifest by its checksum."""

    level: VerificationLevel | str | None = _key("level", coerce=_one_of(VerificationLevel))
    verified_at: str | None = None
    failed: str | None = None  # when the last verification failed, and why (cleared when one passes)
    baseline: Baseline | None = _key("baseline", coerce=_section(Baseline))
    manifest_sha256: str | None = None

    def belongs_to(self, manifest: Manifest) -> bool:
        """About this very manifest. (Between a manifest without a checksum and a record
        without one, as the toolkit wrote for such points, this holds too.)"""
        return self.manifest_sha256 == manifest.manifest_sha256

    @classmethod
    def for_manifest(cls, manifest: Manifest, raw: Mapping[str, Any] | None) -> VerificationRecord:
        """The record read from the file (``raw``, None when there is none) where it is
        about this manifest; otherwise an empty one that is."""
        if raw is not None:
            found = cls.from_dict(raw)
            if found.belongs_to(manifest):
                return found
        return cls(manifest_sha256=manifest.manifest_sha256)
