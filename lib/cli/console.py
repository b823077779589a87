"""What people see: rich output on stderr, results on stdout, and the questions:
the console is the Reporter the scripts give the domain, and ``confirmer_for``
picks the Confirmer (a terminal asks; --yes grants; without either, refused)."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from lib.errors import ConfirmationRefused
from lib.files import human_size
from lib.interaction import Confirmer, Granted, Refusing

PROGRESS_EVERY = 10.0  # seconds between progress lines where no terminal shows a bar
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # all but tab and newline: a log never holds escapes
_STYLE = re.compile(r"\[/?(?:(?:bold|dim|italic) )?(?:bold|dim|italic|cyan|green|yellow|red|blue|magenta)?\]")


class PlainStream:
    """Where nobody watches (a pipe, a log, a script's capture): the same lines without
    colour or wrapping, and without loading rich, which a person's terminal needs and a
    script's call does not wait for."""

    is_terminal = False

    def __init__(self, stream) -> None:
        self.stream = stream

    def print(self, text: str = "", *, markup: bool = True) -> None:
        self.stream.write(_CONTROL.sub("?", _STYLE.sub("", text) if markup else text) + "\n")
        self.stream.flush()


class UI:
    """Human messages go to stderr so that stdout carries only results (and JSON)."""

    clock = staticmethod(time.monotonic)

    def __init__(self, *, json_mode: bool = False, quiet: bool = False) -> None:
        self.json_mode = json_mode
        self.quiet = quiet
        if sys.stderr.isatty():
            from rich.console import Console

            self.err = Console(stderr=True, highlight=False, soft_wrap=True)
        else:
            self.err = PlainStream(sys.stderr)
        self._out = None

    @property
    def out(self):
        """stdout for tables; piped output is not wrapped at 80 columns: ids and paths stay whole for grep."""
        if self._out is None:
            from rich.console import Console

            self._out = Console(highlight=False)
            if not self._out.is_terminal:
                self._out = Console(highlight=False, width=220)
        return self._out

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
        if isinstance(self.err, PlainStream):
            self.err.print(f"error: {text}", markup=False)
            return
        from rich.markup import escape

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
    def progress(
        self, label: str, total: float | None = None, unit: str = "", *, estimated: bool = False
    ) -> Iterator[Callable[..., None]]:
        """Long work. The yielded callback takes a ``detail`` text and/or ``done`` against
        ``total`` (bytes with unit "B", or a count of ``unit``; ``estimated``: "about"): a
        bar with an ETA on a terminal; without one, a line as it starts and at most one
        every PROGRESS_EVERY seconds."""
        if self.quiet or not self.err.is_terminal:
            with self._progress_lines(label, total, unit, estimated) as tick:
                yield tick
        elif total:
            with self._progress_bar(label, total, unit, estimated) as tick:
                yield tick
        else:
            with self._spinner(label, unit) as tick:
                yield tick

    def _line(self, text: str) -> None:
        if not self.quiet:
            self.err.print(text, markup=False)

    @contextmanager
    def _progress_lines(self, label: str, total: float | None, unit: str, estimated: bool) -> Iterator[Callable[..., None]]:
        """For a pipe, a log, cron: plain lines, never more than one every PROGRESS_EVERY
        seconds, and a last one when the work took that long."""
        started = self.clock()
        self.info(f"[cyan]•[/] {label} …")
        shown = {"at": started, "done": None, "lines": 0}

        def note(detail: str | None = None, *, done: float | None = None) -> None:
            shown["done"] = shown["done"] if done is None else done
            now = self.clock()
            if now - shown["at"] < PROGRESS_EVERY:
                return
            shown["at"] = now
            shown["lines"] += 1
            self._line(f"  {label}: {_progress_text(shown['done'], total, unit, now - started, detail, estimated)}")

        yield note
        if shown["lines"] or self.clock() - started >= PROGRESS_EVERY:
            self._line(f"  {label}: finished after {_duration(self.clock() - started)}")

    @contextmanager
    def _progress_bar(self, label: str, total: float, unit: str, estimated: bool) -> Iterator[Callable[..., None]]:
        from rich.markup import escape
        from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn

        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn()]
        columns += [TextColumn("{task.fields[amount]}"), TextColumn("{task.fields[left]}"), TextColumn("{task.fields[detail]}")]
        started = self.clock()
        with Progress(*columns, console=self.err, transient=False) as bar:
            task = bar.add_task(escape(label), total=total, amount=_amount(0, total, unit, estimated), left="", detail="")

            def advance(detail: str | None = None, *, done: float | None = None) -> None:
                fields = {"detail": escape(detail or "")}
                if done is not None:
                    left = _time_left(done, total, self.clock() - started)
                    fields.update(completed=min(done, total), amount=_amount(done, total, unit, estimated), left=left or "")
                bar.update(task, **fields)

            yield advance

    @contextmanager
    def _spinner(self, label: str, unit: str) -> Iterator[Callable[..., None]]:
        """Work that cannot tell how far it is: what it is doing, and for how long."""
        from rich.markup import escape
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        columns = [SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), TextColumn("{task.fields[detail]}")]
        with Progress(*columns, console=self.err, transient=True) as spinner:
            task = spinner.add_task(escape(label), total=None, detail="")

            def update(detail: str | None = None, *, done: float | None = None) -> None:
                text = ", ".join(part for part in (_amount(done, None, unit) if done is not None else "", detail) if part)
                spinner.update(task, detail=escape(text))

            yield update

    @contextmanager
    def counter(self, label: str, total: int | None, failures: Callable[[], str]) -> Iterator[Callable[[], None]]:
        """Records done, rate, ETA and ``failures()`` (failed so far, and the failure rate
        against the threshold); the yielded callback counts one record. Without a
        terminal, one line every 5 s."""
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
                    self.info(f"  {label}: {done}{of} records, {done / (now - started):.0f}/s, {failures()}")

            yield tick
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeRemainingColumn

        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
        columns += [TextColumn("{task.fields[rate]}/s"), TimeRemainingColumn(), TextColumn("{task.fields[failures]}")]
        with Progress(*columns, console=self.err) as progress:
            task = progress.add_task(label, total=total, rate="0", failures=failures())

            def tick() -> None:
                nonlocal done
                done += 1
                elapsed = max(time.monotonic() - started, 1e-6)
                progress.update(task, advance=1, rate=f"{done / elapsed:.0f}", failures=failures())

            yield tick


