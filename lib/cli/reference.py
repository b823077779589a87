"""The guide's command reference, generated from the scripts' own parsers, so that the
guide and --help cannot disagree about a flag.

    python3 -m lib.cli.reference --write   rewrite the section of ROLLBACK_GUIDE.md
    python3 -m lib.cli.reference --check   exit 1 when that section is stale

The section lies between the markers START and END. The rendering is built here from
each parser's actions (not by argparse's help formatter), so it is the same whatever
the terminal's width or the Python version."""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file, as lib.cli.venv runs it again under .venv: the scripts' folder first
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse  # noqa: E402
import importlib  # noqa: E402

import lib.cli.venv  # noqa: E402, F401  (runs this again under .venv when the scripts' packages are missing)
from lib.cli.app import common_flags  # noqa: E402
from lib.errors import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "ROLLBACK_GUIDE.md"
START = "<!-- reference:start -->"
END = "<!-- reference:end -->"
COMMON_HEADING = "Flags every script takes"
SHARED_BY = 3  # a flag this many scripts take alike is said once, beside the common ones
SCRIPTS = (
    "create_rollback_point",
    "quick_rollback",
    "rollback_manager",
    "reset_staging",
    "simple_rollback",
    "run_migration",
    "check_setup",
    "advanced_rollback",
    "demo",
)


def build_parsers() -> dict[str, argparse.ArgumentParser]:
    """Each script's parser, from its own build_parser()."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return {name: importlib.import_module(name).build_parser() for name in SCRIPTS}


def _shown(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]


def _signature(action: argparse.Action) -> tuple:
    return (tuple(action.option_strings), action.dest, action.help)


def _common() -> list[argparse.Action]:
    parser = argparse.ArgumentParser(add_help=False)
    common_flags(parser)
    return _shown(parser)


def _metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        return str(action.metavar)
    if action.choices is not None and not isinstance(action.choices, dict):
        return "{" + ",".join(str(c) for c in action.choices) + "}"
    return action.dest if not action.option_strings else action.dest.upper()


def _argument(action: argparse.Action) -> str:
    name = _metavar(action)
    if action.nargs == "?":
        return f"[{name}]"
    if action.nargs == "*":
        return f"[{name} ...]"
    if action.nargs == "+":
        return f"{name} [{name} ...]"
    return name


def invocation(action: argparse.Action) -> str:
    """How the flag is written: `--keep N`, `--yes, -y`, `--rollback [ID]`, `description`."""
    if not action.option_strings:
        return _metavar(action)
    flags = ", ".join(action.option_strings)
    return flags if action.nargs == 0 else f"{flags} {_argument(action)}"


def usage(prog: str, parser: argparse.ArgumentParser, leave_out: set[tuple]) -> str:
    """One line: the options, then the positionals; a mutually exclusive group as [A | B]."""
    actions = [a for a in _shown(parser) if _signature(a) not in leave_out]
    groups = {id(a): g for g in parser._mutually_exclusive_groups for a in g._group_actions}
    parts, done = [], set()
    for action in [a for a in actions if a.option_strings] + [a for a in actions if not a.option_strings]:
        if id(action) in done:
            continue
        if isinstance(action, argparse._SubParsersAction):
            parts.append(f"{_metavar(action)} ...")
            continue
        if id(action) in groups:
            members = [a for a in groups[id(action)]._group_actions if a in actions]
            done |= {id(a) for a in members}
            parts.append("[" + " | ".join(_option_usage(a) for a in members) + "]")
            continue
        done.add(id(action))
        if action.option_strings:
            parts.append(_option_usage(action) if action.required else f"[{_option_usage(action)}]")
        else:
            parts.append(_argument(action))
    return " ".join([prog, *parts])


def _option_usage(action: argparse.Action) -> str:
    first = action.option_strings[0]
    return first if action.nargs == 0 else f"{first} {_argument(action)}"


def _item(left: str, right: str | None) -> str:
    return f"- `{left}`: {' '.join((right or '').split())}"


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, list[str], str, argparse.ArgumentParser]]:
    """(name, aliases, help, parser) of each subcommand, in the order they were added."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                sub = action.choices[choice.dest]
                aliases = [k for k, v in action.choices.items() if v is sub and k != choice.dest]
                found.append((choice.dest, aliases, choice.help or "", sub))
    return found


