"""The toolkit's own background work, started detached by lib/pg/process.py's
PythonModule: ``python -m lib.cli.background spare POINT_ID`` prepares the spare copy
of a template point. It reports into its own log file and the exit code only: nobody
reads its output."""

from __future__ import annotations

import logging
import sys

from lib.cli.app import setup_logging
from lib.config import load_settings
from lib.errors import RollbackError
from lib.pg.target import open_target
from lib.points import spare
from lib.points.catalog import Catalog

log = logging.getLogger(__name__)


def prepare_spare(point_id: str) -> int:
    setup_logging("spare", debug=False)
    settings = load_settings()
    try:
        point = Catalog(settings.backup_dir).get(point_id)
        with open_target(settings, check_v2=False) as target:
            made = spare.prepare(target, point)
        log.info("spare copy of %s: %s", point.id, "ready" if made else "nothing to do")
        return 0
    except RollbackError as exc:
        log.error("could not prepare a spare copy: %s", exc.paragraph())
        return 1
    except Exception:  # noqa: BLE001 - background work: logged, never loud
        log.exception("could not prepare a spare copy")
        return 1


JOBS = {"spare": prepare_spare}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in JOBS:
        print(f"usage: python -m lib.cli.background {{{','.join(JOBS)}}} POINT_ID", file=sys.stderr)
        return 2
    return JOBS[args[0]](args[1])


if __name__ == "__main__":
    sys.exit(main())
