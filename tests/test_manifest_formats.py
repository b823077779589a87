"""The typed manifest reads every shape a point's manifest.json has had and writes it
back key for key, so that an old point's own checksum still matches. No server needed:
the fixtures are manifests as each version of the toolkit wrote them
(tests/fixtures/manifests/README.md says which)."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lib.errors import CatalogError
from lib.points import catalog
from lib.points.manifest import (
    DAMAGED,
    DEFAULT_KIND,
    FORMAT_VERSION,
    DatabaseSection,
    FileEntry,
    Kind,
    Manifest,
    Status,
    VerificationLevel,
    VerificationRecord,
    manifest_digest,
    thawed,
)

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).parent / "fixtures" / "manifests"
MANIFESTS = sorted(p.name for p in FIXTURES.glob("*.json") if not p.name.startswith("verification_"))


def raw(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


# What each fixture says, read through the typed fields.
EXPECTED = {
    "dump_7024adc.json": dict(
        method="dump",
        kind=Kind.MANUAL,
        created_at=datetime(2026, 11, 21, 10, 15, 30, tzinfo=UTC),
        archive="database.dump",
        tool_major=15,
        encrypted=False,
        checksum=False,
        rows=True,
        size=9_214_377,
        template_database=None,
        files=1,
    ),
    "before_rollback_template_7024adc.json": dict(
        method="template",
        kind=Kind.BEFORE_ROLLBACK,
        restored_point="rb_rel_2_4_0_20261121_101530",
        template_database="rb_before_rollback_staging_20261121_103002",
        created_by=None,
        checksum=False,
        rows=True,
        size=58_327_040,
        files=0,
    ),
    "template_75d37f7.json": dict(
        method="template",
        kind=Kind.MANUAL,
        template_database="rb_nightly_checkpoint_20261121_112000",
        copy=None,
        checksum=False,
        rows=True,
        sessions_terminated=2,
        created_at=datetime(2026, 11, 21, 11, 20, 0, 417_000, tzinfo=UTC),
    ),
    "data_07ec2c3.json": dict(method="data", table=None, tables=4, encrypted=False, checksum=False, rows=True, files=4),
    "file_c3691f8.json": dict(
        method="dump",
        kind=Kind.FILE,
        format=None,
        checksum=False,
        rows=False,
        tool_major=15,
        database_name=None,
        archive="staging_2026-11-20.dump",
        files=0,
        size=0,
    ),
    "dump_encrypted_b7623de.json": dict(
        method="dump",
        archive="database.dump.age",
        encrypted=True,
        checksum=True,
        rows=True,
        archive_format=None,
    ),
    "data_table_encrypted_b7623de.json": dict(
        method="data",
        table="public.orders, public.order_items",
        tables=2,
        encrypted=True,
        checksum=True,
        rows=True,
    ),
    "template_b7623de.json": dict(method="template", copy=None, checksum=True, rows=True),
    "dump_1bcbadc.json": dict(method="dump", encrypted=False, checksum=True, rows=True, tablespace="pg_default"),
    "dump_directory_6e5b673.json": dict(
        method="dump",
        archive="database.dir",
        archive_format="directory",
        jobs=4,
        checksum=True,
        rows=True,
        files=8,
    ),
    "template_physical_6e5b673.json": dict(method="template", copy="copy", checksum=True, rows=False, physical=True),
    "before_rollback_template_6e5b673.json": dict(
        method="template",
        kind=Kind.BEFORE_ROLLBACK,
        restored_point="rb_mig_0042_20261122_023000",
        created_by=None,
        checksum=True,
        rows=False,
        physical=True,
    ),
    "pitr_4d2ee05.json": dict(
        method="pitr",
        kind=Kind.MANUAL,
        backup_timeline=None,
        restore_timeline=1,
        checksum=True,
        rows=False,
        files=0,
        size=2_147_483_648,
    ),
    "pitr_before_rollback_85cecde.json": dict(
        method="pitr",
        kind=Kind.BEFORE_ROLLBACK,
        restored_point="rb_rel_2_8_0_20261122_031500",
        created_by=None,
        backup_timeline=None,
        checksum=True,
        rows=False,
    ),
    "pitr_fc41c94.json": dict(method="pitr", backup_timeline=2, restore_timeline=2, checksum=True, rows=False),
}


def test_every_fixture_is_described_and_expected():
    listed = (FIXTURES / "README.md").read_text()
    assert set(EXPECTED) == set(MANIFESTS)
    for name in [*MANIFESTS, "verification_6e5b673.json"]:
        assert f"`{name}`" in listed, name


@pytest.mark.parametrize("name", MANIFESTS)
def test_each_earlier_shape_is_written_back_key_for_key(name):
    written = raw(name)
    manifest = Manifest.from_dict(written)
    assert manifest.as_dict() == written
    assert json.dumps(manifest.as_dict(), sort_keys=True) == json.dumps(written, sort_keys=True)
    assert Manifest.from_dict(manifest.as_dict()) == manifest


@pytest.mark.parametrize("name", MANIFESTS)
def test_an_old_points_own_checksum_still_matches(name):
    written = raw(name)
    manifest = Manifest.from_dict(written)
    assert manifest.digest() == manifest_digest(written)
    assert not manifest.edited
    if EXPECTED[name]["checksum"]:
        assert manifest.manifest_sha256 == written["manifest_sha256"] == manifest_digest(manifest.as_dict())
        assert catalog.check_files(catalog.Point(FIXTURES / "nowhere", manifest)) == [
            f"{FIXTURES / 'nowhere' / entry.name} is missing" for entry in manifest.files
        ]  # the manifest passes; only its files are absent here
    else:
        assert manifest.manifest_sha256 is None and "manifest_sha256" not in manifest.as_dict()


@pytest.mark.parametrize("name", MANIFESTS)
def test_typed_fields_say_what_the_json_says(name):
    written, want = raw(name), EXPECTED[name]
    m = Manifest.from_dict(written)
    assert m.id == written["id"]
    assert m.status is Status.COMPLETED and m.is_completed and not m.is_damaged
    assert m.format == want.get("format", 1)
    assert m.method == want["method"]
    assert m.kind is want.get("kind", Kind.MANUAL)
    assert m.created_at == want.get("created_at", datetime.fromisoformat(written["created_at"]))
    assert m.created_at.tzinfo is not None
    assert m.database.name == want.get("database_name", "staging")
    assert m.database == DatabaseSection.from_dict(written["database"])
    assert m.description == written["description"]
    assert m.migration_id == written.get("migration_id")
    assert m.table == want.get("table") and m.is_table_level == bool(want.get("table"))
    assert m.restored_point == want.get("restored_point")
    assert m.template_database == want.get("template_database", written.get("template_database"))
    assert m.archive == want.get("archive", written.get("archive"))
    assert m.archive_format == want.get("archive_format", written.get("archive_format"))
    assert m.jobs == written.get("jobs")
    assert m.tool_major == want.get("tool_major", 15 if m.method == "dump" else None)
    assert m.encrypted == want.get("encrypted", False)
    assert (m.row_counts is not None) == want["rows"]
    assert [f.name for f in m.files] == [f["name"] for f in written["files"]]
    if "files" in want:
        assert len(m.files) == want["files"]
    if "size" in want:
        assert m.size == want["size"]
    if "created_by" in want:
        assert m.created_by is None and "created_by" not in written
    elif m.kind is not Kind.FILE:
        assert (m.created_by.user, m.created_by.pid) == ("deploy", 48213)
    if "sessions_terminated" in want:
        assert m.sessions_terminated == want["sessions_terminated"]
    if "copy" in want:
        assert (m.copy or {}).get("method") == want["copy"]
    if want.get("physical"):
        assert m.fingerprint["kind"] == "physical" and m.fingerprint["relations"]["public.orders"][1] == 1_531_904
    if "tablespace" in want:
        assert m.database.properties["tablespace"] == want["tablespace"]
    if "tables" in want:
        assert len(m.tables) == want["tables"]
        first = m.tables[0]
        assert first.key == f"{first.schema}.{first.name}" and m.row_counts[first.key] == first.rows
        assert first.columns[0] == tuple(written["tables"][0]["columns"][0])
    else:
        assert m.tables is None
    if m.method == "pitr":
        assert m.backup.label == written["backup"]["label"] and m.backup.timeline == want["backup_timeline"]
        assert m.restore_point.name == m.id and m.restore_point.wal == written["restore_point"]["wal"]
        assert m.restore_point.timeline == want.get("restore_timeline", m.restore_point.timeline)
        assert m.repository.stanza == "staging" and m.cluster.major == 15
        assert m.unlogged_tables == ("public.session_cache",)
        assert m.sequences == m.fingerprint["sequences"] and m.fingerprint["kind"] == "pitr"


def test_keys_a_later_toolkit_adds_are_kept_and_the_checksum_with_them():
    written = raw("dump_directory_6e5b673.json")
    written["retention"] = {"keep_until": "2027-01-01", "reasons": ["legal hold"]}
    written["database"]["collation_version"] = "2.36"
    written["database"]["properties"]["locale"] = "en_US.UTF-8"
    written["files"][0]["blake3"] = "af1349b9f5f9a1a6a0404dea36dcc949"
    written["tool"]["build"] = "Debian"
    written["manifest_sha256"] = manifest_digest(written)
    m = Manifest.from_dict(written)
    assert m.extra["retention"]["reasons"] == ("legal hold",)
    assert m.database.extra["collation_version"] == "2.36"
    assert m.files[0].extra["blake3"].startswith("af13")
    assert m.as_dict() == written
    assert m.digest() == written["manifest_sha256"] and not m.edited


def test_an_edited_manifest_shows():
    written = raw("template_b7623de.json")
    written["template_database"] = "someone_elses_database"
    m = Manifest.from_dict(written)
    assert m.edited
    assert catalog.check_files(catalog.Point(FIXTURES / "nowhere", m))[0].endswith(
        "was edited after the point was taken (its own checksum does not match)"
    )


def test_frozen_all_the_way_down():
    m = Manifest.from_dict(raw("data_07ec2c3.json"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.kind = Kind.BEFORE_ROLLBACK
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.database.name = "production"
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.files[0].size = 0
    with pytest.raises(TypeError):
        m.fingerprint["row_counts"]["public.orders"] = 0
    with pytest.raises(TypeError):
        m.database.properties["acl"][0]["grantee"] = "everyone"
    with pytest.raises(TypeError):
        m.extra["new"] = 1
    assert isinstance(m.files, tuple) and isinstance(m.tables[0].columns, tuple)


def test_built_from_plain_dicts_the_manifest_is_frozen_too():
    fingerprint = {"row_counts": {"public.t": 1}}
    m = Manifest(id="rb_x_20261202_120000", fingerprint=fingerprint, database=DatabaseSection(properties={"acl": []}))
    fingerprint["row_counts"]["public.t"] = 2
    assert m.row_counts["public.t"] == 1
    with pytest.raises(TypeError):
        m.database.properties["acl"] = ["x"]


def test_frozen_values_thaw_into_what_the_json_held():
    written = raw("template_physical_6e5b673.json")
    m = Manifest.from_dict(written)
    assert thawed(m.fingerprint) == written["fingerprint"]
    assert type(thawed(m.fingerprint)["relations"]["public.orders"]) is list
    assert thawed(m.database.properties) == written["database"]["properties"]


def test_a_manifest_that_names_no_kind_is_manual_and_stays_without_one():
    written = raw("dump_1bcbadc.json")
    del written["kind"]
    m = Manifest.from_dict(written)
    assert m.kind is DEFAULT_KIND is Kind.MANUAL
    assert "kind" not in m.as_dict() and m.as_dict() == written


def test_a_kind_or_status_this_toolkit_does_not_know_is_kept_as_written():
    written = raw("template_b7623de.json") | {"kind": "scheduled", "status": "archived"}
    m = Manifest.from_dict(written)
    assert m.kind == "scheduled" and not isinstance(m.kind, Kind)
    assert m.status == "archived" and not m.is_completed and not m.is_damaged
    assert m.as_dict() == written


@pytest.mark.parametrize("status", [Status.MANIFEST_MISSING, Status.UNREADABLE_MANIFEST])
def test_a_damaged_manifest_stands_for_its_folder_as_the_catalog_lists_it(status):
    m = Manifest.damaged("rb_lost_20261121_120000", status)
    assert m.as_dict() == {"id": "rb_lost_20261121_120000", "status": str(status), "created_at": "1970-01-01T00:00:00+00:00"}
    assert m.is_damaged and not m.is_completed and m.status in DAMAGED
    assert m.created_at == datetime(1970, 1, 1, tzinfo=UTC)
    assert m.kind is Kind.MANUAL and m.method is None and m.files == () and m.size == 0 and m.database.name is None
    assert Manifest.from_dict(m.as_dict()).is_damaged


def test_only_a_damaged_status_makes_a_damaged_manifest():
    with pytest.raises(ValueError):
        Manifest.damaged("rb_x_20261121_120000", Status.COMPLETED)


@pytest.mark.parametrize("bad", [[], "manifest", {"status": "completed"}, {"id": ""}, {"id": 7}])
def test_what_is_no_manifest_is_refused(bad):
    with pytest.raises(CatalogError):
        Manifest.from_dict(bad)


def test_a_file_entry_without_its_checksum_is_refused():
    written = raw("dump_7024adc.json")
    del written["files"][0]["sha256"]
    with pytest.raises(CatalogError, match="sha256"):
        Manifest.from_dict(written)


def test_format_2_leaves_out_what_is_none_but_the_keys_every_point_wrote_and_reads_back():
    m = Manifest(
        id="rb_rel_3_0_0_20261202_120000",
        method="template",
        created_at_text="2026-12-02T12:00:00.250+00:00",
        description="before release 3.0.0",
        migration_id=None,
        template_database="rb_rel_3_0_0_20261202_120000",
        database=DatabaseSection(name="staging", server_major=18, properties={"owner": "app"}),
        fingerprint={"kind": "physical", "relations": {"public.t": [16390, 8192]}},
    ).completed([])
    written = m.as_dict()
    assert written["format"] == FORMAT_VERSION == 2
    assert written["kind"] == "manual" and written["status"] == "completed" and written["files"] == []
    nulls = {key for key, value in written.items() if value is None}
    assert nulls == {"migration_id", "table", "encryption"} == Manifest.NULLABLE - {"description"}  # as format 1 wrote them
    assert "backup" not in written and "restore_point" not in written and "copy" not in written
    assert written["fingerprint"]["relations"]["public.t"] == [16390, 8192]
    assert written["manifest_sha256"] == manifest_digest(written)
    again = Manifest.from_dict(json.loads(json.dumps(written)))
    assert again.as_dict() == written and not again.edited and not again.from_a_newer_toolkit
    assert again.template_database == m.template_database and again.created_at.microsecond == 250_000


def test_completing_lists_the_files_and_seals():
    files = [FileEntry(name="database.dump", size=10, sha256="ab" * 32)]
    m = Manifest(id="rb_a_20261202_120000", method="dump", archive="database.dump").completed(files)
    assert m.is_completed and m.files == tuple(files) and m.size == 10 and m.format == FORMAT_VERSION
    assert m.manifest_sha256 == manifest_digest(m.as_dict())


def test_a_manifest_from_a_later_format_is_read_and_says_so():
    written = raw("pitr_fc41c94.json") | {"format": 3}
    m = Manifest.from_dict(written)
    assert m.from_a_newer_toolkit and m.as_dict() == written


def test_replaced_writes_the_changed_keys_and_keeps_the_rest():
    """A bare archive is restored with staging's own name and properties (restore --file)."""
    written = raw("file_c3691f8.json")
    m = Manifest.from_dict(written)
    here = m.replaced(database=m.database.replaced(name="staging", properties={"owner": "app"}))
    assert here.as_dict() == written | {"database": {"name": "staging", "properties": {"owner": "app"}}}
    assert m.as_dict() == written  # the original is unchanged
    late = Manifest.from_dict(raw("dump_7024adc.json")).replaced(encryption=None)
    assert late.as_dict()["encryption"] is None  # a key the JSON lacked, written once it is set


