"""The log file of each run: logs/<script>_<timestamp>.log, 0600 in a 0700 folder, every
line redacted. Set up by the scripts and by the background's worker alike."""

from __future__ import annotations

import logging
from pathlib import Path

from lib.config import PROJECT_ROOT, load_settings, redact
from lib.errors import RollbackError
from lib.files import make_private_dir, utc_now


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True


def setup_logging(script: str, debug: bool) -> tuple[Path | None, str | None]:
    """logs/<script>_<YYYYMMDD_HHMMSS>.log, 0600 in a 0700 folder; and, when that folder
    cannot be written, why (the audit trail lives there too)."""
    try:
        settings = load_settings()
        log_dir = settings.log_dir
    except RollbackError:
        log_dir = PROJECT_ROOT / "logs"
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for h in list(root.handlers):
        if getattr(h, "_rollback_toolkit", False):
            root.removeHandler(h)
            h.close()
    path, problem = None, None
    try:
        make_private_dir(log_dir)
        path = log_dir / f"{script}_{utc_now().strftime('%Y%m%d_%H%M%S')}.log"
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        handler: logging.Handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as exc:
        path, handler = None, logging.NullHandler()
        problem = (
            f"The log folder {log_dir} cannot be written ({exc.strerror or exc}): this run leaves no log file and no "
            "audit entry. Make it writable, or set LOG_DIR to a folder that is (`python3 check_setup.py` checks it)."
        )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    handler._rollback_toolkit = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    for noisy in ("urllib3", "docker", "testcontainers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return path, problem
