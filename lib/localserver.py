"""Throwaway PostgreSQL servers on this machine (initdb + pg_ctl), for the demo,
the benchmark and the tests. As root, the server runs as the unprivileged
``postgres`` user, because initdb and postgres refuse to run as root."""

from __future__ import annotations

import logging
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote

from .errors import RollbackError
from .pgtools import embedded_bin_dirs, probe

log = logging.getLogger(__name__)

RUN_AS = "postgres"


class ServerStartError(RollbackError):
    pass


def debian_bin_dir(major: int) -> Path | None:
    path = Path(f"/usr/lib/postgresql/{major}/bin")
    return path if (path / "postgres").is_file() else None


def embedded_bin_dir() -> Path | None:
    dirs = [d for d in embedded_bin_dirs() if (d / "postgres").is_file()]
    return dirs[0] if dirs else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        self.bin_dir = Path(bin_dir)
        version = probe(self.bin_dir / "postgres")
        if version is None:
            raise ServerStartError(f"{self.bin_dir / 'postgres'} does not run.")
        self.major = version[0]
        self.base_dir = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix=f"rollback-pg{self.major}-"))
        self.data_dir = self.base_dir / "data"
        self.port = port or free_port()
        self.user = "postgres"
        self.password = password or secrets.token_urlsafe(12)
        self.fast = fast
        self._as_root = os.geteuid() == 0

    def _run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        if self._as_root:
            account = pwd.getpwnam(RUN_AS)
            kwargs.update(user=account.pw_uid, group=account.pw_gid, extra_groups=[])
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        return subprocess.run(
            argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env, cwd=self.base_dir, **kwargs
        )

    def _chown(self, path: Path) -> None:
        if self._as_root:
            account = pwd.getpwnam(RUN_AS)
            os.chown(path, account.pw_uid, account.pw_gid)

    def init(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.base_dir.chmod(0o755)
        self._chown(self.base_dir)
        pwfile = self.base_dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        self._chown(pwfile)
        out = self._run(
            [
                str(self.bin_dir / "initdb"),
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
            ]
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
        out = self._run(
            [
                str(self.bin_dir / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.base_dir / "server.log"),
                "-w",
                "-t",
                "60",
                "start",
            ]
        )
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
        out = self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "status"])
        return out.returncode == 0

    def stop(self) -> None:
        self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"])

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def url(self, dbname: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        user = user or self.user
        password = self.password if password is None else password
        return f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{self.port}/{quote(dbname, safe='')}"
