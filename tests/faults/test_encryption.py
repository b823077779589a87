"""Encrypted points: age files written as a stream, readable by the age tool, restored
exactly, and failing closed without the right key or without a recipient."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess

import pytest
from pyrage import x25519

from tests.faults.conftest import leftovers, points
from tests.helpers import deep_state


def _files(s, point_id: str) -> list:
    return sorted(p for p in (s.backup_dir / point_id).iterdir() if p.name != "manifest.json")


@pytest.mark.parametrize("method", ["dump", "data"])
def test_an_encrypted_point_round_trip(server, new_staging, age_keys, method):
    """Encrypted dump and data points on PostgreSQL 15 and 18: every payload file is age
    (no plaintext on disk: no archive magic, no gzip header, no row text), verify reads
    it end to end, the restore is exact, and the age tool decrypts the files."""
    s = new_staging(server)
    s.env.update(age_keys)
    s.sql("INSERT INTO documents (owner_name, body) VALUES ('plain', 'a row that must not be on disk in clear')")
    created = s.run_json("create_rollback_point.py", "encrypted", "--method", method)
    point_id = created["id"]
    at_point = deep_state(s.server, s.name)
    manifest = json.loads((s.backup_dir / point_id / "manifest.json").read_text())
    assert manifest["encryption"]["format"] == "age"
    for f in _files(s, point_id):
        data = f.read_bytes()
        assert f.name.endswith(".age") and data.startswith(b"age-encryption.org/v1\n")
        assert b"PGDMP" not in data and b"\x1f\x8b" not in data[:200] and b"must not be on disk" not in data
    assert s.run("rollback_manager.py", "verify", point_id).returncode == 0
    s.sql("DELETE FROM documents")
    result = s.run("rollback_manager.py", "restore", point_id, "--yes")
    assert result.returncode == 0, result.stderr
    assert deep_state(s.server, s.name) == at_point
    if shutil.which("age"):
        first = _files(s, point_id)[0]
        plain = subprocess.run(
            ["age", "-d", "-i", age_keys["ROLLBACK_DECRYPT_KEY_FILE"], str(first)], capture_output=True, check=True
        ).stdout
        assert plain.startswith(b"PGDMP") if method == "dump" else gzip.decompress(plain).count(b"\n") > 0
    else:
        pytest.fail("the age tool is installed by ./setup_and_run.sh test; it is missing")


def test_a_recipients_file_with_several_keys(fault_staging, tmp_path, age_keys):
    """ROLLBACK_ENCRYPT_TO may name a file of recipients: either key opens the point."""
    s = fault_staging
    other = x25519.Identity.generate()
    recipients = tmp_path / "recipients.txt"
    recipients.write_text(f"# the on-call key\n{age_keys['ROLLBACK_ENCRYPT_TO']}\n\n# the backup key\n{other.to_public()}\n")
    other_key = tmp_path / "other.txt"
    other_key.write_text(f"{other}\n")
    other_key.chmod(0o600)
    s.env.update(ROLLBACK_ENCRYPT_TO=str(recipients))
    point_id = s.create_point("two recipients", "--encrypt")
    for key in (age_keys["ROLLBACK_DECRYPT_KEY_FILE"], str(other_key)):
        assert s.run("rollback_manager.py", "verify", point_id, env={"ROLLBACK_DECRYPT_KEY_FILE": key}).returncode == 0


@pytest.mark.parametrize("key", ["missing", "wrong"])
def test_without_the_right_key_nothing_is_touched(fault_staging, age_keys, tmp_path, key):
    """Fault: the key is missing or is another one. Injected: ROLLBACK_DECRYPT_KEY_FILE
    unset, or pointing at a new identity. Holds: verify and restore exit 2 with a clear
    message, staging unchanged, no half-built database, no 'state before' point."""
    s = fault_staging
    s.env.update(age_keys)
    point_id = s.create_point("encrypted", "--encrypt")
    s.sql("DELETE FROM documents")
    before = deep_state(s.server, s.name)
    if key == "missing":
        env = {"ROLLBACK_DECRYPT_KEY_FILE": ""}
        words = "ROLLBACK_DECRYPT_KEY_FILE is not set"
    else:
        wrong = tmp_path / "wrong.txt"
        wrong.write_text(f"{x25519.Identity.generate()}\n")
        env = {"ROLLBACK_DECRYPT_KEY_FILE": str(wrong)}
        words = "does not open point"
    for args in (["verify", point_id], ["restore", point_id, "--yes"]):
        result = s.run("rollback_manager.py", *args, env=env)
        assert result.returncode == 2, result.stderr
        assert words in result.stderr and "nothing was touched" in result.stderr
    assert deep_state(s.server, s.name) == before
    assert points(s) == [point_id] and leftovers(s) == []


def test_encryption_without_a_recipient_writes_nothing(fault_staging):
    """Fault: --encrypt with no recipient. Injected: ROLLBACK_ENCRYPT_TO unset. Holds:
    exit 2 before anything is written: no point, no folder."""
    s = fault_staging
    result = s.run("create_rollback_point.py", "no recipient", "--encrypt")
    assert result.returncode == 2
    assert "ROLLBACK_ENCRYPT_TO names no recipient: nothing was written" in result.stderr
    assert points(s) == [] and leftovers(s) == []


def test_a_template_point_is_not_taken_when_encryption_is_asked(fault_staging, age_keys):
    """A template point is a database copy on the server: with encryption asked for,
    --method template is refused and auto takes an encrypted dump."""
    s = fault_staging
    s.env.update(age_keys)
    refused = s.run("create_rollback_point.py", "x", "--method", "template", "--yes")
    assert refused.returncode == 2 and "cannot encrypt" in refused.stderr
    created = s.run_json("create_rollback_point.py", "auto", "--method", "auto")
    assert created["method"] == "dump"
    assert all(f.name.endswith(".age") for f in _files(s, created["id"]))
