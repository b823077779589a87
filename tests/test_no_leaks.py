"""No database is ever left on the server that no point owns, whatever runs while the
background removes the points retention unlisted.

A restore unlists the states kept before older rollbacks (KEEP_BEFORE_STATES) and
starts ``python -m lib.operations.background remove IDS``; ``list``, ``cleanup`` and
further restores may run before, while and after it works. The remover is stopped at
named places (ROLLBACK_FAULT_PAUSE, lib/faults.py), its environment inherited from the
restore that starts it; everything else runs as the real scripts."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lib.config import load_settings
from lib.operations import background
from lib.points import spare
from lib.points.catalog import Catalog
from lib.points.manifest import Kind
from tests.conftest import ROOT
from tests.helpers import wait_for


def marked_databases(staging) -> dict[str, str]:
    """Every database whose comment says it belongs to a rollback point of this catalog: name -> comment."""
    marker = f"rollback-toolkit catalog {(staging.backup_dir / '.catalog-id').read_text().strip()}"
    rows = staging.sql(
        """
        SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database
         WHERE shobj_description(oid, 'pg_database') LIKE 'rollback point %%'
           AND strpos(shobj_description(oid, 'pg_database'), %s) > 0
        """,
        (marker,),
    )
    return dict(rows)


def assert_every_point_database_is_owned(staging) -> None:
    """Each such database belongs to a listed point (a spare to the newest template point),
    each listed point's database is there, and no removal is left unfinished."""
    points = Catalog(staging.backup_dir).points()
    copies = {p.manifest.template_database: p.id for p in points if p.manifest.template_database}
    templates = [p for p in points if p.method == "template" and p.manifest.kind != Kind.BEFORE_ROLLBACK]
    spares = {spare.spare_name(templates[-1])} if templates else set()
    on_server = marked_databases(staging)
    unowned = {name: comment for name, comment in on_server.items() if name not in copies and name not in spares}
    assert unowned == {}, "databases of rollback points that no listed point owns"
    missing = {point_id: name for name, point_id in copies.items() if name not in on_server}
    assert missing == {}, "listed points whose database is gone"
    assert sorted(p.name for p in staging.backup_dir.iterdir() if p.name.startswith(".tmp-")) == []
    assert not [p.id for p in points if p.id.startswith("deleting-")]


def listed(staging) -> list[str]:
    return [p["id"] for p in staging.run_json("rollback_manager.py", "list")]


def database_exists(staging, name: str) -> bool:
    return bool(staging.sql("SELECT 1 FROM pg_database WHERE datname = %s", (name,)))


def background_log(staging) -> str:
    return "".join(p.read_text() for p in sorted(staging.log_dir.glob("background_*.log")))


def wait_for_baseline(staging, point_id: str) -> None:
    """The background's own reading of a new point's rows is over (it would hold a session on its database)."""
    path = staging.backup_dir / point_id / ".verification.json"
    wait_for(
        lambda: path.is_file() and json.loads(path.read_text()).get("baseline"),
        timeout=60,
        what=f"the background to read the rows of {point_id}",
    )


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Paused:
    """A run stopped at ``place`` until released: the background remover a restore with
    ``env`` starts (it inherits the restore's environment), or a cleanup run with it."""

    def __init__(self, tmp_path: Path, tag: str, place: str) -> None:
        self.place = place
        self.ready, self.resume = tmp_path / f"ready-{tag}", tmp_path / f"resume-{tag}"
        self.env = {
            "ROLLBACK_FAULT_PAUSE": place,
            "ROLLBACK_FAULT_READY": str(self.ready),
            "ROLLBACK_FAULT_RESUME": str(self.resume),
        }

    def stopped(self) -> int:
        """Its pid, once it has reached its pause."""
        # the file exists a moment before its line is written: wait for the whole line
        wait_for(
            lambda: self.ready.exists() and self.ready.read_text().endswith("\n"),
            timeout=60,
            what=f"a run to stop at {self.place}",
            every=0.05,
        )
        return int(self.ready.read_text().split()[0])

    def release(self) -> None:
        self.resume.write_text("go\n")

    def finished(self) -> None:
        pid = self.stopped()
        wait_for(lambda: not running(pid), timeout=120, what=f"the run {pid} to end", every=0.1)


