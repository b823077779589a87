"""What runs after a point or a restore, in a second process detached from the terminal
and from the caller's output, so that neither the person nor a script that captures
the output waits for it: the spare copy of the newest template point, the other
spares dropped, every row of a database copy read once as the baseline its copies are
compared with, and the spare read against it (every page, every row) and marked ready.
A foreground operation never waits for it: a copy of a database the background is
reading ends the background's session, and a quick rollback takes the spare only when
the background is done with it (else it copies the point itself, and reads the copy)."""

from __future__ import annotations

import logging
import sys

import psycopg2

from lib.config import Settings, load_settings
from lib.errors import RollbackError, Yielded
from lib.logfiles import setup_logging
from lib.pg.locks import wait_while_held
from lib.pg.target import open_target
from lib.points import retention, spare
from lib.points.catalog import Catalog, Point
from lib.points.methods import registry
from lib.points.methods import template as template_method
from lib.process import PythonModule

log = logging.getLogger(__name__)


def start(settings: Settings, job: str, *point_ids: str) -> None:
    """``job`` for ``point_ids`` in a detached process; the settings travel in its environment, never its argv."""
    env = {
        "STAGING_DATABASE_URL": settings.staging_url or "",
        "BACKUP_DIR": str(settings.backup_dir),
        "LOG_DIR": str(settings.log_dir),
    }
    PythonModule(env=env).start_detached(__spec__.name, job, *point_ids)  # this module's main()
    log.info("started in the background: %s %s", job, " ".join(point_ids))


def after_restore(settings: Settings, restored: Point | None, before_id: str | None) -> None:
    """Start what follows a swap: the restored point's next spare, and the kept state's row baseline."""
    ids = [restored.id if restored is not None and _wants_spare(settings, restored) else "-", before_id or "-"]
    if ids != ["-", "-"]:
        start(settings, "after-restore", *ids)


def retire_before_states(op) -> None:
    """After a restore (within its operation, lib/operations/scaffold.py): the states kept
    before older rollbacks beyond KEEP_BEFORE_STATES are unlisted now, said, recorded in the
    audit entry, and their databases dropped in the background."""
    keep = op.settings.keep_before_states
    old = retention.before_states_to_retire(op.target, op.catalog, keep)
    for point in old:
        op.catalog.unlist(point)
        op.ui.info(
            f"Removed {point.id} ({point.manifest.description or 'state before rollback'}, "
            f"{(point.manifest.created_at_text or '?')[:19].replace('T', ' ')} UTC): only the newest {keep} states kept "
            "before rollbacks stay (KEEP_BEFORE_STATES)."
        )
    if old:
        start(op.settings, "remove", *(p.id for p in old))
        op.record.set(retired_before_states=[p.id for p in old])


def _wants_spare(settings: Settings, point: Point) -> bool:
    method = registry.find(point.method)
    return method is not None and method.follow_up_after_restore(settings, point)


# ---------------------------------------------------------------- in the background process


def run_after_point(settings: Settings, point_id: str) -> None:
    catalog = Catalog(settings.backup_dir)
    point = catalog.get(point_id)
    with open_target(settings, check_v2=False) as target:
        if _wants_spare(settings, point):
            spare.drop_all_but(target, catalog, point)
            _prepare_spare(target, point)
        _read(target, catalog, point)


def run_after_restore(settings: Settings, restored_id: str, before_id: str) -> None:
    catalog = Catalog(settings.backup_dir)
    with open_target(settings, check_v2=False) as target:
        restored = catalog.get(restored_id) if restored_id != "-" else None
        if restored is not None:  # first: the next quick rollback needs it
            _prepare_spare(target, restored)
            _read(target, catalog, restored)
        if before_id != "-":
            _read(target, catalog, catalog.get(before_id))