def _flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options of the script and of its subcommands that have a help text."""
    parsers = [parser, *(s[3] for s in _subcommands(parser))]
    return [a for p in parsers for a in _shown(p) if a.option_strings and a.help]


def _takes_every_common_flag(parser: argparse.ArgumentParser, common: set[tuple]) -> bool:
    subs = _subcommands(parser)
    parsers = [s[3] for s in subs] if subs else [parser]
    return all(common <= {_signature(a) for a in _shown(p)} for p in parsers)


def _shared(parsers: dict[str, argparse.ArgumentParser], common: set[tuple]) -> list[argparse.Action]:
    """Flags SHARED_BY or more scripts take with the same help: said once, not in each script's list."""
    seen: dict[tuple, argparse.Action] = {}
    count: dict[tuple, int] = {}
    for parser in parsers.values():
        for signature, action in {_signature(a): a for a in _flags(parser) if _signature(a) not in common}.items():
            seen.setdefault(signature, action)
            count[signature] = count.get(signature, 0) + 1
    return [a for sig, a in seen.items() if count[sig] >= SHARED_BY]


def render_script(name: str, parser: argparse.ArgumentParser, common: set[tuple], shared: set[tuple]) -> list[str]:
    prog = f"{name}.py"
    unlisted = (common if _takes_every_common_flag(parser, common) else set()) | shared  # said once, above
    before_command = {_signature(a) for a in _shown(parser)}  # said on the script's own line, not per command
    usages = [usage(prog, parser, unlisted - shared)]
    items = [
        _item(invocation(a), a.help)
        for a in _shown(parser)
        if a.help and _signature(a) not in unlisted and not isinstance(a, argparse._SubParsersAction)
    ]
    for command, aliases, text, sub in _subcommands(parser):
        usages.append(usage(f"{prog} {command}", sub, (unlisted - shared) | before_command))
        items.append(_item(", ".join([command, *aliases]), text))
        items += [
            _item(f"{command} {invocation(a)}", a.help)
            for a in _shown(sub)
            if a.help and _signature(a) not in unlisted | before_command
        ]
    summary = " ".join((parser.description or "").strip().split("\n\n")[0].split())
    if any(_signature(a) in unlisted for a in _flags(parser)):
        summary += f" Common flags: [above](#{COMMON_HEADING.lower().replace(' ', '-')})."
    return [f"### {prog}", "", summary, "", "```text", *usages, "```", *([""] + items if items else [])]


def render(parsers: dict[str, argparse.ArgumentParser] | None = None) -> str:
    """The whole section between the markers, markers included."""
    parsers = parsers or build_parsers()
    common_actions = _common()
    common = {_signature(a) for a in common_actions}
    shared = _shared(parsers, common)
    others = [f"{n}.py" for n, p in parsers.items() if not _takes_every_common_flag(p, common)]
    after = [f"{n}.py" for n, p in parsers.items() if _subcommands(p) and f"{n}.py" not in others]
    who = f"Every script but {' and '.join(others)} takes these" if others else "Every script takes these"
    lines = [
        START,
        "<!-- generated from the scripts' parsers by `python3 -m lib.cli.reference --write`: edit the scripts, not this -->",
        "",
        f"### {COMMON_HEADING}",
        "",
        who + (f"; {' and '.join(after)} after their command:" if after else ":"),
        "",
        *[_item(invocation(a), a.help) for a in common_actions],
    ]
    if shared:
        lines += ["", "And these, where a script's usage line shows them:", "", *[_item(invocation(a), a.help) for a in shared]]
    for name, parser in parsers.items():
        lines += ["", *render_script(name, parser, common, {_signature(a) for a in shared})]
    return "\n".join([*lines, "", END])


def current(text: str) -> str:
    """The section as the guide has it, markers included."""
    start, end = text.find(START), text.find(END)
    if start == -1 or end < start:
        raise ConfigError(f"The guide has no section between {START} and {END}.", "Put the two markers back around it.")
    return text[start : end + len(END)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m lib.cli.reference", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the command reference in the guide")
    mode.add_argument("--check", action="store_true", help="exit 1 when the guide's command reference is stale")
    parser.add_argument("--guide", type=Path, default=GUIDE, help=f"the guide (default: {GUIDE.name})")
    args = parser.parse_args(argv)
    text = args.guide.read_text()
    try:
        old = current(text)
    except ConfigError as exc:
        print(f"{args.guide}: {exc.paragraph()}", file=sys.stderr)
        return int(exc.exit_code)
    new = render()
    if args.check:
        if old != new:
            print(f"{args.guide.name}: the command reference is stale; run python3 -m lib.cli.reference --write", file=sys.stderr)
            return 1
        return 0
    if old != new:
        args.guide.write_text(text.replace(old, new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
