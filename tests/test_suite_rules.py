"""The suite's own rules, checked by running it: a server it needs that does not start
fails the run, with or without CI set; only ROLLBACK_TESTS_ALLOW_MISSING turns that
into skips, and the summary says how many and why; a skip nobody asked for fails; a
child of the suite takes Ctrl-C as a person's would, however the suite was started."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.helpers import wait_for

ONE_TEST = "tests/test_safety.py::test_unknown_point_id"
CTRL_C_TEST = "tests/faults/test_interrupts.py::test_ctrl_c_during_a_data_point[pg18]"

# Python with SIGINT ignored (or blocked), exec'ing the rest of its argv: how a shell
# without job control starts a background job (`bash .ci/run &`).
_PARENT = "import os, signal, sys; {}; os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
IGNORING = [sys.executable, "-c", _PARENT.format("signal.signal(signal.SIGINT, signal.SIG_IGN)")]
BLOCKING = [sys.executable, "-c", _PARENT.format("signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})")]

# Started the way the tests start scripts (subprocess), a child says how it takes SIGINT.
_HOW_A_CHILD_TAKES_SIGINT = """
import signal, subprocess, sys
ask = (
    "import signal; h = signal.getsignal(signal.SIGINT); "
    "print('default' if h is signal.default_int_handler else 'ignored' if h == signal.SIG_IGN else h, "
    "'blocked' if signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []) else 'unblocked')"
)
print(subprocess.run([sys.executable, "-c", ask], capture_output=True, text=True, check=True).stdout.strip())
"""


def _pytest(*args: str, env: dict, parent: list[str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "ROLLBACK_TESTS_ALLOW_MISSING", "PYTEST_ADDOPTS")}
    return subprocess.run(
        [*(parent or [sys.executable]), "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
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


def test_the_unit_subset_starts_no_server_and_takes_seconds():
    """pytest -m unit: the rules checked without PostgreSQL, for a quick run while working."""
    began = time.monotonic()
    ran = _pytest("-m", "unit", env={})
    took = time.monotonic() - began
    assert ran.returncode == 0, ran.stdout[-3000:]
    passed = re.search(r"^(\d+) passed, (\d+) deselected in ", ran.stdout, re.M)
    assert passed and int(passed.group(1)) >= 80 and int(passed.group(2)) > 300, ran.stdout[-1000:]
    servers = ran.stdout[ran.stdout.index("PostgreSQL servers") :]
    assert "no server was started" in servers
    assert not re.search(r"^(ran|did not run):", servers, re.M), servers
    assert took < 60, f"pytest -m unit took {took:.0f} s"


def test_the_test_command_runs_only_the_tests_it_is_given():
    """./setup_and_run.sh test tests/FILE: that file, not the whole suite as well."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    listed = subprocess.run(
        ["./setup_and_run.sh", "test", "tests/test_rules.py", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    assert listed.returncode == 0, listed.stdout[-2000:] + listed.stderr[-2000:]
    tests = [line for line in listed.stdout.splitlines() if "::" in line]
    assert len(tests) >= 40 and all(t.startswith("tests/test_rules.py::") for t in tests), tests[:3]


@pytest.mark.unit
def test_a_skip_nobody_asked_for_fails(tmp_path):
    probe = ROOT / "tests" / f"test_zz_skip_probe_{os.getpid()}.py"
    probe.write_text("import pytest\n\n\ndef test_it():\n    pytest.skip('for no good reason')\n")
    try:
        result = _pytest(str(probe.relative_to(ROOT)), env={})
    finally:
        probe.unlink()
    assert result.returncode != 0, result.stdout
    assert "skipped without being asked to" in result.stdout


@pytest.mark.unit
@pytest.mark.parametrize("parent", [IGNORING, BLOCKING], ids=["sigint-ignored", "sigint-blocked"])
def test_a_child_of_the_suite_takes_ctrl_c_whoever_started_the_suite(parent):
    """Without the suite's conftest, the child inherits the parent's SIGINT as it is
    (the parent really ignores or blocks it); with it, the child has the default."""
    bare = subprocess.run([*parent, "-c", _HOW_A_CHILD_TAKES_SIGINT], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bare.stdout.split() == (["ignored", "unblocked"] if parent is IGNORING else ["default", "blocked"]), bare.stderr
    suite = subprocess.run(
        [*parent, "-c", "import tests.conftest\n" + _HOW_A_CHILD_TAKES_SIGINT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert suite.stdout.split() == ["default", "unblocked"], suite.stderr


def test_a_ctrl_c_fault_test_passes_when_the_suite_starts_with_sigint_ignored():
    """The fault test sends SIGINT to a script it started; from a parent that ignores
    SIGINT the script would inherit that, never stop, and the test would time out."""
    ran = _pytest(CTRL_C_TEST, env={}, parent=IGNORING, timeout=600)
    assert ran.returncode == 0, ran.stdout[-3000:]
    assert "1 passed" in ran.stdout


@pytest.mark.unit
def test_wait_for_returns_what_came_and_says_what_never_did():
    answers = iter([None, 0, "", [], "here"])
    assert wait_for(lambda: next(answers), timeout=30, what="an answer", every=0.01) == "here"
    began = time.monotonic()
    with pytest.raises(AssertionError, match=r"^waited 0\.3 s for the moon, in vain$"):
        wait_for(lambda: False, timeout=0.3, what="the moon", every=0.01)
    assert 0.3 <= time.monotonic() - began < 10


@pytest.mark.unit
def test_wait_for_stops_at_once_when_the_run_it_waits_on_ends_first():
    run = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stderr.write('gave up early'); sys.exit(3)"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    began = time.monotonic()
    with pytest.raises(AssertionError) as caught:
        wait_for(lambda: False, timeout=120, what="the marker", process=run)
    assert str(caught.value) == "the run ended (exit 3) before the marker:\ngave up early"
    assert time.monotonic() - began < 60
