"""The server's disk fills up while it copies staging: for a template point, and for
the spare copy prepared in the background. Staging lives in a tablespace on a small
loop filesystem, so that pg_wal does not fill and the server keeps running."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from lib.sandbox.servers import scratch_parent, server_account
from tests.faults.conftest import points
from tests.helpers import wait_for

MEGABYTES = 48


@contextmanager
def small_tablespace(server, megabytes: int) -> Iterator[str]:
    """A tablespace on a loop filesystem of ``megabytes``, owned by the server's user."""
    home = Path(tempfile.mkdtemp(prefix="small-ts-", dir=scratch_parent(server_account())))
    home.chmod(0o755)
    image, mount = home / "fs.img", home / "mnt"
    mount.mkdir()
    subprocess.run(["truncate", "-s", f"{megabytes}M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-m", "0", str(image)], check=True)
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mount)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.fail(f"root could not mount a loop filesystem: {mounted.stderr.strip()}")
    name = f"small_{home.name[-8:].lower()}"
    try:
        location = mount / "ts"
        location.mkdir()
        account = server_account()
        if account is not None:
            subprocess.run(["chown", f"{account.pw_uid}:{account.pw_gid}", str(location)], check=True)
        with closing(server.connect()) as conn, conn.cursor() as cur:
            cur.execute(f"CREATE TABLESPACE {name} LOCATION '{location}'")
        yield name
    finally:
        with closing(server.connect()) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT datname FROM pg_database d JOIN pg_tablespace t ON t.oid = d.dattablespace WHERE t.spcname = %s", (name,)
            )
            for (db,) in cur.fetchall():
                cur.execute(f'ALTER DATABASE "{db}" WITH ALLOW_CONNECTIONS true')
                cur.execute(f'DROP DATABASE "{db}" WITH (FORCE)')
            cur.execute(f"DROP TABLESPACE IF EXISTS {name}")
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
        subprocess.run(["rm", "-rf", str(home)], capture_output=True)


def _databases_in(server, tablespace: str) -> set[str]:
    with closing(server.connect()) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT datname FROM pg_database d JOIN pg_tablespace t ON t.oid = d.dattablespace WHERE t.spcname = %s",
            (tablespace,),
        )
        return {r[0] for r in cur.fetchall()}


def _wait_for_log(folder: Path, prefix: str, words: str, timeout: float = 120) -> str:
    def saying() -> str | None:
        texts = (log.read_text(errors="replace") for log in folder.glob(f"{prefix}_*.log"))
        return next((text for text in texts if words in text), None)

    return wait_for(saying, timeout=timeout, what=f"a {prefix} log saying {words!r}", every=0.2)


@pytest.mark.needs_root("mounts a small loop filesystem for a tablespace")
@pytest.mark.german
def test_the_servers_disk_fills_during_a_template_point_and_its_spare(server, new_staging, tmp_path):
    """Fault: the server's disk fills while it copies staging. Injected: staging in a
    tablespace on a 48 MB loop filesystem, large enough for one copy: the first point's
    copy fits and its background spare does not; a second point's copy does not either.
    Holds: the point that fit lists and verifies; the failed one exits 1 saying the
    server ran out of disk space (decided by SQLSTATE 53100, also in German); after
    cleanup no database is left in the tablespace but staging and the listed point's."""
    with small_tablespace(server, MEGABYTES) as tablespace:
        s = new_staging(server, "full")
        with closing(server.connect()) as conn, conn.cursor() as cur:
            cur.execute(f'ALTER DATABASE "{s.name}" SET TABLESPACE {tablespace}')
        s.sql("CREATE TABLE bulk AS SELECT g, repeat(md5(g::text), 12) AS pad FROM generate_series(1, 22000) g")
        size = s.sql("SELECT pg_database_size(current_database())")[0][0]
        assert MEGABYTES * 2**20 / 3 < size < MEGABYTES * 2**20 / 2, size  # room for one copy, not two

        first = s.run("create_rollback_point.py", "fits", "--method", "template", "--json", env={"ROLLBACK_SPARE": "1"})
        assert first.returncode == 0, first.stderr
        spare_log = _wait_for_log(s.log_dir, "background", "could not prepare a spare copy")
        assert "ran out of disk space" in spare_log

        second = s.run("create_rollback_point.py", "does not fit", "--method", "template")
        assert second.returncode == 1, second.stderr
        assert "ran out of disk space" in second.stderr and "Traceback" not in second.stderr
        listed = points(s)
        assert len(listed) == 1
        assert s.run("rollback_manager.py", "verify", listed[0]).returncode == 0

        dry = s.run("rollback_manager.py", "cleanup", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        done = s.run("rollback_manager.py", "cleanup")
        assert done.returncode == 0, done.stderr
        copy = s.run_json("rollback_manager.py", "info", listed[0])["template_database"]
        assert _databases_in(server, tablespace) == {s.name, copy}
        assert not list((s.backup_dir / ".intents").glob("*.json"))
