"""Named places where the fault tests stop a run on purpose, to kill it there.

With ROLLBACK_FAULT_PAUSE=<name> in the environment, a run reaching that place
writes its pid to the file named by ROLLBACK_FAULT_READY and sleeps, or, with
ROLLBACK_FAULT_RESUME naming a file, waits until that file exists and goes on.
Nothing else happens, and without the variable the call returns at once."""

from __future__ import annotations

import os
import time
from pathlib import Path

PLACES = ("between renames", "after swap", "data copy")


def pause(name: str) -> None:
    assert name in PLACES, name
    if os.environ.get("ROLLBACK_FAULT_PAUSE") != name:
        return
    ready = os.environ.get("ROLLBACK_FAULT_READY")
    if ready:
        Path(ready).write_text(str(os.getpid()))
    resume = os.environ.get("ROLLBACK_FAULT_RESUME")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not (resume and Path(resume).exists()):
        time.sleep(0.05)
