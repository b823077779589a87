"""Small things every layer uses: private folders and files, fsync, checksums, clocks,
sizes and slugs. Imports nothing of the toolkit."""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from datetime import UTC, datetime
from pathlib import Path


def slugify(text: str, limit: int = 40) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "_", ascii_text.lower()).strip("_")
    return slug[:limit].rstrip("_") or "point"


def utc_now() -> datetime:
    return datetime.now(UTC)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)  # whatever the umask said


def write_private_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


_sha256_seen: dict[tuple[str, int, int, int], str] = {}


def sha256_file(path: Path) -> str:
    """Memoised per process on (path, inode, size, mtime): choosing a point and then
    restoring it checks the same archive twice, and it may be gigabytes."""
    st = os.stat(path)
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _sha256_seen:
        _sha256_seen[key] = _hash_file(path)
    return _sha256_seen[key]


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def percent(fraction: float) -> str:
    """A rate as people read it, one decimal at most: 0.10149 is '10.1%', 0.1 is '10%'.
    Every rate the toolkit prints goes through here, once, from the exact fraction, so
    that it reads the same in a progress line, an error and a summary."""
    text = f"{fraction * 100:.1f}"
    return text.removesuffix(".0") + "%"


def age(created_at: str | None) -> str:
    if not created_at:
        return "?"
    try:
        delta = datetime.now(UTC) - datetime.fromisoformat(created_at)
    except ValueError:
        return "?"
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"
