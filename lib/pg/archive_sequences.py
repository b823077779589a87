"""The sequence positions a pg_dump archive sets.

Sequences are not transactional: a snapshot does not hold them still, and pg_dump
reads each one at its own moment and writes what it read into the archive's SEQUENCE
SET entries, which are all a restore sets. So what a point records of its sequences
is read back from its archive, never from the server.

Read by the archive's own tools: ``pg_restore --list``, its SEQUENCE SET entries
chosen with ``--use-list``, and their SQL (``SELECT pg_catalog.setval('<name>', N,
true|false);``) read as PostgreSQL reads it: string literals as
``standard_conforming_strings`` says, quoted identifiers, names holding dots,
spaces, quotes, newlines and any letter, in the encoding the script declares."""

from __future__ import annotations

import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

from psycopg2.extensions import encodings as PYTHON_CODECS

from lib.errors import ToolError
from lib.pg.fingerprint import qualified, split_qualified
from lib.pg.tools import Tool, command_for, try_each

# An archive as pg_restore reads it: its arguments (a path; none for stdin) and its stdin.
ArchiveSource = Callable[[], AbstractContextManager[tuple[list[str], int]]]

_SEQUENCE_SET = re.compile(r"^\d+; \d+ \d+ SEQUENCE SET ")


def sequence_set_entries(listing: str) -> list[str]:
    """The lines of ``pg_restore --list`` that are SEQUENCE SET entries (its names are
    printed on one line each, so a line is an entry)."""
    return [line for line in listing.splitlines() if _SEQUENCE_SET.match(line)]


def archived_positions(candidates: list[Tool], source: ArchiveSource) -> tuple[Tool, dict[str, list]]:
    """Every sequence the archive sets, ``qualified(schema, name)`` -> [value, is_called],
    read by the first of ``candidates`` that accepts the archive's version. ``source``
    is opened once per reading (an archive on stdin is read from its start each time)."""

    def attempt(tool: Tool) -> dict[str, list]:
        restore = command_for(tool)
        with source() as (args, stdin):
            listing = restore.output(["--list", *args], stdin=stdin)
        entries = sequence_set_entries(listing)
        if not entries:
            return {}
        with (
            tempfile.NamedTemporaryFile("w", prefix="rollback-sequences-", suffix=".list") as chosen,
            _collected() as (out_fd, script),
        ):
            chosen.write("\n".join(entries) + "\n")
            chosen.flush()
            with source() as (args, stdin):
                restore.run([f"--use-list={chosen.name}", f"--file=/dev/fd/{out_fd}", *args], stdin=stdin, pass_fds=(out_fd,))
        positions = setval_positions(bytes(script))
        if len(positions) != len(entries):
            raise ToolError(
                f"{restore.label} listed {len(entries)} SEQUENCE SET entries and its script sets {len(positions)} sequences."
            )
        return positions

    return try_each(candidates, attempt)


@contextmanager
def fed(data: bytes | bytearray) -> Iterator[tuple[list[str], int]]:
    """``data`` as an archive on a child's stdin (``ArchiveSource``'s shape); the child
    may stop reading early."""
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        try:
            with os.fdopen(write_fd, "wb") as out:
                out.write(data)
        except BrokenPipeError:
            pass  # the reader had what it needed

    thread = threading.Thread(target=feed, name="archive head", daemon=True)
    thread.start()
    try:
        yield [], read_fd
    finally:
        os.close(read_fd)  # a writer still blocked on a full pipe now gets EPIPE
        thread.join()


@contextmanager
def _collected() -> Iterator[tuple[int, bytearray]]:
    """A pipe for a child to write into as ``/dev/fd/N``, read whole into a buffer: the
    bytes as written (a script in the database's encoding, not necessarily UTF-8)."""
    read_fd, write_fd = os.pipe()
    into = bytearray()

    def drain() -> None:
        with os.fdopen(read_fd, "rb") as src:
            while chunk := src.read(1 << 16):
                into.extend(chunk)

    thread = threading.Thread(target=drain, name="pg_restore script", daemon=True)
    thread.start()
    try:
        yield write_fd, into
    finally:
        os.close(write_fd)  # the child's copy closed when it ended: the reader sees the end
        thread.join()


# ------------------------------------------------------------------ reading the script


@dataclass
class _Token:
    kind: str  # word (unquoted, ASCII lowercased), ident (quoted), string, number, punct
    value: bytes


