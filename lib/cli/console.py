"""What people see: rich output on stderr, results on stdout, confirmations."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeRemainingColumn
from rich.prompt import Confirm, Prompt

from lib.errors import ConfirmationRefused


class UI:
    """Human messages go to stderr so that stdout carries only results (and JSON)."""

    def __init__(self, *, json_mode: bool = False, quiet: bool = False) -> None:
        self.json_mode = json_mode
        self.quiet = quiet
        # Piped output is not wrapped at 80 columns: ids and paths stay whole for grep.
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)
        self.out = Console(highlight=False)
        if not self.out.is_terminal:
            self.out = Console(highlight=False, width=220)

    def info(self, text: str) -> None:
        if not self.quiet:
            self.err.print(text)

    def step(self, text: str) -> None:
        self.info(f"[cyan]•[/] {text}")

    def ok(self, text: str) -> None:
        self.info(f"[green]✓[/] {text}")

    def warn(self, text: str) -> None:
        self.err.print(f"[yellow]warning:[/] {text}")

    def error(self, text: str) -> None:
        self.err.print(f"[bold red]error:[/] {escape(text)}")

    def result(self, document, human: Callable[[], None]) -> int:
        """The command's result: ``document`` as JSON with --json, else ``human()``. Returns 0."""
        if self.json_mode:
            self.emit_json(document)
        else:
            human()
        return 0

    def emit_json(self, document) -> None:
        sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
        sys.stdout.flush()

    @contextmanager
    def progress(self, label: str) -> Iterator[callable]:
        """A spinner with elapsed time; the yielded callback updates its detail text."""
        if self.quiet or not self.err.is_terminal:
            self.info(f"[cyan]•[/] {label} …")
            yield lambda detail=None: None
            return
        started = time.monotonic()
        with self.err.status(label) as status:

            def update(detail: str | None = None) -> None:
                extra = f" — {detail}" if detail else ""
                status.update(f"{label}{extra} ({time.monotonic() - started:.0f} s)")

            yield update

    @contextmanager
    def counter(self, label: str, total: int | None, failed: Callable[[], int]) -> Iterator[Callable[[], None]]:
        """Records done, rate, ETA and failures; the yielded callback counts one record.
        Without a terminal, one line every 5 s."""
        started = last = time.monotonic()
        done = 0
        if self.quiet or not self.err.is_terminal:

            def tick() -> None:
                nonlocal done, last
                done += 1
                now = time.monotonic()
                if now - last >= 5:
                    last = now
                    of = f"/{total}" if total else ""
                    self.info(f"  {label}: {done}{of} records, {done / (now - started):.0f}/s, {failed()} failed")

            yield tick
            return
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
        columns += [TextColumn("{task.fields[rate]}/s"), TimeRemainingColumn(), TextColumn("{task.fields[failed]} failed")]
        with Progress(*columns, console=self.err) as progress:
            task = progress.add_task(label, total=total, rate="0", failed=0)

            def tick() -> None:
                nonlocal done
                done += 1
                elapsed = max(time.monotonic() - started, 1e-6)
                progress.update(task, advance=1, rate=f"{done / elapsed:.0f}", failed=failed())

            yield tick

    def ask(self, question: str, *, default: str | None = None, choices: list[str] | None = None, what: str) -> str:
        """A question that needs a terminal; without one, refuse and say which flag answers it."""
        if not sys.stdin.isatty():
            raise ConfirmationRefused(f"Cannot ask for {what}: there is no terminal to ask on.", "Give it on the command line.")
        return Prompt.ask(question, console=self.err, default=default, choices=choices, show_choices=bool(choices))

    def confirm(
        self, question: str, *, assume_yes: bool, what: str, protected: str | None = None, typed: str | None = None
    ) -> None:
        """Ask; with --yes go ahead; with no terminal refuse before anything changes.

        ``protected``: a database in PROTECTED_DATABASES, whose name must be typed (at the
        prompt, or ahead with --confirm-database as ``typed``); --yes alone is not enough."""
        if protected:
            if typed == protected:
                return
            if not sys.stdin.isatty():
                raise ConfirmationRefused(
                    f"Refusing to {what}: {protected} is a protected database (PROTECTED_DATABASES), and --yes alone "
                    "is not enough for it.",
                    f"Type its name when asked on a terminal, or add --confirm-database {protected} (nothing has been changed).",
                )
            answer = Prompt.ask(f"{question} {protected} is protected: type its name to confirm", console=self.err)
            if answer.strip() != protected:
                raise ConfirmationRefused(f"The name typed is not {protected}; did not {what}.", "Nothing has been changed.")
            return
        if assume_yes:
            return
        if not sys.stdin.isatty():
            raise ConfirmationRefused(
                f"Refusing to {what} without confirmation: there is no terminal to ask on.",
                "Run it again with --yes to confirm (nothing has been changed).",
            )
        if not Confirm.ask(question, console=self.err, default=False):
            raise ConfirmationRefused(f"Not confirmed; did not {what}.", "Nothing has been changed.")
