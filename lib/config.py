"""Settings (flag > environment > .env > default), URL parsing and masking."""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import psycopg2.extensions
from dotenv import dotenv_values

from lib.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Every password seen while parsing URLs; the log filter blanks them out wherever
# they might slip into a message.
_SECRETS: set[str] = set()

# libpq parameters that map onto environment variables for child processes.
_ENV_PARAMS = {
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "options": "PGOPTIONS",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "application_name": "PGAPPNAME",
}


def loose_password_file() -> str | None:
    """A warning when the password file libpq would read is open to others."""
    path = Path(os.environ.get("PGPASSFILE") or Path.home() / ".pgpass").expanduser()
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return None
    if mode & 0o077:
        return (
            f"{path} can be read by others (mode {mode:o}): libpq ignores such a file, and the passwords in it are "
            f"exposed. Run: chmod 600 {path}"
        )
    return None


def redact(text: str) -> str:
    """Blank out every known password and any password inside a URL."""
    for secret in sorted(_SECRETS, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "***")
    text = re.sub(r"([a-zA-Z][\w+.-]*://[^:/@\s]*):(?!PASSWORD@)[^@\s]*@", r"\1:***@", text)
    return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", text, flags=re.I)


@dataclass(frozen=True)
class ConnInfo:
    """A parsed connection target. ``password`` never leaves this object
    except through a passfile or a psycopg2 connect call."""

    host: str | None
    port: int
    user: str | None
    dbname: str
    password: str | None = field(default=None, repr=False)
    params: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, url: str, what: str = "database URL") -> ConnInfo:
        if not url or not url.strip():
            raise ConfigError(f"The {what} is empty.")
        url = url.strip()
        if "://" in url and not re.match(r"^postgres(ql)?://", url):
            raise ConfigError(
                f"The {what} {redact(url)!r} is not a PostgreSQL URL.",
                "Write it as postgresql://USER:PASSWORD@HOST:5432/DBNAME.",
            )
        try:
            parts = psycopg2.extensions.parse_dsn(url)
        except psycopg2.ProgrammingError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unparsable"
            raise ConfigError(
                f"The {what} {redact(url)!r} is malformed ({redact(first)}).",
                "Write it as postgresql://USER:PASSWORD@HOST:5432/DBNAME.",
            ) from None
        password = parts.pop("password", None)
        if password:
            _SECRETS.add(password)
        dbname = parts.pop("dbname", None)
        if not dbname:
            raise ConfigError(
                f"The {what} {redact(url)!r} names no database.",
                "Add the database name after the last slash: postgresql://user@host:5432/dbname.",
            )
        host = parts.pop("host", None)
        port_text = parts.pop("port", None) or "5432"
        try:
            port = int(port_text)
        except ValueError:
            raise ConfigError(
                f"The {what} has a port that is not a number: {port_text!r}.",
                "Write it as postgresql://USER:PASSWORD@HOST:5432/DBNAME.",
            ) from None
        user = parts.pop("user", None)
        return cls(host, port, user, dbname, password, tuple(sorted(parts.items())))

    def masked(self) -> str:
        """The URL with the password replaced by ***; safe for logs, manifests, audit."""
        user = quote(self.user or "", safe="")
        auth = f"{user}:***@" if self.password else (f"{user}@" if user else "")
        host = self.host or "localhost"
        if "," in host or host.startswith("/"):
            host = quote(host, safe="")
        query = "&".join(f"{k}={quote(v, safe='')}" for k, v in self.params)
        return f"postgresql://{auth}{host}:{self.port}/{quote(self.dbname, safe='')}" + (f"?{query}" if query else "")

    def server_label(self) -> str:
        return f"{self.host or 'localhost'}:{self.port}"

    def connect_kwargs(self, dbname: str | None = None) -> dict[str, object]:
        kwargs: dict[str, object] = {"dbname": dbname or self.dbname, "port": self.port}
        if self.host:
            kwargs["host"] = self.host
        if self.user:
            kwargs["user"] = self.user
        if self.password is not None:
            kwargs["password"] = self.password
        kwargs.update(dict(self.params))
        kwargs.setdefault("connect_timeout", "10")
        return kwargs

    def tool_args(self, dbname: str | None = None) -> list[str]:
        """Connection flags for pg_dump / pg_restore / psql; no password."""
        args = ["--no-password", "-p", str(self.port)]
        if self.host:
            args += ["-h", self.host]
        if self.user:
            args += ["-U", self.user]
        return args + ["-d", dbname or self.dbname]

    def tool_env(self, passfile: Path | None) -> dict[str, str]:
        env = child_environment()
        for key, value in self.params:
            if key in _ENV_PARAMS:
                env[_ENV_PARAMS[key]] = value
        if passfile is not None:
            env["PGPASSFILE"] = str(passfile)
        env.setdefault("PGCONNECT_TIMEOUT", "10")
        return env