_WORD_START = re.compile(rb"[A-Za-z_\x80-\xff]")
_WORD = re.compile(rb"[A-Za-z0-9_$\x80-\xff]*")
_NUMBER = re.compile(rb"[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?")
_DOLLAR_TAG = re.compile(rb"\$([A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*)?\$")
_NEXT_LITERAL = re.compile(rb"[ \t\f\r]*\n\s*'")  # 'a'<newline>'b' is 'ab'
_OCTAL = re.compile(rb"[0-7]{1,3}")
_HEX = re.compile(rb"x([0-9A-Fa-f]{1,2})")
_UNICODE = re.compile(rb"u([0-9A-Fa-f]{4})|U([0-9A-Fa-f]{8})")
_SIMPLE_ESCAPES = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t"}


class _Script:
    """pg_restore's SQL script, statement by statement. A psql meta-command (pg_dump
    writes ``\\restrict``) runs to the end of its line."""

    def __init__(self, text: bytes) -> None:
        self.text = text
        self.pos = 0
        self.standard_strings = True  # until the script says otherwise
        self.codec = "utf_8"

    def statements(self) -> Iterator[list[_Token]]:
        tokens: list[_Token] = []
        while True:
            token = self._next(at_start=not tokens)
            if token is None:
                if tokens:
                    yield tokens
                return
            if token.kind == "punct" and token.value == b";":
                yield tokens
                self._settings(tokens)
                tokens = []
            elif token.kind != "meta":
                tokens.append(token)

    def _settings(self, tokens: list[_Token]) -> None:
        """What changes how the rest is read: standard_conforming_strings, client_encoding."""
        if len(tokens) != 4 or tokens[0] != _Token("word", b"set") or tokens[2].value not in (b"=", b"to"):
            return
        name, value = tokens[1].value, tokens[3].value.decode("ascii", "replace")
        if name == b"standard_conforming_strings":
            self.standard_strings = value.lower() in ("on", "true", "1", "yes")
        elif name == b"client_encoding":
            key = re.sub(r"[^A-Za-z0-9]", "", value).upper()
            self.codec = PYTHON_CODECS.get(key, self.codec)

    def decode(self, raw: bytes) -> str:
        """A name's bytes in the script's encoding (as psycopg2 decodes it for the same database)."""
        return raw.decode(self.codec, "replace")

    def _next(self, *, at_start: bool) -> _Token | None:
        text = self.text
        while self.pos < len(text):
            c = text[self.pos : self.pos + 1]
            if c.isspace():
                self.pos += 1
            elif text.startswith(b"--", self.pos):
                end = text.find(b"\n", self.pos)
                self.pos = len(text) if end < 0 else end + 1
            elif text.startswith(b"/*", self.pos):
                self._block_comment()
            elif c == b"\\" and at_start:
                end = text.find(b"\n", self.pos)
                self.pos = len(text) if end < 0 else end + 1
                return _Token("meta", b"")
            else:
                return self._token(c)
        return None

    def _token(self, c: bytes) -> _Token:
        text = self.text
        if c == b"'":
            return _Token("string", self._string(escapes=not self.standard_strings))
        if c in (b"E", b"e") and text.startswith(b"'", self.pos + 1):
            self.pos += 1
            return _Token("string", self._string(escapes=True))
        if c == b'"':
            return _Token("ident", self._quoted_identifier())
        if c == b"$" and (m := _DOLLAR_TAG.match(text, self.pos)):
            end = text.find(m.group(0), m.end())
            if end < 0:
                raise ToolError("pg_restore's script ends inside a dollar-quoted string.")
            self.pos = end + len(m.group(0))
            return _Token("string", text[m.end() : end])
        if _WORD_START.match(c):
            start, self.pos = self.pos, _WORD.match(text, self.pos + 1).end()
            return _Token("word", text[start : self.pos].lower())  # bytes.lower folds ASCII letters only
        if c.isdigit():
            m = _NUMBER.match(text, self.pos)
            self.pos = m.end()
            return _Token("number", m.group(0))
        self.pos += 1
        return _Token("punct", c)

    def _block_comment(self) -> None:
        depth, self.pos = 1, self.pos + 2  # block comments nest in PostgreSQL
        while depth:
            opens, closes = self.text.find(b"/*", self.pos), self.text.find(b"*/", self.pos)
            if closes < 0:
                raise ToolError("pg_restore's script ends inside a comment.")
            if 0 <= opens < closes:
                depth, self.pos = depth + 1, opens + 2
            else:
                depth, self.pos = depth - 1, closes + 2

    def _quoted_identifier(self) -> bytes:
        out = bytearray()
        self.pos += 1
        while True:
            end = self.text.find(b'"', self.pos)
            if end < 0:
                raise ToolError("pg_restore's script ends inside a quoted identifier.")
            out += self.text[self.pos : end]
            self.pos = end + 1
            if not self.text.startswith(b'"', self.pos):
                return bytes(out)
            out += b'"'
            self.pos += 1

    def _string(self, *, escapes: bool) -> bytes:
        """A string literal from its opening quote; literals separated only by
        whitespace holding a newline are one, as in PostgreSQL."""
        out = bytearray()
        while True:
            out += self._one_literal(escapes=escapes)
            m = _NEXT_LITERAL.match(self.text, self.pos)
            if not m:
                return bytes(out)
            self.pos = m.end() - 1

    def _one_literal(self, *, escapes: bool) -> bytes:
        text, out = self.text, bytearray()
        self.pos += 1
        while True:
            if self.pos >= len(text):
                raise ToolError("pg_restore's script ends inside a string literal.")
            c = text[self.pos : self.pos + 1]
            if c == b"'":
                if text.startswith(b"'", self.pos + 1):
                    out += b"'"
                    self.pos += 2
                    continue
                self.pos += 1
                return bytes(out)
            if c == b"\\" and escapes:
                out += self._escape()
                continue
            out += c
            self.pos += 1

    def _escape(self) -> bytes:
        """One backslash escape of an escape string (E'...', or any string while
        standard_conforming_strings is off)."""
        text = self.text
        c = text[self.pos + 1 : self.pos + 2]
        if m := _OCTAL.match(text, self.pos + 1):
            self.pos = m.end()
            return bytes([int(m.group(0), 8) & 0xFF])
        if m := _HEX.match(text, self.pos + 1):
            self.pos = m.end()
            return bytes([int(m.group(1), 16)])
        if m := _UNICODE.match(text, self.pos + 1):
            self.pos = m.end()
            return chr(int(m.group(1) or m.group(2), 16)).encode(self.codec, "replace")
        self.pos += 2
        return _SIMPLE_ESCAPES.get(c, c)


