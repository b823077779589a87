"""Encrypted points: every payload file in the age format (pyrage), written and read
as a stream through a pipe, so no plaintext copy of the data ever touches the disk.
The files open with the standard ``age`` tool (``age -d -i key.txt file.age``).

Fail closed: encryption asked for without a recipient is refused before anything
is written; a point whose files are encrypted is never read without the key, and a
wrong key is named before anything is touched."""

from __future__ import annotations

import io
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyrage
from pyrage import ssh, x25519

from lib.config import Settings
from lib.errors import ConfigError, EncryptionError, RollbackError, VerificationError
from lib.points.catalog import Point

log = logging.getLogger(__name__)

SUFFIX = ".age"
CHUNK = 1 << 20


def _parse_recipient(text: str):
    try:
        return ssh.Recipient.from_str(text) if text.startswith("ssh-") else x25519.Recipient.from_str(text)
    except Exception as exc:  # noqa: BLE001 - pyrage raises its own types
        raise ConfigError(
            f"{text[:20]}… is not an age recipient ({exc}).",
            "ROLLBACK_ENCRYPT_TO takes age public keys (age1…) or ssh public keys, separated by commas or spaces, "
            "or the path of a file with one per line.",
        ) from None


def recipients(settings: Settings) -> list:
    """ROLLBACK_ENCRYPT_TO: recipients, or a file of them (one per line, # comments)."""
    value = (settings.encrypt_to or "").strip()
    if not value:
        raise ConfigError(
            "Encryption was asked for, and ROLLBACK_ENCRYPT_TO names no recipient: nothing was written.",
            "Set ROLLBACK_ENCRYPT_TO to an age public key (age-keygen prints one) or to a file of them.",
        )
    path = Path(value).expanduser()
    if path.is_file():
        lines = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
        texts = [ln for ln in lines if ln]
        if not texts:
            raise ConfigError(f"The recipients file {path} names no recipient.", "Put one age public key per line.")
    else:
        texts = [t for t in value.replace(",", " ").split() if t]
    return [_parse_recipient(t) for t in texts]


def recipients_if_asked(settings: Settings) -> list | None:
    """The recipients when encryption is asked for (refused without one), else None."""
    return recipients(settings) if settings.encrypt else None


def identities(settings: Settings, point_id: str) -> list:
    """ROLLBACK_DECRYPT_KEY_FILE: an age identity file (AGE-SECRET-KEY-1… lines)."""
    value = (settings.decrypt_key_file or "").strip()
    if not value:
        raise EncryptionError(
            f"Point {point_id} is encrypted, and ROLLBACK_DECRYPT_KEY_FILE is not set: nothing was touched.",
            "Set ROLLBACK_DECRYPT_KEY_FILE to the age identity file whose public key the point was encrypted to.",
        )
    path = Path(value).expanduser()
    try:
        text = path.read_text()
    except OSError as exc:
        raise EncryptionError(
            f"The key file {path} cannot be read ({exc.strerror or exc}): nothing was touched.",
            "Check ROLLBACK_DECRYPT_KEY_FILE.",
        ) from None
    if path.stat().st_mode & 0o077:
        log.warning("the key file %s can be read by others (mode %o)", path, path.stat().st_mode & 0o777)
    keys = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("AGE-SECRET-KEY-"):
            try:
                keys.append(x25519.Identity.from_str(line))
            except Exception:  # noqa: BLE001
                raise EncryptionError(f"The key file {path} holds a malformed key.", "Check the file.") from None
    if not keys:
        raise EncryptionError(f"The key file {path} holds no age secret key (AGE-SECRET-KEY-1…).", "Check the file.")
    return keys


def is_encrypted(point: Point) -> bool:
    return point.manifest.encrypted


def manifest_section() -> dict:
    return {"format": "age", "suffix": SUFFIX, "tool": f"pyrage {getattr(pyrage, '__version__', '')}".strip()}


# ------------------------------------------------------------------ writing


class _Tapped(io.RawIOBase):
    """A plaintext stream that shows the chunks read from it to ``tap`` on the way,
    until ``tap`` answers that it wants no more."""

    def __init__(self, src: io.BufferedReader, tap: Callable[[memoryview], bool]) -> None:
        super().__init__()
        self.src, self.tap = src, tap

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.src.readinto(buffer)
        if n and self.tap is not None and not self.tap(memoryview(buffer)[:n]):
            self.tap = None
        return n