def run_remove(settings: Settings, *point_ids: str) -> None:
    """The databases of unlisted points dropped, then their folders, each holding the
    point's lock: a cleanup that came first did it already, one that comes meanwhile
    leaves it to this process. The log says which. A point not removed keeps its folder
    (and so its database an owner): the next cleanup finishes it."""
    catalog = Catalog(settings.backup_dir)
    failed = []
    with open_target(settings, check_v2=False) as target:
        for point_id in point_ids:
            try:
                removal = retention.finish_removal(
                    target, catalog, point_id, doing="background removal", wait=retention.LOCK_WAIT_SECONDS
                )
            except Exception as exc:  # noqa: BLE001 - one point's failure never stops the others' removal
                message = exc.paragraph() if isinstance(exc, RollbackError) else str(exc).strip()
                log.error("%s not removed: %s", point_id, message)
                failed.append(point_id)
                continue
            log.info("%s", removal.describe())
    if failed:
        raise RollbackError(
            f"Unlisted point(s) {', '.join(failed)} not removed (see above).",
            "`python3 rollback_manager.py cleanup` finishes their removal.",
        )


def _prepare_spare(target, point: Point) -> None:
    try:
        made = spare.prepare(target, point)
        log.info("spare copy of %s: %s", point.id, "copied" if made else "nothing to do")
    except RollbackError as exc:  # a quick rollback then copies the point itself
        log.error("could not prepare a spare copy of %s: %s", point.id, exc.paragraph())


READ_ATTEMPTS = 5  # readings started over after operations on staging, before giving up


def _read(target, catalog: Catalog, point: Point) -> None:
    """The point's baseline, read once, and its spare read against it and marked ready.
    It yields to foreground work: an operation on staging stops it (between chunks of
    pages) and it lets go of the point and the spare at once, waits for that operation to
    end and reads again, up to READ_ATTEMPTS times; a copy or a drop of what it reads
    ends its sessions."""
    wait_while_held(target.maint, target.lock_key)  # the operation that started this job may still hold it
    for _ in range(READ_ATTEMPTS):
        try:
            _read_once(target, point)
            return
        except Yielded as exc:
            waited = wait_while_held(target.maint, target.lock_key)
            log.info("reading %s stopped for an operation on staging (%s); %.1f s later, reading again", point.id, exc, waited)
        except RollbackError as exc:  # ended by a foreground copy, the point is gone, or the copy differs
            log.info("reading %s stopped: %s", point.id, exc.message)
            return
        except psycopg2.Error as exc:  # the foreground ended this session
            log.info("reading %s stopped (yielded to the foreground): %s", point.id, str(exc).strip())
            return
        except Exception:  # noqa: BLE001 - a defect: logged in full, the point keeps no baseline yet
            log.exception("reading %s failed", point.id)
            return
        try:
            point = catalog.get(point.id)  # as it is now: deleted, or read by the operation meanwhile
        except RollbackError:
            log.info("reading %s stopped: the point was removed meanwhile", point.id)
            return
    log.info("reading %s given up: %d operations on staging interrupted it; the next one reads it", point.id, READ_ATTEMPTS)


def _read_once(target, point: Point) -> None:
    with spare.held(target, point) as name:
        if name is not None and _wants_spare(target.settings, point):
            ready = template_method.ready_spare(target, point, name)
            log.info("spare copy of %s: %s", point.id, f"read and ready ({ready})" if ready else "not ready")
        elif point.verification.baseline is None:
            baseline, _ = template_method.read_baseline(target, point)
            log.info(
                "baseline of %s: %s",
                point.id,
                f"{sum(baseline.row_counts.values())} rows read" if baseline.known else f"unknown ({baseline.unknown})",
            )


# ---- the detached process: ``python -m lib.operations.background JOB POINT_ID...`` ----
# It reports into its own log file and its exit code only: nobody reads its output.

JOBS = {
    "after-point": (run_after_point, 1),
    "after-restore": (run_after_restore, 2),  # RESTORED_ID BEFORE_ID, "-" for none
    "remove": (run_remove, None),  # any number of point ids
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in JOBS or len(args) - 1 != (JOBS[args[0]][1] or max(1, len(args) - 1)):
        print(f"usage: python -m {__spec__.name} {{{'|'.join(JOBS)}}} POINT_ID...", file=sys.stderr)
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