def setval_positions(script: bytes) -> dict[str, list]:
    """``qualified(schema, name)`` -> [value, is_called] for every
    ``SELECT pg_catalog.setval('<name>', N, true|false);`` of a pg_restore script."""
    reader = _Script(script)
    positions: dict[str, list] = {}
    for tokens in reader.statements():
        plain = [t.value if t.kind in ("word", "punct") else None for t in tokens]
        if plain[:4] == [b"select", b"pg_catalog", b".", b"setval"]:
            found = _setval_arguments(tokens[4:])
        elif plain[:2] == [b"select", b"setval"]:
            found = _setval_arguments(tokens[2:])
        else:
            continue
        if found is None:
            raise ToolError(f"pg_restore's script holds a setval this reader does not understand: {_shown(tokens)}.")
        name, value, called = found
        schema, sequence = split_qualified_name(reader.decode(name))
        positions[qualified(schema, sequence)] = [value, called]
    return positions


def _setval_arguments(tokens: list[_Token]) -> tuple[bytes, int, bool] | None:
    """``('name', [-]N[, true|false])`` -> (name, N, is_called); None for any other shape."""
    sign = 1
    if len(tokens) > 3 and tokens[3] == _Token("punct", b"-"):
        sign, tokens = -1, tokens[:3] + tokens[4:]
    if len(tokens) == 5:  # setval(name, N): is_called true
        tokens = [*tokens[:4], _Token("punct", b","), _Token("word", b"true"), tokens[4]]
    if len(tokens) != 7:
        return None
    opening, name, comma, number, second_comma, called, closing = tokens
    punctuation = [t == _Token("punct", v) for t, v in ((opening, b"("), (comma, b","), (second_comma, b","), (closing, b")"))]
    if not all(punctuation) or name.kind != "string" or number.kind != "number" or not number.value.isdigit():
        return None
    if called.kind != "word" or called.value not in (b"true", b"false"):
        return None
    return name.value, sign * int(number.value), called.value == b"true"


def _shown(tokens: list[_Token]) -> str:
    return " ".join(t.value.decode("utf-8", "replace") for t in tokens)[:200]


def split_qualified_name(text: str) -> tuple[str, str]:
    """``schema.name`` as pg_dump writes it into setval (fmtQualifiedId: each part quoted
    where PostgreSQL would need it, exactly as ``fingerprint.qualified`` writes keys),
    read back by the one parser of such names. Never split on a dot inside quotes."""
    if text.startswith('"') and text.count('"') % 2:
        raise ToolError(f"An unterminated quoted name in pg_restore's script: {text!r}.")
    try:
        return split_qualified(text)
    except ValueError:
        raise ToolError(f"pg_restore's script sets the sequence {text!r} without its schema.") from None
