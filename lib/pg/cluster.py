"""The cluster behind staging, when it runs on this machine: its data directory, who
owns it, its configuration and binaries. The toolkit needs it where it works on the
cluster's files rather than through SQL: the filesystem probe of the server's copies,
pgBackRest's restores, a cluster stopped and started for an in-place restore.

"On this machine" is decided by evidence, not by the host name: the data directory the
server reports holds a postmaster.pid whose start time is the server's own."""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path

import psycopg2

from lib.errors import ConfigError
from lib.pg.db import query, scalar
from lib.pg.tools import discover


@dataclass
class LocalCluster:
    data_dir: Path
    config_file: Path
    owner: pwd.struct_passwd
    major: int
    port: int
    superuser: str  # the bootstrap superuser (oid 10): the role a private side server is entered as
    tablespaces: dict[str, Path]  # name: folder, every tablespace but the two built in

    def run_as(self) -> pwd.struct_passwd | None:
        """Whom the cluster's programs run as: nobody else when this process is its owner;
        its owner when this process is root; anyone else may not touch its files."""
        if os.geteuid() == self.owner.pw_uid:
            return None
        if os.geteuid() == 0:
            return self.owner
        raise ConfigError(
            f"The cluster in {self.data_dir} belongs to {self.owner.pw_name}, and this runs as "
            f"{pwd.getpwuid(os.geteuid()).pw_name}: its files can only be worked on by their owner.",
            f"Run the command as {self.owner.pw_name} (sudo -u {self.owner.pw_name} …) or as root.",
        )

    def bin_dir(self, settings) -> Path:
        """postgres and pg_ctl of the cluster's own major."""
        tools, looked = discover("pg_ctl", settings)
        for tool in tools:
            if tool.major == self.major and (tool.path.parent / "postgres").is_file():
                return tool.path.parent
        raise ConfigError(
            f"No PostgreSQL {self.major} server binaries (pg_ctl and postgres) were found on this machine.",
            f"Install them (Debian: postgresql-{self.major}) or point PG_BIN_DIR at them. Places looked: "
            + "; ".join(looked[:6])
            + ".",
        )


def readable_setting(conn, name: str) -> str | None:
    """A setting only some roles may read (superuser, pg_read_all_settings); None for the others."""
    try:
        return scalar(conn, "SELECT current_setting(%s, true)", (name,))
    except psycopg2.Error:
        return None


def _started_here(conn, data_dir: Path) -> bool:
    """The data directory's postmaster.pid is this very server's: the same port, and a start
    time at most two minutes before the one the server reports (the lock file is written
    early in the postmaster's start, its start time taken once shared memory is made:
    seconds apart with large shared_buffers or slow preloaded libraries)."""
    started, port = query(
        conn, "SELECT floor(extract(epoch FROM pg_postmaster_start_time()))::bigint, current_setting('port')::int"
    )[0]
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
        return int(lines[3]) == int(port) and -1 <= int(started) - int(lines[2]) <= 120
    except (OSError, ValueError, IndexError):
        return False


def find_local_cluster(conn) -> LocalCluster | None:
    """The cluster ``conn`` is connected to, when it runs on this machine and this process
    may see its data directory; None otherwise."""
    data_dir = readable_setting(conn, "data_directory")
    if not data_dir or not _started_here(conn, Path(data_dir)):
        return None
    path = Path(data_dir)
    spaces = query(
        conn,
        "SELECT spcname, pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global')",
    )
    return LocalCluster(
        data_dir=path,
        config_file=Path(readable_setting(conn, "config_file") or path / "postgresql.conf"),
        owner=pwd.getpwuid(path.stat().st_uid),
        major=int(scalar(conn, "SELECT current_setting('server_version_num')::int / 10000")),
        port=int(scalar(conn, "SELECT current_setting('port')::int")),
        superuser=scalar(conn, "SELECT rolname FROM pg_roles WHERE oid = 10"),
        tablespaces={name: Path(location) for name, location in spaces},
    )


def local_cluster(conn, *, needed_for: str) -> LocalCluster:
    """As ``find_local_cluster``, or why not, as an error naming the fix."""
    found = find_local_cluster(conn)
    data_dir = readable_setting(conn, "data_directory") if found is None else None
    host = conn.info.host or ""
    here = host.startswith("/") or host in ("localhost", "127.0.0.1", "::1")
    if here and data_dir and Path(data_dir).exists() and not os.access(Path(data_dir) / "postmaster.pid", os.R_OK):
        raise ConfigError(
            f"{needed_for} works on the cluster's files in {data_dir}, which this user (uid {os.getuid()}) may not read.",
            f"Run the command as the cluster's owner ({_name_of(Path(data_dir).stat().st_uid)}) or as root.",
        )
    if found is None:
        raise ConfigError(
            f"{needed_for} works on the cluster's files, so it runs on the database server itself, as a role that may "
            "read the server's data_directory (a superuser, or a member of pg_read_all_settings); here the server's "
            "data directory is not visible.",
            "Run the command on the database server, with a superuser URL.",
        )
    return found


def _name_of(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
