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


def _installation(bin_dir: Path) -> tuple[Path, list[Path]]:
    """The folder an installation hangs from, and the folders to copy from it (relative):
    bin, lib and share beside bin_dir, and, for binaries in a Python wheel, the
    ``<package>.libs`` folder beside the package, which their run path points into."""
    home = bin_dir.parent
    for anchor in home.parents:
        top = bin_dir.relative_to(anchor).parts[0]
        if (anchor / f"{top}.libs").is_dir():
            break
    else:
        anchor, top = home.parent, ""
    parts = [(home / p).relative_to(anchor) for p in ("bin", "lib", "share") if (home / p).is_dir()]
    if top:
        parts.append(Path(f"{top}.libs"))
    return anchor, parts


def reachable_bin_dir(bin_dir: Path, major: int, account: pwd.struct_passwd | None) -> Path:
    """``bin_dir`` where the server's account can run from it; otherwise a copy of its
    installation, made once, in /var/lib/rollback-toolkit/postgresql/."""
    if account is None or reachable(account, bin_dir / "postgres"):
        return bin_dir
    anchor, parts = _installation(bin_dir)
    binary = (bin_dir / "postgres").stat()
    digest = hashlib.sha256(f"{bin_dir.resolve()}:{binary.st_size}:{binary.st_mtime_ns}".encode()).hexdigest()[:12]
    dest = SHARED_HOME / "postgresql" / f"{major}-{digest}"
    copied_bin = dest / bin_dir.relative_to(anchor)
    if (copied_bin / "postgres").is_file():
        return copied_bin
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
    log.info("copied PostgreSQL %s from %s to %s, where user %s can run it", major, anchor, dest, account.pw_name)
    return copied_bin


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
