"""A damaged point is refused with exit code 3 before anything is touched, for a dump
point and a data point, whatever the damage."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.faults.conftest import databases, leftovers
from tests.helpers import deep_state


def _payload(s, point_id: str):
    manifest = json.loads((s.backup_dir / point_id / "manifest.json").read_text())
    return s.backup_dir / point_id / manifest["files"][0]["name"]


def truncate(s, point_id):
    path = _payload(s, point_id)
    path.write_bytes(path.read_bytes()[:-100])


def flip(s, point_id):
    """Same length, one byte changed in the middle."""
    path = _payload(s, point_id)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def append(s, point_id):
    path = _payload(s, point_id)
    path.write_bytes(path.read_bytes() + b"\n-- appended\n")


def edit_manifest(s, point_id):
    path = s.backup_dir / point_id / "manifest.json"
    manifest = json.loads(path.read_text())
    table = next(iter(manifest["fingerprint"]["row_counts"]))
    manifest["fingerprint"]["row_counts"][table] += 1
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))


def delete_manifest(s, point_id):
    (s.backup_dir / point_id / "manifest.json").unlink()


def remove_file(s, point_id):
    _payload(s, point_id).unlink()


def add_file(s, point_id):
    (s.backup_dir / point_id / "table_9999.copy.gz").write_bytes(b"not part of the point")


def unreadable(s, point_id):
    """A directory where the file should be: no user, root included, can read it as a file."""
    path = _payload(s, point_id)
    path.unlink()
    path.mkdir()


DAMAGE = [truncate, flip, append, edit_manifest, delete_manifest, remove_file, add_file, unreadable]


@pytest.mark.parametrize("method", ["dump", "data"])
@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_a_damaged_point_is_refused_before_anything_is_touched(fault_staging, method, damage):
    """Fault: the point's files or manifest changed after it was taken. Injected: the
    damage named, on disk. Holds: verify and restore exit 3 naming what is wrong, staging
    unchanged, no half-built database, and no 'state before' point made."""
    s = fault_staging
    point_id = s.create_point("to be damaged", "--method", method)
    s.sql("DELETE FROM documents")
    before = deep_state(s.server, s.name)
    damage(s, point_id)
    verify = s.run("rollback_manager.py", "verify", point_id)
    assert verify.returncode == 3, verify.stderr
    restore = s.run("rollback_manager.py", "restore", point_id, "--yes")
    assert restore.returncode == 3, restore.stderr
    assert point_id in restore.stderr and "Nothing was changed" in restore.stderr
    assert deep_state(s.server, s.name) == before
    assert leftovers(s) == []
    assert not any(d.startswith(("rb_before_rollback", "rb_state_before")) for d in databases(s))
    assert sorted(p.name for p in s.backup_dir.iterdir() if not p.name.startswith(".")) == [point_id]


def test_an_encrypted_point_with_a_flipped_byte_is_refused(fault_staging, tmp_path, age_keys):
    """Fault: a byte of an encrypted archive changed. Injected: same-length flip. Holds:
    exit 3 by the checksum, before any decryption or change."""
    s = fault_staging
    s.env.update(age_keys)
    point_id = s.create_point("encrypted", "--encrypt")
    before = deep_state(s.server, s.name)
    flip(s, point_id)
    restore = s.run("rollback_manager.py", "restore", point_id, "--yes")
    assert restore.returncode == 3, restore.stderr
    assert deep_state(s.server, s.name) == before and leftovers(s) == []


def test_copying_a_point_elsewhere_keeps_it_checkable(fault_staging, tmp_path):
    """Not a fault: a point folder copied with its manifest still verifies (the manifest's
    own checksum covers content, not the folder's place)."""
    s = fault_staging
    point_id = s.create_point("copied")
    shutil.copytree(s.backup_dir / point_id, tmp_path / "elsewhere" / point_id)
    result = s.run("rollback_manager.py", "verify", point_id, "--backup-dir", str(tmp_path / "elsewhere"))
    assert result.returncode == 0, result.stderr
