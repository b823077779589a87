"""The toolkit's own background work, started detached by lib/operations/background.py:
``python -m lib.cli.background after-point POINT_ID`` and ``after-restore RESTORED_ID
BEFORE_ID`` ("-" for none). It reports into its own log file and its exit code only:
nobody reads its output."""

from __future__ import annotations

import logging
import sys

from lib.cli.app import setup_logging
from lib.config import load_settings
from lib.errors import RollbackError
from lib.operations import background

log = logging.getLogger(__name__)

JOBS = {
    "after-point": (background.run_after_point, 1),
    "after-restore": (background.run_after_restore, 2),
    "remove": (background.run_remove, None),  # any number of point ids
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in JOBS or len(args) - 1 != (JOBS[args[0]][1] or max(1, len(args) - 1)):
        print(f"usage: python -m lib.cli.background {{{'|'.join(JOBS)}}} POINT_ID...", file=sys.stderr)
        return 2
    setup_logging("background", debug=False)
    job, _ = JOBS[args[0]]
    try:
        job(load_settings(), *args[1:])
        return 0
    except RollbackError as exc:
        log.error("%s did not finish: %s", args[0], exc.paragraph())
        return 1
    except Exception:  # noqa: BLE001 - background work: logged, never loud
        log.exception("%s did not finish", args[0])
        return 1


if __name__ == "__main__":
    sys.exit(main())