TOOLKIT_URLS = ("STAGING_DATABASE_URL", "V2_DATABASE_URL")  # with their passwords: never handed to another program
_NOT_FOR_CHILDREN = ("LANGUAGE", *TOOLKIT_URLS)


def child_environment() -> dict[str, str]:
    """The environment every child process starts from: no PG* variable of the caller's
    (connections are given explicitly), and messages in English (LC_MESSAGES=C), since
    the toolkit reads what the tools say; the character type is kept as it was. The
    toolkit's own URLs (and the passwords in them) are left out too."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and k not in _NOT_FOR_CHILDREN}
    every = env.pop("LC_ALL", None)
    if every:
        env.setdefault("LC_CTYPE", every)
    env["LC_MESSAGES"] = "C"
    return env


def _passfile_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def passfile_line(info: ConnInfo) -> str:
    return ":".join(_passfile_escape(x) for x in ("*", "*", "*", "*", info.password or "")) + "\n"


@dataclass
class Settings:
    staging_url: str | None
    v2_url: str | None
    backup_dir: Path
    log_dir: Path
    pg_bin_dirs: list[Path]
    pg_bin_dir_only: bool
    restore_jobs: int
    dump_jobs: int = 1  # DUMP_JOBS (or --jobs): pg_dump's parallel jobs for a dump point
    rollback_method: str = "auto"
    file_copy_method: str = "auto"  # FILE_COPY_METHOD: auto (by evidence), copy or clone
    rollback_spare: bool = True
    rollback_undo: str = "on"  # ROLLBACK_UNDO: on | keyed | off, a production run's undo log (run_migration.py)
    protected_databases: tuple[str, ...] = ()  # PROTECTED_DATABASES: their name must be typed to change them
    encrypt_to: str | None = None  # ROLLBACK_ENCRYPT_TO: age recipients, or a file of them
    decrypt_key_file: str | None = None  # ROLLBACK_DECRYPT_KEY_FILE: the age identity file
    encrypt: bool = False  # --encrypt, or ROLLBACK_ENCRYPT_TO set: payload files in the age format
    before_swap: tuple[str, ...] = ()  # ROLLBACK_BEFORE_SWAP: a command (no shell) run just before a swap
    after_swap: tuple[str, ...] = ()  # ROLLBACK_AFTER_SWAP: run just after it, also when it failed
    hook_timeout: int = 60  # ROLLBACK_HOOK_TIMEOUT: seconds either may take
    keep_before_states: int = 3  # KEEP_BEFORE_STATES: states kept before rollbacks, per database (0: all)
    pgbackrest_env: dict[str, str] = field(default_factory=dict)  # PGBACKREST_*: pgBackRest's own settings
    pitr_side_dir: Path | None = None  # PITR_SIDE_DIR: where a point's cluster is restored beside staging
    archive_timeout: int = 120  # PITR_ARCHIVE_TIMEOUT: seconds to wait for a WAL segment to be archived

    @property
    def pgbackrest_stanza(self) -> str | None:
        return self.pgbackrest_env.get("PGBACKREST_STANZA") or None

    def staging(self) -> ConnInfo:
        if not self.staging_url:
            raise ConfigError(
                "STAGING_DATABASE_URL is not set, so there is no database to work on.",
                "Set it in the environment or in .env "
                "(STAGING_DATABASE_URL=postgresql://USER:PASSWORD@HOST:5432/staging), "
                "or pass --database-url.",
            )
        return ConnInfo.parse(self.staging_url, "staging database URL")

    def v2(self) -> ConnInfo | None:
        return ConnInfo.parse(self.v2_url, "V2 database URL") if self.v2_url else None


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}.", f"Set {name} to one of them, or leave it out.")
    return value


def _command(name: str, text: str | None) -> tuple[str, ...]:
    """A command line split as a shell would split it, but run without one."""
    if not text or not text.strip():
        return ()
    try:
        return tuple(shlex.split(text))
    except ValueError as exc:
        raise ConfigError(
            f"{name} cannot be split into a command and its arguments ({exc}).",
            "Quote it as in a shell, without pipes or redirections (it runs without a shell).",
        ) from None


def usable_cores() -> int:
    """The cores this process may run on (its affinity), the default of every job count."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def load_settings(
    *,
    staging_url: str | None = None,
    v2_url: str | None = None,
    backup_dir: str | None = None,
    env_file: Path | None = None,
    encrypt: bool = False,
    jobs: int | None = None,
) -> Settings:
    """flag > environment > .env > default."""
    dotenv_path = env_file or Path(os.environ.get("ROLLBACK_ENV_FILE", PROJECT_ROOT / ".env"))
    file_values = {k: v for k, v in dotenv_values(dotenv_path).items() if v is not None} if dotenv_path.is_file() else {}

    def pick(flag: str | None, name: str, default: str | None = None) -> str | None:
        if flag:
            return flag
        if os.environ.get(name):
            return os.environ[name]
        return file_values.get(name) or default

    def as_path(value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else PROJECT_ROOT / path

    bin_dirs = pick(None, "PG_BIN_DIR", "") or ""
    cores = str(usable_cores())

    def whole(name: str, default: str, flag: int | None = None, least: int = 1) -> int:
        text = str(flag) if flag is not None else (pick(None, name, default) or default)
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, not {text!r}.") from None
        if value < least:
            raise ConfigError(f"{name} must be at least {least}, not {value}.")
        return value

    return Settings(
        staging_url=pick(staging_url, "STAGING_DATABASE_URL"),
        v2_url=pick(v2_url, "V2_DATABASE_URL"),
        backup_dir=as_path(pick(backup_dir, "BACKUP_DIR", "backups") or "backups"),
        log_dir=as_path(pick(None, "LOG_DIR", "logs") or "logs"),
        pg_bin_dirs=[Path(p) for p in bin_dirs.split(":") if p],
        pg_bin_dir_only=(pick(None, "PG_BIN_DIR_ONLY", "") or "").lower() in ("1", "true", "yes"),
        restore_jobs=whole("RESTORE_JOBS", cores),
        dump_jobs=whole("DUMP_JOBS", cores, jobs),
        rollback_method=(pick(None, "ROLLBACK_METHOD", "auto") or "auto").strip().lower(),
        file_copy_method=_one_of(
            "FILE_COPY_METHOD", (pick(None, "FILE_COPY_METHOD", "auto") or "auto").strip().lower(), ("auto", "copy", "clone")
        ),
        rollback_spare=(pick(None, "ROLLBACK_SPARE", "1") or "1").strip().lower() not in ("0", "false", "no", "off"),
        rollback_undo=_one_of(
            "ROLLBACK_UNDO", (pick(None, "ROLLBACK_UNDO", "on") or "on").strip().lower(), ("on", "keyed", "off")
        ),
        protected_databases=tuple(n.strip() for n in (pick(None, "PROTECTED_DATABASES", "") or "").split(",") if n.strip()),
        encrypt_to=pick(None, "ROLLBACK_ENCRYPT_TO"),
        decrypt_key_file=pick(None, "ROLLBACK_DECRYPT_KEY_FILE"),
        encrypt=encrypt or bool(pick(None, "ROLLBACK_ENCRYPT_TO")),
        before_swap=_command("ROLLBACK_BEFORE_SWAP", pick(None, "ROLLBACK_BEFORE_SWAP")),
        after_swap=_command("ROLLBACK_AFTER_SWAP", pick(None, "ROLLBACK_AFTER_SWAP")),
        hook_timeout=whole("ROLLBACK_HOOK_TIMEOUT", "60"),
        keep_before_states=whole("KEEP_BEFORE_STATES", "3", least=0),
        # pgBackRest reads PGBACKREST_* itself; those in .env are handed to it the same way
        pgbackrest_env={k: v for k, v in {**file_values, **os.environ}.items() if k.startswith("PGBACKREST_") and v},
        pitr_side_dir=as_path(side) if (side := pick(None, "PITR_SIDE_DIR")) else None,
        archive_timeout=whole("PITR_ARCHIVE_TIMEOUT", "120"),
    )
