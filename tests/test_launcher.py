"""setup_and_run.sh as a person uses it: the menu in a real (pseudo-)terminal,
subcommands with and without --yes, with and without a terminal."""

from __future__ import annotations

import json
import subprocess

import pexpect
import pytest

from tests.conftest import ROOT

SCRIPT = str(ROOT / "setup_and_run.sh")
MENU_LINE = "1) Install / update dependencies        6) List rollback points"


def launcher(staging, *args: str, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPT, *args], env=staging.env, cwd=ROOT, capture_output=True, text=True, stdin=stdin, timeout=300)


def spawn(staging, *args: str) -> pexpect.spawn:
    child = pexpect.spawn(SCRIPT, list(args), env=staging.env, cwd=str(ROOT), encoding="utf-8", timeout=120, dimensions=(50, 250))
    return child


@pytest.fixture
def staging(pg18, new_staging):
    return new_staging(pg18)


def test_the_menu_lists_creates_and_quick_rolls_back_in_a_terminal(staging):
    child = spawn(staging)
    child.expect_exact(MENU_LINE)
    child.expect_exact("5) Create rollback point                0) Exit")
    child.expect_exact("Choose 0-9: ")

    child.sendline("6")
    child.expect_exact("No rollback points yet")
    child.expect_exact("Press Enter to return to the menu")
    child.sendline("")

    child.expect_exact("Choose 0-9: ")
    child.sendline("5")
    child.expect_exact("Description")
    child.sendline("From the menu")
    child.expect(r"Point created \(dump\)")
    child.expect(r"(rb_from_the_menu_\d{8}_\d{6})")
    point_id = child.match.group(1)
    child.expect_exact("Press Enter to return to the menu")
    child.sendline("")

    staging.sql("DELETE FROM documents")
    child.expect_exact("Choose 0-9: ")
    child.sendline("7")
    child.expect_exact(point_id)
    child.expect_exact("Go ahead?")
    child.sendline("y")
    child.expect_exact(f"is back at {point_id}")
    child.expect_exact("Press Enter to return to the menu")
    child.sendline("")

    child.expect_exact("Choose 0-9: ")
    child.sendline("0")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert staging.sql("SELECT count(*) FROM documents")[0][0] == 2


def test_a_failing_option_shows_its_error_and_the_menu_goes_on(staging):
    child = spawn(staging)
    child.expect_exact("Choose 0-9: ")
    child.sendline("9")  # reset from V2, and V2_DATABASE_URL is not set
    child.expect_exact("V2_DATABASE_URL")
    child.expect_exact("option 9 ended with exit code 2")
    child.expect_exact("Press Enter to return to the menu")
    child.sendline("")
    child.expect_exact(MENU_LINE)
    child.sendline("x")
    child.expect_exact("no option x")
    child.sendline("")
    child.expect_exact("Choose 0-9: ")
    child.sendline("0")
    child.expect(pexpect.EOF)


def test_advanced_rollback_picks_a_point_shows_the_diff_and_confirms(staging):
    first = staging.create_point("first", "--method", "data")
    staging.create_point("second", "--method", "data")
    staging.sql("INSERT INTO documents (owner_name, body) VALUES ('x', 'added after the points')")
    child = spawn(staging, "8")
    child.expect_exact("#")
    child.expect_exact("Restore which point? (number)")
    child.sendline("1")
    child.expect_exact("Full restore")
    child.sendline("partial")
    child.expect_exact(f"Restoring {first} would undo:")
    child.expect(r"documents: 1 added")
    child.expect_exact("Delete them?")
    child.sendline("y")
    child.expect_exact("row(s) added since")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert staging.sql("SELECT count(*) FROM documents WHERE body = 'added after the points'")[0][0] == 0


def test_subcommands_without_a_terminal_need_yes(staging):
    point_id = json.loads(launcher(staging, "point", "Before", "--json").stdout)["id"]
    refused = launcher(staging, "quick")
    assert refused.returncode == 2
    assert "Refusing to restore" in refused.stderr and "--yes" in refused.stderr
    done = launcher(staging, "7", "--yes", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["point_id"] == point_id
    listed = launcher(staging, "list", "--json")
    assert point_id in {p["id"] for p in json.loads(listed.stdout)}
    advanced = launcher(staging, "advanced")
    assert advanced.returncode == 2 and "no terminal" in advanced.stderr


def test_a_subcommand_in_a_terminal_asks_and_no_means_nothing_changes(staging):
    staging.create_point("Before")
    staging.sql("DELETE FROM documents")
    child = spawn(staging, "quick")
    child.expect_exact("Go ahead?")
    child.sendline("n")
    child.expect_exact("Not confirmed")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2
    assert staging.sql("SELECT count(*) FROM documents")[0][0] == 0


def test_check_reports_each_item(staging):
    result = launcher(staging, "check", "--json")
    assert result.returncode == 0, result.stderr
    found = {f["item"]: f for f in json.loads(result.stdout)}
    assert found["staging server"]["status"] == "ok" and "PostgreSQL 18" in found["staging server"]["detail"]
    assert "***" in found["staging URL"]["detail"] and staging.server.url_base.password not in result.stdout
    assert found["pg_dump for staging"]["status"] == "ok" and "18" in found["pg_dump for staging"]["detail"]
    assert found["create databases"]["status"] == "ok"
    assert found["V2 URL"]["status"] == "warn"
    assert found["rollback points"]["detail"].startswith("0 in ")

    broken = launcher(staging, "2", "--database-url", "postgresql://nobody:pw@127.0.0.1:1/nothing")
    assert broken.returncode == 1
    assert "FAILED" in broken.stdout and "Connection refused" in broken.stdout


def test_help_usage_and_unknown_commands(staging):
    helped = launcher(staging, "--help")
    assert helped.returncode == 0
    for word in ("install", "check", "migrate-prod", "advanced", "reset", "demo --stop", "./setup_and_run.sh 7"):
        assert word in helped.stdout, word
    assert launcher(staging).stdout == helped.stdout  # no terminal, no command: the usage
    unknown = launcher(staging, "nope")
    assert unknown.returncode == 2 and "unknown command: nope" in unknown.stderr
    menu = launcher(staging, "menu")
    assert menu.returncode == 2 and "the menu needs a terminal" in menu.stderr


def test_the_advanced_menu_never_offers_a_state_kept_before_a_rollback_and_ended_input_exits_2(staging):
    first = staging.create_point("first", "--method", "data")
    staging.run("rollback_manager.py", "restore", first, "--yes")  # keeps the state before: the newest point now
    child = spawn(staging, "8")
    child.expect_exact("Restore which point? (number)")
    child.expect_exact("(1)")  # the default is the point taken on purpose, not the newer kept state (2)
    child.sendeof()  # the input ends (Ctrl-D) before an answer
    child.expect(pexpect.EOF)
    said = child.before
    child.close()
    assert child.exitstatus == 2, said
    assert "input ended before an answer" in said and "Unexpected failure" not in said and "EOFError" not in said
