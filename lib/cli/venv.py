"""The scripts under the project's own Python: `python3 quick_rollback.py` typed at
3 a.m. with no virtual environment active runs again under `.venv/bin/python`,
where `./setup_and_run.sh install` put the toolkit's packages, and says so once on
stderr. Imported first by every script, for that effect; it needs only the
standard library, so it works under any Python 3."""

from __future__ import annotations

import os
import sys
from importlib.util import find_spec
from pathlib import Path

PACKAGES = ("psycopg2", "dotenv", "rich")
ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv"
AGAIN = "ROLLBACK_TOOLKIT_IN_VENV"  # set for the second run, so that it never loops


def _in_venv() -> bool:
    try:
        return Path(sys.prefix).resolve() == VENV.resolve()
    except OSError:
        return False


def use_project_venv() -> None:
    missing = [name for name in PACKAGES if find_spec(name) is None]
    if not missing:
        return
    python = VENV / "bin" / "python"
    script = Path(sys.argv[0]).name or "the script"
    if python.exists() and not _in_venv() and not os.environ.get(AGAIN):
        sys.stderr.write(
            f"{script}: running under {python} (the toolkit's packages are installed there, not for {sys.executable})\n"
        )
        sys.stderr.flush()
        try:
            os.execve(str(python), [str(python), *sys.argv], {**os.environ, AGAIN: "1"})
        except OSError as exc:
            sys.stderr.write(f"error: could not start {python}: {exc.strerror or exc}.\n")
            raise SystemExit(2) from None
    where = f"{VENV} lacks them" if python.exists() else f"there is no {VENV}"
    sys.stderr.write(
        f"error: {script} needs the Python packages {', '.join(missing)}, which {sys.executable} does not have, and "
        f"{where}. Run `{ROOT}/setup_and_run.sh install` (it creates .venv with them), then run the command again; "
        "nothing has been changed.\n"
    )
    raise SystemExit(2)


use_project_venv()
