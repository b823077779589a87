"""The one way the toolkit tries again: only on the SQLSTATEs a caller names (a copy
or a rename that met a session, 55006), never on a message's words; and the one
way it waits for a condition."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg2

from lib.pg.codes import sqlstate

log = logging.getLogger(__name__)
T = TypeVar("T")


def retry_on(sqlstates: set[str], attempts: int, action: Callable[[int], T], *, what: str) -> T:
    """``action(attempt)`` until it returns; a psycopg2 error with one of ``sqlstates``
    is tried again up to ``attempts`` times in all, any other error raised at once."""
    for attempt in range(1, attempts + 1):
        try:
            return action(attempt)
        except psycopg2.Error as exc:
            if sqlstate(exc) not in sqlstates or attempt == attempts:
                raise
            log.info("%s met SQLSTATE %s (attempt %s of %s); trying again", what, sqlstate(exc), attempt, attempts)
    raise AssertionError("unreachable")


def wait_until(condition: Callable[[], bool], *, timeout: float, interval: float = 0.1) -> bool:
    """True as soon as ``condition()`` is; False when ``timeout`` seconds passed first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True
