"""The suite's own rules, checked by running it: a server it needs that does not start
fails the run, with or without CI set; only ROLLBACK_TESTS_ALLOW_MISSING turns that
into skips, and the summary says how many and why; a skip nobody asked for fails."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

ONE_TEST = "tests/test_safety.py::test_unknown_point_id"


def _pytest(*args: str, env: dict) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "ROLLBACK_TESTS_ALLOW_MISSING", "PYTEST_ADDOPTS")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.needs_root("breaks the servers by naming a user that does not exist for them to run as")
@pytest.mark.parametrize("ci", ["", "true"])
def test_a_server_that_does_not_start_fails_the_run_unless_asked(ci):
    broken = {"ROLLBACK_SERVER_USER": "no_such_user_here", **({"CI": ci} if ci else {})}
    failed = _pytest(ONE_TEST, env=broken)
    assert failed.returncode != 0, failed.stdout
    assert "did not start" in failed.stdout and "ROLLBACK_TESTS_ALLOW_MISSING" in failed.stdout
    asked = _pytest(ONE_TEST, env={**broken, "ROLLBACK_TESTS_ALLOW_MISSING": "15,18"})
    assert asked.returncode == 0, asked.stdout
    assert "2 test(s) skipped because ROLLBACK_TESTS_ALLOW_MISSING=15,18 asked for it" in asked.stdout


def test_a_skip_nobody_asked_for_fails(tmp_path):
    probe = ROOT / "tests" / f"test_zz_skip_probe_{os.getpid()}.py"
    probe.write_text("import pytest\n\n\ndef test_it():\n    pytest.skip('for no good reason')\n")
    try:
        result = _pytest(str(probe.relative_to(ROOT)), env={})
    finally:
        probe.unlink()
    assert result.returncode != 0, result.stdout
    assert "skipped without being asked to" in result.stdout
