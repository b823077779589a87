"""Points and rollbacks whose cost does not grow with the rows: how the server copies
(clone where the filesystem shares blocks, by evidence), database copies checked by
what the catalog shows, every row read only in the background or by verify --deep,
and points written before all this still restoring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from contextlib import closing, contextmanager
from datetime import datetime
from pathlib import Path

import pytest
from pyrage import x25519

from lib.config import ConnInfo
from lib.files import sha256_file
from lib.points.manifest import manifest_digest
from lib.sandbox.servers import LocalServer, embedded_bin_dir, make_shared_dir, scratch_parent, server_account
from tests.conftest import ROOT, Server, _prepare
from tests.helpers import deep_state
from tests.test_restore import MIGRATION
from tests.test_template import wait_for_baseline


def _manifest(staging, point_id: str) -> dict:
    return json.loads((staging.backup_dir / point_id / "manifest.json").read_text())


def _rewrite(staging, point_id: str, manifest: dict) -> None:
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (staging.backup_dir / point_id / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


@contextmanager
def _opened(staging, name: str):
    """A sealed point database opened, changed behind the toolkit's back, and sealed again."""
    staging.sql(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
    conn = staging.server.connect(name)
    try:
        with conn.cursor() as cur:
            yield cur
    finally:
        conn.close()
        staging.sql(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')


# ------------------------------------------------------------------ checks in O(relations)


@pytest.mark.parametrize("change", ["truncated", "grew"])
def test_a_point_database_truncated_or_grown_behind_the_toolkits_back_is_caught(staging, change):
    created = staging.run_json("create_rollback_point.py", "checked", "--method", "template")
    with _opened(staging, created["template_database"]) as cur:
        if change == "truncated":
            cur.execute("TRUNCATE measurements_2024")
        else:
            cur.execute("INSERT INTO measurements_2024 SELECT DATE '2024-03-01', 'Hualien', g FROM generate_series(1, 20000) g")
    verified = staging.run("rollback_manager.py", "verify", created["id"])
    assert verified.returncode == 3, verified.stderr
    assert "changed outside the toolkit" in verified.stderr  # its seal was broken, and what changed is named
    assert "public.measurements_2024" in verified.stderr
    assert ("its file was replaced" if change == "truncated" else "bytes recorded") in verified.stderr
    staging.sql("DELETE FROM documents")
    refused = staging.run("rollback_manager.py", "restore", created["id"], "--yes")
    assert refused.returncode == 3 and "--force" in refused.stderr
    forced = staging.run("rollback_manager.py", "restore", created["id"], "--yes", "--force")
    assert forced.returncode == 3 and "public.measurements_2024" in forced.stderr  # the catalog check still holds
    assert staging.sql("SELECT count(*) FROM documents")[0][0] == 0  # untouched


def test_a_kept_state_that_grew_is_caught_before_it_is_restored(staging):
    point_id = staging.create_point("first", "--method", "template")
    staging.sql(MIGRATION)
    before_id = staging.run_json("rollback_manager.py", "restore", point_id, "--yes")["before_point_id"]
    kept = _manifest(staging, before_id)
    assert kept["fingerprint"]["kind"] == "physical"  # kept without reading its rows
    with _opened(staging, kept["template_database"]) as cur:
        cur.execute("INSERT INTO audit_events (what) SELECT 'x' || g FROM generate_series(1, 20000) g")
    refused = staging.run("rollback_manager.py", "restore", before_id, "--yes")
    assert refused.returncode == 3 and "changed outside the toolkit" in refused.stderr
    forced = staging.run("rollback_manager.py", "restore", before_id, "--yes", "--force")
    assert forced.returncode == 3 and "public.audit_events" in forced.stderr


def test_verify_deep_catches_a_changed_row_the_catalog_cannot_show(staging):
    created = staging.run_json("create_rollback_point.py", "deep", "--method", "template")
    baseline = wait_for_baseline(staging, created["id"])
    assert baseline["row_counts"]["public.customers"] == 300
    with _opened(staging, created["template_database"]) as cur:
        cur.execute("UPDATE documents SET body = 'secreT' WHERE body = 'secret'")  # the same size, in place: no file grows
    plain = staging.run("rollback_manager.py", "verify", created["id"])  # the catalog cannot tell; the seal can
    assert plain.returncode == 3 and "sealed again outside the toolkit" in plain.stderr
    deep = staging.run("rollback_manager.py", "verify", created["id"], "--deep")
    assert deep.returncode == 3, deep.stderr
    assert "public.documents: the rows' content differs" in deep.stderr
    listed = {p["id"]: p for p in staging.run_json("rollback_manager.py", "list")}
    assert listed[created["id"]]["verified"] == "verify failed"
    forced = staging.run("quick_rollback.py", "--yes", "--force")  # skipped all the same: its last verification failed
    assert forced.returncode != 0 and f"Skipping point {created['id']}" in forced.stderr


def test_verify_deep_rebuilds_a_dump_point_and_counts_it(staging):
    point_id = staging.create_point("dump", "--method", "dump")
    deep = staging.run_json("rollback_manager.py", "verify", point_id, "--deep")
    assert deep["level"] == "counted" and "rows in" in deep["rebuilt"]
    assert not [d for d in _databases(staging) if d.endswith("_rb_verify")]


def _databases(staging) -> set[str]:
    return {r[0] for r in staging.sql("SELECT datname FROM pg_database")}


# ------------------------------------------------------------------ points written before this change

OLD_SHAPES = Path(__file__).parent / "fixtures" / "manifests"  # one manifest per shape, by the commit that wrote it
GREW = {"database", "properties", "tool", "created_by"}  # objects whose keys grew: shaped key by key too


def _shaped(real: dict, old: dict) -> dict:
    """``old``'s keys with ``real``'s values: a key ``old`` lacks left out, one ``real`` lacks null."""
    return {
        key: _shaped(real[key], example) if key in GREW and isinstance(real.get(key), dict) else real.get(key)
        for key, example in old.items()
    }


def _rewrite_as(staging, point_id: str, shape: str, *, recorded: dict | None = None, **values) -> dict:
    """The point's manifest as the version of the toolkit that wrote fixture ``shape`` wrote
    it: its keys, its format, its precision of created_at, a checksum only where it had one.
    ``recorded``: the fingerprint that version recorded, where it differs from today's."""
    old = json.loads((OLD_SHAPES / shape).read_text())
    real = _manifest(staging, point_id) | values
    manifest = _shaped(real, old) | {"format": old["format"]}
    manifest["fingerprint"] = _shaped(recorded or real["fingerprint"], old["fingerprint"])
    if "." not in old["created_at"]:  # to the second
        manifest["created_at"] = datetime.fromisoformat(real["created_at"]).isoformat(timespec="seconds")
    manifest.pop("manifest_sha256", None)
    if "manifest_sha256" in old:
        _rewrite(staging, point_id, manifest)
    else:
        (staging.backup_dir / point_id / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return old


def _moved(source: Path, folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    source.rename(folder / source.name)


def test_points_written_before_this_change_still_verify_and_restore(staging, tmp_path):
    """Each shape of tests/fixtures/manifests/ a point of these methods has had on disk (pitr
    points: tests/test_pitr.py): a real point, its manifest rewritten in that shape, is
    listed, verifies and restores staging exactly. Five points, each rewritten in turn."""
    keys = _age_keys(tmp_path)
    staging.env["KEEP_BEFORE_STATES"] = "0"  # the state a restore keeps is restored in its old shapes below
    at_point = deep_state(staging.server, staging.name)
    template = staging.create_point("old template", "--method", "template")
    dump = staging.create_point("old dump", "--method", "dump")
    data = staging.create_point("old data", "--method", "data")
    sealed_dump = staging.run_json("create_rollback_point.py", "old sealed dump", "--method", "dump", env=keys)["id"]
    sealed_data = staging.run_json("rollback_manager.py", "backup", "documents", "scratch", env=keys)["id"]
    custom = tmp_path / "custom" / "database.dump"  # dump points before the directory format: one custom-format file
    custom.parent.mkdir()
    info = ConnInfo.parse(staging.url)
    subprocess.run(
        [str(staging.server.bin_dir / "pg_dump"), "-Fc", "-f", str(custom), *info.tool_args()],
        env={k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"PGPASSWORD": info.password},
        check=True,
    )
    custom_file = {"name": custom.name, "size": custom.stat().st_size, "sha256": sha256_file(custom)}

    def holds(point_id: str, shape: str, state: dict, *, change: str | None = "DELETE FROM customers WHERE id > 100", **how):
        """Rewritten in ``shape``, the point is listed and verifies, and restores ``state``
        after ``change`` (None: staging differs already); returns what the restore said."""
        old = _rewrite_as(staging, point_id, shape, **how)
        listed = {p["id"]: p for p in staging.run_json("rollback_manager.py", "list", env=keys)}[point_id]
        assert (listed["status"], listed["method"], listed["kind"]) == ("completed", old["method"], old["kind"]), shape
        assert listed["verified"], shape
        assert staging.run_json("rollback_manager.py", "verify", point_id, env=keys)["verified"] is True, shape
        if change:
            staging.sql(change)
        assert deep_state(staging.server, staging.name) != state, shape
        restored = staging.run_json("rollback_manager.py", "restore", point_id, "--yes", env=keys)
        assert deep_state(staging.server, staging.name) == state, shape
        return restored

    holds(dump, "dump_directory_6e5b673.json", at_point)
    _moved(staging.backup_dir / dump / "database.dir", tmp_path / "directory")
    _moved(custom, staging.backup_dir / dump)
    for shape in ("dump_1bcbadc.json", "dump_7024adc.json"):
        holds(dump, shape, at_point, archive=custom.name, files=[custom_file])
    holds(sealed_dump, "dump_encrypted_b7623de.json", at_point)
    holds(data, "data_07ec2c3.json", at_point)
    holds(sealed_data, "data_table_encrypted_b7623de.json", at_point, change="DELETE FROM documents")
    holds(template, "template_physical_6e5b673.json", at_point)
    holds(template, "template_b7623de.json", at_point, recorded=at_point)  # counted row by row
    staging.sql("DELETE FROM customers WHERE id > 100")
    kept_state = deep_state(staging.server, staging.name)  # the state the next restore keeps
    before = holds(template, "template_75d37f7.json", at_point, change=None, recorded=at_point)["before_point_id"]
    holds(before, "before_rollback_template_6e5b673.json", kept_state, change="DELETE FROM documents")
    holds(before, "before_rollback_template_7024adc.json", kept_state, change="DELETE FROM documents", recorded=kept_state)


def _age_keys(tmp_path: Path) -> dict[str, str]:
    """A new age identity: the environment that encrypts to it and opens with it."""
    identity = x25519.Identity.generate()
    key = tmp_path / "key.txt"
    key.write_text(f"{identity}\n")
    key.chmod(0o600)
    return {"ROLLBACK_ENCRYPT_TO": str(identity.to_public()), "ROLLBACK_DECRYPT_KEY_FILE": str(key)}


# ------------------------------------------------------------------ how the server copies


def _copy_of(staging, point_id: str) -> dict:
    return _manifest(staging, point_id)["copy"]


def _copies_line(staging, **env) -> str:
    checked = staging.run("check_setup.py", "--json", env=env)
    return next(f["detail"] for f in json.loads(checked.stdout) if f["item"] == "database copies")


def test_on_a_filesystem_that_does_not_share_blocks_the_server_copies(pg18, new_staging):
    """The suite's servers live on this machine's ordinary filesystem (ext4 here)."""
    staging = new_staging(pg18)
    assert "not decided yet" in _copies_line(staging)
    point_id = staging.run_json("create_rollback_point.py", "ext4", "--method", "template", env={"FILE_COPY_METHOD": "auto"})[
        "id"
    ]
    copy = _copy_of(staging, point_id)
    assert copy["method"] == "copy"
    assert "FICLONE refused" in copy["evidence"]["pg_default"]["how"]
    line = _copies_line(staging)  # what was found is said by check_setup.py, which probes nothing itself
    assert line.startswith("copy: the filesystem of pg_default does not share blocks") and "FICLONE refused" in line
    assert _copies_line(staging, FILE_COPY_METHOD="clone") == "clone: asked for (FILE_COPY_METHOD=clone)"
    asked = staging.run_json("create_rollback_point.py", "asked", "--method", "template", env={"FILE_COPY_METHOD": "clone"})["id"]
    assert _copy_of(staging, asked) == {"method": "clone", "why": "asked for (FILE_COPY_METHOD=clone)", "evidence": {}}


@contextmanager
def _xfs_server(tmp_path: Path):
    """A PostgreSQL 18 whose data directory is on an XFS filesystem with reflink, on a loop device."""
    home = Path(tempfile.mkdtemp(prefix="xfs-", dir=scratch_parent(server_account())))
    home.chmod(0o755)
    image, mount = home / "fs.img", home / "mnt"
    mount.mkdir()
    subprocess.run(["truncate", "-s", "1G", str(image)], check=True)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    server = None
    try:
        base = mount / "server"
        make_shared_dir(mount)
        server = LocalServer(embedded_bin_dir(), base)
        server.settings.append("wal_level = logical")
        server.start()
        view = Server("18xfs", 18, ConnInfo.parse(server.url()), server, server.bin_dir)
        _prepare(view)
        yield view
    finally:
        if server is not None:
            server.destroy()
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
        subprocess.run(["rm", "-rf", str(home)], capture_output=True)


def _probe_leftovers(server) -> list[str]:
    """Probe files in the server's pgsql_tmp folders, and any file of the data directory owned by root."""
    data = server.local.data_dir
    found = [str(p) for p in data.rglob("rollback-toolkit-probe-*")]
    found += [str(p) for p in data.rglob("*") if p.stat().st_uid == 0]
    return found


@pytest.mark.needs_root("makes an XFS filesystem with reflink on a loop device")
def test_on_xfs_with_reflink_the_server_clones_and_the_probe_leaves_nothing(new_staging, tmp_path):
    with _xfs_server(tmp_path) as server:
        staging = new_staging(server)
        created = staging.run_json("create_rollback_point.py", "xfs", "--method", "template")
        copy = _copy_of(staging, created["id"])
        assert copy["method"] == "clone", copy
        assert "FICLONE shared the blocks" in copy["evidence"]["pg_default"]["how"]
        assert _probe_leftovers(server) == []
        remembered = list((staging.backup_dir / ".servers").glob("*.json"))
        assert len(remembered) == 1 and "pg_default" in remembered[0].read_text()
        info = staging.run("rollback_manager.py", "info", created["id"])
        assert "clone" in info.stdout
        assert _copies_line(staging).startswith("clone: every tablespace staging uses is on a filesystem that shares blocks")
        staging.sql(MIGRATION)
        quick = staging.run_json("quick_rollback.py", "--yes")
        assert quick["verified"].startswith(("rows: ", "pages: "))


def _unreachable(staging, server, *args: str) -> subprocess.CompletedProcess:
    """The script run where the server's data directory cannot be seen: a mount namespace
    of its own with an empty folder mounted over it."""
    empty = Path(tempfile.mkdtemp(prefix="empty-"))
    script = f'mount --bind "{empty}" "{server.local.data_dir}" && exec "{sys.executable}" "$@"'
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *args],
        env=staging.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )


@pytest.mark.needs_root("hides the data directory in a mount namespace; makes an XFS loop filesystem")
def test_without_the_data_directory_a_measured_copy_decides(pg18, new_staging, tmp_path):
    for server, expected in ((pg18, "copy"), (None, "clone")):
        with _xfs_server(tmp_path) if server is None else _nothing(server) as chosen:
            staging = new_staging(chosen)
            made = _unreachable(staging, chosen, "create_rollback_point.py", "hidden", "--method", "template", "--json")
            assert made.returncode == 0, made.stderr
            copy = _copy_of(staging, json.loads(made.stdout)["id"])
            assert copy["method"] == expected, copy
            assert copy["evidence"]["pg_default"]["how"].startswith("measured")
            with closing(chosen.connect()) as conn, conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM pg_database WHERE datname LIKE 'rb_clone_probe%%'")
                assert cur.fetchone()[0] == 0  # the scratch databases are gone


@contextmanager
def _nothing(value):
    yield value
