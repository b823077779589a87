"""ROLLBACK_GUIDE.md cannot drift from the code: it opens with the runbook and its
exit-code table, short enough to read at 3 a.m.; its command reference is the one the
scripts' parsers generate; every message its troubleshooting tables quote is one the
code prints, its links lead somewhere, and its runnable examples run against the demo
servers. The demo itself runs end to end. tests/README.md names every fault test."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lib.cli import reference
from lib.errors import ExitCode
from tests.conftest import ROOT

GUIDE = (ROOT / "ROLLBACK_GUIDE.md").read_text()
TESTS_README = (ROOT / "tests" / "README.md").read_text()
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


def _headings(text: str) -> list[tuple[int, str, int]]:
    """(level, title, offset) of every Markdown heading, fenced code left out."""
    found, fenced, offset = [], False, 0
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"(#{1,6}) (.+)", line)):
            found.append((len(m.group(1)), m.group(2).strip(), offset))
        offset += len(line)
    return found


def _sections(text: str, level: int) -> dict[str, str]:
    """Each heading of this level: its text, up to the next heading of this level or higher."""
    heads = _headings(text)
    sections = {}
    for i, (lvl, title, start) in enumerate(heads):
        if lvl == level:
            end = next((o for lv, _, o in heads[i + 1 :] if lv <= level), len(text))
            sections[title] = text[start:end]
    return sections


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


def test_the_command_reference_is_what_the_parsers_generate():
    """Edit a flag's help in its script, then `python3 -m lib.cli.reference --write`."""
    assert set(reference.SCRIPTS) == set(SCRIPTS)
    assert reference.current(GUIDE) == reference.render(), (
        "the guide's command reference is stale: run python3 -m lib.cli.reference --write"
    )
    assert _sections(GUIDE, 2)["Command reference"].count(reference.START) == 1


def test_the_reference_generator_checks_and_rewrites_its_section(tmp_path):
    guide = tmp_path / "guide.md"
    stale = reference.current(GUIDE).replace("`--keep N`", "`--keep-old N`")
    guide.write_text(GUIDE.replace(reference.current(GUIDE), stale))
    assert reference.main(["--check", "--guide", str(guide)]) == 1
    assert reference.main(["--write", "--guide", str(guide)]) == 0
    assert guide.read_text() == GUIDE
    assert reference.main(["--check", "--guide", str(guide)]) == 0


def _runbook() -> tuple[str, str]:
    """The guide's first ## section: its title and text."""
    return next(iter(_sections(GUIDE, 2).items()))