@contextmanager
def encrypting(dest: Path, to: list, *, tap: Callable[[memoryview], bool] | None = None) -> Iterator[io.BufferedWriter]:
    """A pipe whose plaintext is encrypted into ``dest`` as it arrives. Write to it, or
    hand ``.fileno()`` to a child process (as /dev/fd/N, with pass_fds). ``tap`` is
    shown the plaintext as it passes, in memory, until it answers False (a point keeps
    its archive's head to read back what the archive sets)."""
    read_fd, write_fd = os.pipe()
    errors: list[BaseException] = []

    def pump() -> None:
        try:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(read_fd, "rb", buffering=CHUNK) as src, os.fdopen(fd, "wb") as out:
                pyrage.encrypt_io(_Tapped(src, tap) if tap else src, out, to)
                out.flush()
                os.fsync(out.fileno())
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread below
            errors.append(exc)

    thread = threading.Thread(target=pump, name=f"encrypt {dest.name}", daemon=True)
    thread.start()
    writer = os.fdopen(write_fd, "wb", buffering=CHUNK)
    try:
        yield writer
    finally:
        writer.close()  # end of the plaintext: the pump finishes the file
        thread.join()
    if errors:
        raise EncryptionError(f"Encrypting {dest} failed: {errors[0]}.", "Nothing was kept.") from errors[0]


# ------------------------------------------------------------------ reading


class _FirstBytes(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        raise _Opened


class _Opened(Exception):
    pass


def check_key(path: Path, keys: list, point_id: str) -> None:
    """The key opens the file (its header and first chunk), before anything is touched."""
    try:
        with open(path, "rb") as f:
            pyrage.decrypt_io(f, _FirstBytes(), keys)
    except _Opened:
        return  # the sink's exception comes through as it is: the key opened the file
    except Exception as exc:  # noqa: BLE001 - pyrage's errors, and unreadable files
        raise _explain(exc, path, point_id) from None


def _explain(exc: BaseException, path: Path, point_id: str) -> RollbackError:
    text = str(exc)
    if "no matching keys" in text.lower() or "no identity matched" in text.lower():
        return EncryptionError(
            f"The key in ROLLBACK_DECRYPT_KEY_FILE does not open point {point_id} ({path.name}): nothing was touched.",
            "Use the identity whose public key was in ROLLBACK_ENCRYPT_TO when the point was taken.",
        )
    return VerificationError(
        f"{path} does not decrypt ({text}): the file is damaged. Nothing was touched.",
        "Use an earlier point (`python3 rollback_manager.py list`).",
    )


@contextmanager
def decrypting(path: Path, keys: list, point_id: str) -> Iterator[io.BufferedReader]:
    """A pipe carrying ``path``'s plaintext as it is decrypted. Read it, or hand
    ``.fileno()`` to a child process. A reader may stop early (a table of contents)."""
    read_fd, write_fd = os.pipe()
    errors: list[BaseException] = []

    def pump() -> None:
        try:
            with open(path, "rb") as src, os.fdopen(write_fd, "wb", buffering=CHUNK) as out:
                pyrage.decrypt_io(src, out, keys)
        except BrokenPipeError:
            pass  # the reader had what it needed
        except BaseException as exc:  # noqa: BLE001
            if "Broken pipe" not in str(exc):
                errors.append(exc)

    thread = threading.Thread(target=pump, name=f"decrypt {path.name}", daemon=True)
    thread.start()
    reader = os.fdopen(read_fd, "rb", buffering=CHUNK)
    try:
        yield reader
    except BaseException:
        reader.close()
        thread.join()
        if errors:  # the reader failed because the file did not decrypt: say that
            raise _explain(errors[0], path, point_id) from None
        raise
    reader.close()
    thread.join()
    if errors:
        raise _explain(errors[0], path, point_id)


@contextmanager
def payload(point: Point, name: str, settings: Settings) -> Iterator[io.BufferedReader]:
    """A point's file as plaintext: the file itself, or decrypted through a pipe."""
    path = point.file_path(name)
    if not name.endswith(SUFFIX):
        with open(path, "rb") as f:
            yield f
        return
    with decrypting(path, identities(settings, point.id), point.id) as stream:
        yield stream


def check_point_keys(point: Point, settings: Settings) -> None:
    """Every encrypted file of the point opens with the key: called before a restore starts."""
    if not is_encrypted(point):
        return
    keys = identities(settings, point.id)
    for entry in point.manifest.files:
        if entry.name.endswith(SUFFIX):
            check_key(point.file_path(entry.name), keys, point.id)
