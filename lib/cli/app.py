"""What every script shares: common flags, logging into logs/, and turning
exceptions into one paragraph and an exit code."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import traceback
from collections.abc import Callable

import psycopg2

from lib.cli.console import UI, confirmer_for
from lib.config import load_settings, loose_password_file, redact
from lib.errors import EXIT_CODES_HELP, ExitCode, RollbackError
from lib.logfiles import setup_logging
from lib.pg.codes import is_damage
from lib.process import dead_temporaries

log = logging.getLogger(__name__)


class Parser(argparse.ArgumentParser):
    """argparse that exits 2 with one paragraph (its default already uses 2)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)


CATALOG_CHECK_ONLY_HELP = "swap the copy in after its catalog check, unread: a changed or damaged page goes unseen"


def common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout and nothing else there")
    parser.add_argument("--yes", "-y", action="store_true", help="confirm destructive steps without asking")
    parser.add_argument("--debug", action="store_true", help="log at debug level and show tracebacks on screen")
    parser.add_argument("--backup-dir", metavar="DIR", help="where points live (default: BACKUP_DIR or backups/)")
    parser.add_argument(
        "--confirm-database",
        metavar="NAME",
        help="the staging database's name, typed ahead: needed with --yes for a database in PROTECTED_DATABASES",
    )


def settings_from(args: argparse.Namespace):
    """Settings from the flags every script names alike, then the environment, then .env."""
    return load_settings(
        staging_url=getattr(args, "database_url", None),
        v2_url=getattr(args, "v2_url", None),
        backup_dir=getattr(args, "backup_dir", None),
        encrypt=bool(getattr(args, "encrypt", False)),
        jobs=getattr(args, "jobs", None),
    )


def epilog(examples: str) -> str:
    return f"{examples.strip()}\n\n{EXIT_CODES_HELP}.\nSettings come from flags, then the environment, then .env (see ROLLBACK_GUIDE.md)."


def run_script(script: str, argv: list[str] | None, build_parser: Callable[[], argparse.ArgumentParser], action) -> int:
    """Parse, log, call ``action(args, ui, ask)`` with the console and the Confirmer the
    flags and the terminal call for, and map every failure to an exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    ui = UI(json_mode=getattr(args, "json", False))
    log_path, unlogged = setup_logging(script, getattr(args, "debug", False))
    if unlogged:
        ui.warn(unlogged)
    log.info("%s started: %s", script, redact(" ".join(sys.argv if argv is None else [script, *argv])))
    previous_term = signal.signal(signal.SIGTERM, _stop_as_interrupt)  # kill: the same clean-up as Ctrl-C
    for line in dead_temporaries():  # passfiles of killed runs: local, no lock needed, so at every start
        log.info("removed %s, left by a run that was killed", line)
    loose = loose_password_file()
    if loose:
        ui.warn(loose)
        log.warning("%s", loose)
    try:
        ask = confirmer_for(ui, yes=bool(getattr(args, "yes", False)), typed=getattr(args, "confirm_database", None))
        code = action(args, ui, ask)
        return int(code if code is not None else ExitCode.DONE)
    except RollbackError as exc:
        log.error("%s failed: %s", script, exc.paragraph(), exc_info=True)
        ui.error(redact(exc.paragraph()))
        if getattr(args, "debug", False):
            ui.err.print(redact(traceback.format_exc()), markup=False)
        elif log_path:
            ui.err.print(f"[dim]log: {log_path}[/]")
        return int(exc.exit_code)
    except KeyboardInterrupt:
        log.error("%s aborted (Ctrl-C or SIGTERM)", script)
        ui.error("Interrupted. Anything half-built was removed; staging is as it was unless a message above says otherwise.")
        return int(ExitCode.INTERRUPTED)
    except psycopg2.Error as exc:
        if not is_damage(exc):
            return _crashed(script, args, ui, exc, log_path)
        log.exception("%s met damaged storage", script)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        ui.error(
            redact(f"The server could not read a page or file it needed: {first}.")
            + " Its storage is damaged (a page that fails its checksum or header check, or a missing file). "
            "Staging is as it was unless a message above says otherwise. Next: use an earlier point "
            "(`python3 rollback_manager.py list`), and check the server's disk."
        )
        return int(ExitCode.VERIFICATION_FAILED)
    except Exception as exc:  # noqa: BLE001 - see _crashed
        return _crashed(script, args, ui, exc, log_path)
    finally:
        signal.signal(signal.SIGTERM, previous_term)


def _crashed(script: str, args, ui, exc: BaseException, log_path) -> int:
    """The last line of defence for people at 3 a.m.: what failed, and where the traceback is."""
    log.exception("%s crashed", script)
    ui.error(
        redact(f"Unexpected failure: {type(exc).__name__}: {exc}.")
        + f" The full traceback is in {log_path or 'the log'}; staging is as it was unless a message above says otherwise."
    )
    if getattr(args, "debug", False):
        ui.err.print(redact(traceback.format_exc()), markup=False)
    return int(ExitCode.FAILED)


def _stop_as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