def test_the_verification_record_round_trips_and_belongs_to_its_manifest():
    written = raw("verification_6e5b673.json")
    record = VerificationRecord.from_dict(written)
    assert record.as_dict() == written
    assert record.level is VerificationLevel.DEEP and record.verified_at == "2026-11-22T09:12:03+00:00"
    assert record.baseline.row_counts["public.orders"] == 20000 and record.baseline.read_at.startswith("2026-11-22")
    assert record.baseline.content["<large objects>"].startswith("2:")
    point = Manifest.from_dict(raw("template_physical_6e5b673.json"))
    other = Manifest.from_dict(raw("before_rollback_template_6e5b673.json"))
    assert record.belongs_to(point) and not record.belongs_to(other)
    assert VerificationRecord.for_manifest(point, written) == record
    fresh = VerificationRecord.for_manifest(other, written)
    assert fresh.baseline is None and fresh.level is None and fresh.belongs_to(other)
    assert fresh.as_dict() == {"manifest_sha256": other.manifest_sha256}


def test_a_verification_record_grows_key_by_key():
    point = Manifest.from_dict(raw("template_physical_6e5b673.json"))
    baseline_only = {"baseline": {"row_counts": {}, "content": {}, "read_at": "x"}, "manifest_sha256": point.manifest_sha256}
    record = VerificationRecord.for_manifest(point, baseline_only)
    assert record.as_dict() == baseline_only
    deeper = record.replaced(level=VerificationLevel.DEEP, verified_at="2026-12-02T12:00:00+00:00")
    assert deeper.as_dict() == baseline_only | {"level": "deep", "verified_at": "2026-12-02T12:00:00+00:00"}


def test_points_written_before_checksums_and_their_records_belong_together():
    """Such points' records were written with manifest_sha256 null, as the catalog does."""
    point = Manifest.from_dict(raw("template_75d37f7.json"))
    record = VerificationRecord.from_dict({"level": "deep", "verified_at": "2026-11-21T12:00:00+00:00", "manifest_sha256": None})
    assert record.belongs_to(point)
    assert not record.belongs_to(Manifest.from_dict(raw("template_b7623de.json")))
