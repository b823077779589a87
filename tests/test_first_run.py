"""A new user's first minute: the demo from a clone in a folder only root may enter.

As root, PostgreSQL runs as the unprivileged postgres user, which cannot enter such a
folder; the demo must still work, from binaries and data kept where that user can
reach them. (The demo from an ordinary folder runs in test_guide.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT


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


@pytest.mark.needs_root("clones into a folder only root may enter, as root")
def test_the_demo_runs_as_root_from_a_folder_only_root_may_enter():
    folder = Path(tempfile.mkdtemp(prefix="first-run-"))
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    server_dir = None
    try:
        clone = _clone_into(folder)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "STAGING_", "V2_", "BACKUP_DIR", "LOG_DIR"))}
        env.pop("ROLLBACK_ENV_FILE", None)
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
        assert server_dir and not server_dir.startswith(str(folder))
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
        subprocess.run(
            ["./setup_and_run.sh", "demo", "--stop"], cwd=folder / "rollback-toolkit", capture_output=True, timeout=120
        )
        shutil.rmtree(folder, ignore_errors=True)
        if server_dir:
            shutil.rmtree(Path(server_dir).parent, ignore_errors=True)


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
