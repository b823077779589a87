"""ROLLBACK_GUIDE.md cannot drift from the code: every flag of every script is in it,
every message its troubleshooting table quotes is one the code prints, and its
runnable examples run against the demo servers. The demo itself runs end to end."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

GUIDE = (ROOT / "ROLLBACK_GUIDE.md").read_text()
SCRIPTS = [
    "create_rollback_point",
    "rollback_manager",
    "quick_rollback",
    "simple_rollback",
    "reset_staging",
    "run_migration",
    "check_setup",
    "advanced_rollback",
    "demo",
]
SOURCE = "\n".join(p.read_text() for p in [*ROOT.glob("*.py"), *ROOT.glob("lib/**/*.py"), ROOT / "setup_and_run.sh"])


COMMON_FLAGS = {"--json", "--yes", "--debug", "--backup-dir", "--confirm-database"}


def _flags(parser) -> set[str]:
    found = set()
    for action in parser._actions:
        if action.help == "==SUPPRESS==":
            continue
        found |= {o for o in action.option_strings if o.startswith("--") and o != "--help"}
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict):  # subcommands
            for sub in choices.values():
                found |= _flags(sub)
    return found


def _section(heading: str) -> str:
    """The text under a ### heading of the command reference, up to the next heading."""
    start = GUIDE.index(f"\n### {heading}\n")
    end = GUIDE.find("\n#", start + 5)
    return GUIDE[start : end if end != -1 else len(GUIDE)]


def _mentions(text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_of_every_script_is_in_its_section_of_the_guide(script):
    """Each flag is explained where its script is: in the command reference's section of
    that script, and the flags every script takes in their own section."""
    module = importlib.import_module(script)
    own = _section(f"{script}.py")
    flags = _flags(module.build_parser())
    missing = sorted(f for f in flags - COMMON_FLAGS if not _mentions(own, f))
    assert not missing, f"{script}.py flags missing from its section of ROLLBACK_GUIDE.md: {missing}"
    common = _section("Flags every script takes")
    assert not [f for f in flags & COMMON_FLAGS if not _mentions(common, f)]
    extra = sorted(f for f in re.findall(r"`(?:\w+ )?(--[\w-]+)", own) if f not in flags)
    assert not extra, f"the guide's section of {script}.py names flags it does not have: {extra}"


def _troubleshooting_messages() -> list[str]:
    section = GUIDE[GUIDE.index("## When things go wrong") :]
    section = section[: section.index("\n## ", 3)]
    return [m.group(1) for m in re.finditer(r"^\| `([^`]+)` \|", section, re.M)]


def test_the_troubleshooting_table_quotes_messages_the_code_prints():
    messages = _troubleshooting_messages()
    assert len(messages) >= 15
    for message in messages:
        pieces = [p.strip() for p in message.split("…") if len(p.strip()) >= 6]
        assert pieces, message
        for piece in pieces:
            assert piece in SOURCE, f"the guide quotes {piece!r}, which no script or lib module prints"


def _runnable_blocks() -> list[str]:
    return re.findall(r"<!-- runnable -->\n```bash\n(.*?)```", GUIDE, re.S)


@pytest.fixture(scope="module")
def demo_env():
    env_file, had_env = ROOT / ".env", (ROOT / ".env").exists()
    before = env_file.read_text() if had_env else None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "STAGING_", "V2_", "BACKUP_DIR", "LOG_DIR"))}
    env.pop("ROLLBACK_ENV_FILE", None)
    runs = [
        subprocess.run(
            [str(ROOT / "setup_and_run.sh"), "demo"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=900,
        )
        for _ in range(2)  # running it twice works
    ]
    try:
        yield env, runs, before
    finally:
        subprocess.run([str(ROOT / "setup_and_run.sh"), "demo", "--stop"], cwd=ROOT, env=env, capture_output=True, timeout=120)
        if not had_env and env_file.exists():
            env_file.unlink()


def test_the_demo_runs_end_to_end_twice_and_leaves_env_alone(demo_env):
    env, runs, before = demo_env
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
        for step in (
            "1. Check",
            "2. Take a rollback point",
            "4. The migration for real",
            "5. Verification",
            "6. The rollback points",
            "7. The audit trail",
        ):
            assert step in run.stderr, step
        assert "Staging is exactly as before" in run.stderr
        assert "threshold breach" in run.stdout and "automatic rollback" in run.stdout
        assert "Where things are" in run.stderr and "Try next" in run.stderr
    assert "already running" in runs[1].stderr
    if before is not None:
        assert (ROOT / ".env").read_text() == before  # an existing .env is never overwritten
    else:
        assert "STAGING_DATABASE_URL" in (ROOT / ".env").read_text()


def test_the_guides_runnable_examples_run_against_the_demo(demo_env):
    env, runs, _ = demo_env
    assert all(r.returncode == 0 for r in runs)
    env = {**env, "ROLLBACK_ENV_FILE": str(ROOT / ".pgdata" / "demo.env")}
    blocks = _runnable_blocks()
    assert len(blocks) >= 4
    ran = 0
    for block in blocks:
        for line in block.splitlines():
            command, _, comment = line.partition("  #")
            command = command.strip()
            if not command or command.startswith("#"):
                continue
            expect = int(m.group(1)) if (m := re.search(r"exit (\d+)", comment)) else 0
            newest = _newest_point(env)
            argv = [sys.executable if w == "python3" else w for w in shlex.split(command.replace("<id>", newest))]
            result = subprocess.run(
                argv, cwd=ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600
            )
            assert result.returncode == expect, f"{command}: exit {result.returncode}\n{result.stderr[-2000:]}"
            ran += 1
    assert ran >= 10


def _newest_point(env) -> str:
    out = subprocess.run(
        [sys.executable, "rollback_manager.py", "list", "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    points = __import__("json").loads(out.stdout or "[]")
    manual = [p["id"] for p in points if not p["id"].startswith("rb_before_rollback")]
    return manual[-1] if manual else "no-point"


def test_runnable_blocks_use_only_the_toolkit():
    for block in _runnable_blocks():
        for line in block.splitlines():
            command = line.partition("  #")[0].strip()
            if command and not command.startswith("#"):
                assert command.startswith(("python3 ", "./setup_and_run.sh ")), command
                assert Path(ROOT / shlex.split(command)[1]).exists() or command.startswith("./"), command


def test_what_we_test_lists_every_fault_test_and_only_real_ones():
    section = GUIDE[GUIDE.index("## What we test") :]
    section = section[: section.index("\n## ", 3)]
    named = set(re.findall(r"`(test_\w+)`", section))
    faults = set()
    for path in (ROOT / "tests" / "faults").glob("test_*.py"):
        faults |= set(re.findall(r"^def (test_\w+)", path.read_text(), re.M))
    assert faults - named == set(), f"fault tests missing from 'What we test': {sorted(faults - named)}"
    every = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        every |= set(re.findall(r"^def (test_\w+)", path.read_text(), re.M))
    assert named - every == set(), f"'What we test' names tests that do not exist: {sorted(named - every)}"
