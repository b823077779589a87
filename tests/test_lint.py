"""The code stays lint-clean: ruff for Python, shellcheck for bash."""

from __future__ import annotations

import shutil
import subprocess
import sys

from tests.conftest import ROOT


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shell_scripts_pass_shellcheck():
    assert shutil.which("shellcheck"), "shellcheck is not installed: the test command installs it (apt-get install shellcheck)"
    result = subprocess.run(["shellcheck", "setup_and_run.sh", ".ci/run"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_setup_script_help_and_unknown_command():
    helped = subprocess.run(["bash", "setup_and_run.sh", "help"], cwd=ROOT, capture_output=True, text=True)
    assert helped.returncode == 0 and "demo" in helped.stdout and "test" in helped.stdout
    wrong = subprocess.run(
        ["bash", "setup_and_run.sh", "nonsense"], cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    assert wrong.returncode == 2 and "unknown command" in wrong.stderr
    menu = subprocess.run(
        ["bash", "setup_and_run.sh", "menu"], cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    assert menu.returncode == 2 and "needs a terminal" in menu.stderr