def restore(staging, point_id: str, n: int, env: dict | None = None) -> tuple[str, str]:
    """A restore after a small change; returns the state it kept and what it said."""
    staging.sql(f"DELETE FROM customers WHERE id > {200 - n}")
    done = staging.run(
        "rollback_manager.py", "restore", point_id, "--yes", "--json", env={"KEEP_BEFORE_STATES": "1", **(env or {})}
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["before_point_id"], done.stderr


def cleanup(staging, *args: str) -> str:
    done = staging.run("rollback_manager.py", "cleanup", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def removals(said: str, point_id: str) -> int:
    """How often ``said`` (cleanup's output, the remover's log) tells that point_id was removed."""
    return said.count(f"Removed point {point_id}, unlisted earlier (") + said.count(f"removed {point_id} (")


def test_the_remover_and_the_foreground_never_leave_a_database_without_its_point(staging, tmp_path):
    """Restores retire states while list, cleanup and other restores run before, while
    and after the background remover works; each retired state is removed exactly once."""
    base = staging.run_json("create_rollback_point.py", "base", "--method", "template")["id"]
    first, _ = restore(staging, base, 1)

    # The remover stopped before it takes the point's lock: list and cleanup come first.
    r1 = Paused(tmp_path, "1", "before removal")
    second, said = restore(staging, base, 2, r1.env)
    assert f"Removed {first}" in said
    r1.stopped()
    assert first not in listed(staging) and not [i for i in listed(staging) if i.startswith("deleting-")]
    said = [cleanup(staging)]
    assert f"Removed point {first}, unlisted earlier (database {first} dropped)" in said[0]
    assert not database_exists(staging, first) and first not in listed(staging)
    r1.release()
    r1.finished()
    assert f"{first} already removed by another run" in background_log(staging)
    assert_every_point_database_is_owned(staging)

    # The remover stopped holding the lock, the database not yet dropped: cleanup leaves it
    # alone (its database too), list does not show it, and a restore retires the next one.
    r2 = Paused(tmp_path, "2", "removal locked")
    third, _ = restore(staging, base, 3, r2.env)
    remover = r2.stopped()
    said.append(cleanup(staging))
    assert f"Left point {second}, unlisted earlier, alone: background removal by process {remover}" in said[-1]
    assert database_exists(staging, second) and (staging.backup_dir / f".tmp-deleting-{second}").is_dir()
    assert second not in listed(staging)
    r3 = Paused(tmp_path, "3", "before removal")
    fourth, _ = restore(staging, base, 4, r3.env)
    assert third not in listed(staging) and second not in listed(staging)
    r2.release()
    r2.finished()
    assert f"removed {second} (database {second} dropped)" in background_log(staging)

    # Cleanup stopped holding the lock of the third: its remover waits, then finds it done.
    r3.stopped()
    stopped = Paused(tmp_path, "cleanup", "removal locked")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "rollback_manager.py"), "cleanup"],
        env={**staging.env, **stopped.env},
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    cleaner = stopped.stopped()
    r3.release()
    time.sleep(3)  # the remover is back (it looks every 0.05 s) and waiting for the lock
    stopped.release()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    said.append(out + err)
    assert f"Removed point {third}, unlisted earlier (database {third} dropped)" in said[-1]
    r3.finished()
    assert f"{third} already removed by cleanup by process {cleaner}" in background_log(staging)

    # Nothing stopped: a restore's remover races a list, a cleanup and another restore.
    fifth, _ = restore(staging, base, 5)
    said.append(cleanup(staging))
    listed(staging)
    restore(staging, base, 6)
    wait_for(
        lambda: not [p for p in staging.backup_dir.iterdir() if p.name.startswith(".tmp-deleting-")],
        timeout=120,
        what="the background removals to end",
    )
    assert_every_point_database_is_owned(staging)
    everything = background_log(staging) + "".join(said)
    for retired in (first, second, third, fourth, fifth):
        assert not database_exists(staging, retired)
        assert removals(everything, retired) == 1, everything  # by the remover or by a cleanup, once
    assert "not removed" not in everything and "did not finish" not in everything


def test_cleanup_names_and_removes_point_databases_that_no_point_owns(staging):
    """What the race left before (a point database whose folder is gone), and an unlisted
    point whose remover never ran (its folder holding the .pending.json that points made
    before this fix kept): the dry run names both and changes nothing; cleanup removes
    both and lists nothing again."""
    orphan = staging.run_json("create_rollback_point.py", "orphan", "--method", "template")["id"]
    pending = staging.run_json("create_rollback_point.py", "pending", "--method", "template")["id"]
    staging.run_json("create_rollback_point.py", "kept", "--method", "template")
    for point_id in (orphan, pending):
        wait_for_baseline(staging, point_id)
    catalog = Catalog(staging.backup_dir)
    shutil.rmtree(catalog.unlist(catalog.get(orphan)))  # its database left behind
    trash = catalog.unlist(catalog.get(pending))
    (trash / ".pending.json").write_text((trash / "manifest.json").read_text())

    dry = cleanup(staging, "--dry-run")
    assert (
        f"Would remove database {orphan}" in dry and f"made by this catalog for point {orphan}, which is no longer listed" in dry
    )
    assert f"Would finish removing point {pending}, unlisted earlier: database {pending}, then its folder" in dry
    assert f"Would remove database {pending}" not in dry  # named once, as its point's
    assert database_exists(staging, orphan) and database_exists(staging, pending) and trash.is_dir()

    done = cleanup(staging)
    assert f"Removed database {orphan}" in done
    assert f"Removed point {pending}, unlisted earlier (database {pending} dropped)" in done
    assert not [i for i in listed(staging) if i.startswith("deleting-") or i in (orphan, pending)]
    assert_every_point_database_is_owned(staging)


def test_the_remover_says_what_it_did(staging, monkeypatch, caplog):
    """In-process: the first run drops the database and removes the folder, a second finds it done."""
    point_id = staging.run_json("create_rollback_point.py", "old", "--method", "template")["id"]
    staging.run_json("create_rollback_point.py", "new", "--method", "template")
    catalog = Catalog(staging.backup_dir)
    catalog.unlist(catalog.get(point_id))
    caplog.set_level(logging.INFO, logger="lib.operations.background")
    background.run_remove(load_settings(), point_id)
    background.run_remove(load_settings(), point_id)
    said = [r.getMessage() for r in caplog.records if r.name == "lib.operations.background"]
    assert said == [
        f"removed {point_id} (database {point_id} dropped)",
        f"{point_id} already removed by another run (its folder was gone when this one looked)",
    ]
    assert not catalog.trash(point_id).exists() and not database_exists(staging, point_id)
    assert_every_point_database_is_owned(staging)
