"""Named places where the fault tests stop a run on purpose, to kill it there or to
change the world under it.

With ROLLBACK_FAULT_PAUSE=<name> in the environment, a run reaching that place
appends its pid as a line to the file named by ROLLBACK_FAULT_READY and sleeps, or,
with ROLLBACK_FAULT_RESUME naming a file, waits until that file exists and goes on.
Only the first arrival pauses, unless ROLLBACK_FAULT_EVERY=1: then the n-th arrival
waits until the resume file has n lines. Nothing else happens, and without the
variable the call returns at once."""

from __future__ import annotations

import os
import time
from pathlib import Path

PLACES = (
    "between renames",
    "after swap",
    "data copy",
    "before copy",
    "after copy",
    "side server up",
    "before removal",  # an unlisted point's removal, before it takes the point's lock
    "removal locked",  # ... holding it, the folder found, nothing dropped yet
    "reading rows",
    "undo applied",  # an undo's rows all put back, its transaction not committed yet
)
_arrivals: dict[str, int] = {}


def pause(name: str) -> None:
    assert name in PLACES, name
    if os.environ.get("ROLLBACK_FAULT_PAUSE") != name:
        return
    arrival = _arrivals[name] = _arrivals.get(name, 0) + 1
    every = os.environ.get("ROLLBACK_FAULT_EVERY") == "1"
    if arrival > 1 and not every:
        return
    ready = os.environ.get("ROLLBACK_FAULT_READY")
    if ready:
        with open(ready, "a") as fh:
            fh.write(f"{os.getpid()}\n")
    resume = Path(os.environ.get("ROLLBACK_FAULT_RESUME") or "")
    deadline = time.monotonic() + 600

    def resumed() -> bool:
        if not resume.name or not resume.exists():
            return False
        return not every or len(resume.read_text().splitlines()) >= arrival

    while time.monotonic() < deadline and not resumed():
        time.sleep(0.05)
