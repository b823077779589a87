"""How the domain reaches a person. Whoever calls it supplies both: a script, the
menu, the Python API or a test. The domain tells what it is doing through a
``Reporter`` and asks, before anything is destroyed, through a ``Confirmer``; it
never prompts itself, so the same operation runs unchanged everywhere.

The confirmers for people live with the console (lib/cli/console.py). This module
holds the two that need no person: ``Granted`` (the call itself is the
confirmation: ``--yes`` and the Python API) and ``Silent`` (reports nothing)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

from lib.errors import ConfirmationRefused

Tick = Callable[..., None]


class Reporter(Protocol):
    """What the domain tells about its work: one line at a time, and progress."""

    def info(self, text: str) -> None: ...
    def step(self, text: str) -> None: ...
    def ok(self, text: str) -> None: ...
    def warn(self, text: str) -> None: ...
    def error(self, text: str) -> None: ...

    def progress(
        self, label: str, total: float | None = None, unit: str = "", *, estimated: bool = False
    ) -> AbstractContextManager[Tick]:
        """Long work: the yielded callback takes ``done`` (against ``total``, in ``unit``:
        "B" for bytes, or what is counted: "rows", "entries") and/or a ``detail`` text.
        ``estimated``: the total is an estimate, and said to be one."""
        ...

    def counter(self, label: str, total: int | None, failures: Callable[[], str]) -> AbstractContextManager[Callable[[], None]]:
        """Records done, one call each; ``failures()`` says how many failed so far, and the rate."""
        ...


class Confirmer(Protocol):
    """Questions to a person. ``confirm`` returns to go ahead and raises
    ConfirmationRefused otherwise; for a protected database (PROTECTED_DATABASES) its
    name must be typed, or given ahead, whatever else was said. ``granted`` is True
    when the caller said yes ahead (--yes, the Python API): nobody reads a preview.
    ``person`` is True when a person answers, so that questions with no safe default
    (which point? which migration?) can be asked at all."""

    granted: bool
    person: bool

    def confirm(self, question: str, *, what: str, protected: str | None = None) -> None: ...

    def decide(self, question: str, *, default: bool) -> bool:
        """A yes/no choice with a safe default, taken when nobody can be asked."""
        ...

    def choose(self, question: str, *, what: str, choices: list[str] | None = None, default: str | None = None) -> str:
        """One of ``choices`` (or free text); refused when nobody can be asked and there is no default."""
        ...


class Silent:
    """A Reporter that tells nothing."""

    def info(self, text: str) -> None:
        pass

    step = ok = warn = error = info

    @contextmanager
    def progress(self, label: str, total: float | None = None, unit: str = "", *, estimated: bool = False) -> Iterator[Tick]:
        yield lambda *args, **kwargs: None

    @contextmanager
    def counter(self, label: str, total: int | None, failures: Callable[[], str]) -> Iterator[Callable[[], None]]:
        yield lambda: None


class Granted:
    """The call is the confirmation (``--yes``, the Python API). A protected database
    still needs its name, given ahead (``--confirm-database``, ``confirm_database=``)."""

    granted = True
    person = False

    def __init__(self, typed: str | None = None) -> None:
        self.typed = typed

    def confirm(self, question: str, *, what: str, protected: str | None = None) -> None:
        if protected and self.typed != protected:
            raise ConfirmationRefused(
                f"Refusing to {what}: {protected} is a protected database (PROTECTED_DATABASES), and --yes alone "
                "is not enough for it.",
                f"Type its name when asked on a terminal, or add --confirm-database {protected} (nothing has been changed).",
            )

    def decide(self, question: str, *, default: bool) -> bool:
        return default

    def choose(self, question: str, *, what: str, choices: list[str] | None = None, default: str | None = None) -> str:
        if default is None:
            raise ConfirmationRefused(f"Cannot ask for {what}: there is no terminal to ask on.", "Give it on the command line.")
        return default


class Refusing(Granted):
    """No terminal and no ``--yes``: every destructive step is refused before anything changes."""

    granted = False

    def confirm(self, question: str, *, what: str, protected: str | None = None) -> None:
        if protected:
            super().confirm(question, what=what, protected=protected)
            return
        raise ConfirmationRefused(
            f"Refusing to {what} without confirmation: there is no terminal to ask on.",
            "Run it again with --yes to confirm (nothing has been changed).",
        )