def _amount(done: float, total: float | None, unit: str, estimated: bool = False) -> str:
    """'1.2 GiB of about 4.0 GiB', '1,200 of 5,000 rows'."""
    of = f" of {'about ' if estimated else ''}"
    if unit == "B":
        return human_size(int(done)) + (of + human_size(int(total)) if total else "")
    return f"{int(done):,}" + (f"{of}{int(total):,}" if total else "") + (f" {unit}" if unit else "")


def _duration(seconds: float) -> str:
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{max(seconds, 1):.0f} s"


def _time_left(done: float, total: float, elapsed: float) -> str | None:
    """The ETA at the rate so far, once there is a rate."""
    if not 0 < done < total or elapsed <= 0:
        return None
    return f"about {_duration(elapsed * (total - done) / done)} left"


def _progress_text(
    done: float | None, total: float | None, unit: str, elapsed: float, detail: str | None, estimated: bool
) -> str:
    """'1.2 GiB of about 4.0 GiB, 30%, about 2 min left, 45 s so far — detail', as far as it is known."""
    parts = []
    if done is not None:
        parts.append(_amount(done, total, unit, estimated))
        if total:
            parts.append(f"{min(done / total, 1):.0%}")
            parts += [left] if (left := _time_left(done, total, elapsed)) else []
    parts.append(f"{_duration(elapsed)} so far")
    return ", ".join(parts) + (f" — {detail}" if detail else "")


class TerminalConfirmer(Granted):
    """Asks on the terminal. A protected database's name, once typed, is not asked again
    in the same run (an automatic rollback after a confirmed migration)."""

    granted = False
    person = True

    def __init__(self, console, typed: str | None = None) -> None:
        super().__init__(typed)
        if isinstance(console, PlainStream):  # stdin is a terminal, stderr is not: ask on the terminal anyway
            from rich.console import Console

            console = Console(stderr=True, highlight=False)
        self.console = console

    def confirm(self, question: str, *, what: str, protected: str | None = None) -> None:
        with _input_may_end(what):
            self._confirm(question, what=what, protected=protected)

    def _confirm(self, question: str, *, what: str, protected: str | None = None) -> None:
        from rich.prompt import Confirm, Prompt

        if protected:
            if self.typed == protected:
                return
            answer = Prompt.ask(f"{question} {protected} is protected: type its name to confirm", console=self.console)
            if answer.strip() != protected:
                raise ConfirmationRefused(f"The name typed is not {protected}; did not {what}.", "Nothing has been changed.")
            self.typed = protected
            return
        if not Confirm.ask(question, console=self.console, default=False):
            raise ConfirmationRefused(f"Not confirmed; did not {what}.", "Nothing has been changed.")

    def decide(self, question: str, *, default: bool) -> bool:
        from rich.prompt import Confirm

        try:
            return Confirm.ask(question, console=self.console, default=default)
        except (KeyboardInterrupt, EOFError):
            return False

    def choose(self, question: str, *, what: str, choices: list[str] | None = None, default: str | None = None) -> str:
        from rich.prompt import Prompt

        with _input_may_end(what):
            return Prompt.ask(question, console=self.console, default=default, choices=choices, show_choices=bool(choices))


@contextmanager
def _input_may_end(what: str) -> Iterator[None]:
    """Input that ends before an answer (Ctrl-D, a closed pipe) is a refusal: exit 2, nothing done."""
    try:
        yield
    except EOFError:
        raise ConfirmationRefused(
            f"The input ended before an answer about {what}; nothing has been changed.",
            "Run it again on a terminal, or give the answer on the command line (--yes, an id).",
        ) from None


def confirmer_for(ui: UI, *, yes: bool, typed: str | None = None, terminal: bool | None = None) -> Confirmer:
    """--yes grants; otherwise a terminal asks; otherwise every question is refused."""
    if yes:
        return Granted(typed)
    if sys.stdin.isatty() if terminal is None else terminal:
        return TerminalConfirmer(ui.err, typed)
    return Refusing(typed)