def _quoted_messages(section: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^\| `([^`]+)` \|", section, re.M)]


def _troubleshooting_messages() -> list[str]:
    return _quoted_messages(_sections(GUIDE, 2)["When things go wrong"])


def _exit_codes_in(section: str) -> set[int]:
    return {int(code) for code in re.findall(r"^\| (\d+) \|", section, re.M)}


def test_the_troubleshooting_table_quotes_messages_the_code_prints():
    messages = _troubleshooting_messages()
    assert len(messages) >= 15
    for message in messages + _quoted_messages(_runbook()[1]):
        pieces = [p.strip() for p in message.split("…") if len(p.strip()) >= 6]
        assert pieces, message
        for piece in pieces:
            assert piece in SOURCE, f"the guide quotes {piece!r}, which no script or lib module prints"


def test_the_guide_opens_with_the_runbook_and_its_exit_code_table():
    """The person on call reads the first section: how to restore, and what each exit code asks of them."""
    title, runbook = _runbook()
    assert "runbook" in title.lower(), f"the guide's first section is {title!r}, not the runbook"
    codes = {int(code) for code in ExitCode}
    assert _exit_codes_in(runbook) == codes, "the runbook's exit-code table must list every ExitCode, and only those"
    assert _exit_codes_in(_sections(GUIDE, 2)["Exit codes"]) == codes
    for command in ("check_setup.py", "quick_rollback.py", "rollback_manager.py list", "rollback_manager.py restore <id>"):
        assert command in runbook, command
    assert "\n### Recovering by hand\n" in runbook  # a restore interrupted mid-swap sends people there


def test_the_first_restore_command_is_within_the_first_30_lines():
    """At 3 a.m. the command that puts staging back is on the first screen."""
    lines = GUIDE.splitlines()
    first = next(
        i
        for i, line in enumerate(lines, 1)
        if line.startswith(("python3 quick_rollback.py", "python3 rollback_manager.py restore"))
    )
    assert first <= 30, f"the first restore command is on line {first} of ROLLBACK_GUIDE.md"


def _table_cells(text: str) -> list[str]:
    return [cell.strip() for line in text.splitlines() if line.startswith("|") for cell in line.strip().strip("|").split(" | ")]


def test_every_cell_of_the_runbooks_tables_is_short():
    """A cell is read at a glance: 40 words at most; the detail lives under Operations."""
    long = [cell for cell in _table_cells(_runbook()[1]) if len(cell.split()) > 40]
    assert not long, f"runbook table cells of more than 40 words: {long}"


def test_the_guide_is_at_most_10000_words():
    words = len(GUIDE.split())
    assert words <= 10_000, f"ROLLBACK_GUIDE.md has {words} words: cut repetition, not facts"


def test_the_headings_the_code_points_to_exist():
    """Messages and --help say "See ROLLBACK_GUIDE.md, 'Writing a migration'": that heading is there."""
    named = set(re.findall(r"ROLLBACK_GUIDE\.md, ['\"]([^'\"]+)['\"]", SOURCE))
    assert named, "the code names no section of the guide any more: drop this test"
    titles = {title for _, title, _ in _headings(GUIDE)}
    missing = sorted(named - titles)
    assert not missing, f"the code points to sections the guide does not have: {missing}"


def test_the_runbooks_messages_are_rows_of_the_full_table():
    """The runbook's short list of messages is a part of the full table, not a second truth."""
    runbook = _quoted_messages(_runbook()[1])
    assert len(runbook) >= 8
    missing = sorted(set(runbook) - set(_troubleshooting_messages()))
    assert not missing, f"messages in the runbook but not under 'When things go wrong': {missing}"


def _slug(title: str, seen: dict[str, int]) -> str:
    """The anchor GitHub gives a heading (a repeated one gets -1, -2, ...)."""
    slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    return f"{slug}-{count}" if count else slug


@pytest.mark.parametrize("name", ["ROLLBACK_GUIDE.md", "README.md", "tests/README.md"])
def test_links_lead_to_files_and_headings_that_exist(name):
    path = ROOT / name
    text = path.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+:", target):
            continue  # another site
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{name} links to {target}, which does not exist"
        if anchor:
            seen: dict[str, int] = {}
            anchors = {_slug(title, seen) for _, title, _ in _headings(linked.read_text())}
            assert anchor in anchors, f"{name} links to {target}: no such heading"


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
            "6. The migration for real, not strict",
            "7. The rollback points",
            "8. The audit trail",
        ):
            assert step in run.stderr, step
        assert "Staging is exactly as before" in run.stderr
        assert "undone:" in run.stderr and "Every row of the" in run.stderr
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
            newest, kept = _newest_points(env)
            command = command.replace("<id>", newest).replace("<kept id>", kept)
            argv = [sys.executable if w == "python3" else w for w in shlex.split(command)]
            result = subprocess.run(
                argv, cwd=ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600
            )
            assert result.returncode == expect, f"{command}: exit {result.returncode}\n{result.stderr[-2000:]}"
            ran += 1
    assert ran >= 10


def _newest_points(env) -> tuple[str, str]:
    """``<id>``: the newest point taken on purpose; ``<kept id>``: the newest state a restore kept."""
    out = subprocess.run(
        [sys.executable, "rollback_manager.py", "list", "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    points = __import__("json").loads(out.stdout or "[]")
    manual = [p["id"] for p in points if not p["id"].startswith("rb_before_rollback")]
    kept = [p["id"] for p in points if p.get("kind") == "before_rollback"]
    return (manual[-1] if manual else "no-point"), (kept[-1] if kept else "no-point")


def test_runnable_blocks_use_only_the_toolkit():
    for block in _runnable_blocks():
        for line in block.splitlines():
            command = line.partition("  #")[0].strip()
            if command and not command.startswith("#"):
                assert command.startswith(("python3 ", "./setup_and_run.sh ")), command
                assert Path(ROOT / shlex.split(command)[1]).exists() or command.startswith("./"), command


def test_what_we_test_lists_every_fault_test_and_only_real_ones():
    section = _sections(TESTS_README, 2)["What we test"]
    named = set(re.findall(r"`(test_\w+)`", section))
    faults = set()
    for path in (ROOT / "tests" / "faults").glob("test_*.py"):
        faults |= set(re.findall(r"^def (test_\w+)", path.read_text(), re.M))
    assert faults - named == set(), f"fault tests missing from 'What we test': {sorted(faults - named)}"
    every = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        every |= set(re.findall(r"^def (test_\w+)", path.read_text(), re.M))
    assert named - every == set(), f"'What we test' names tests that do not exist: {sorted(named - every)}"
