"""The toolkit's rules that need no server: exit codes, settings and their precedence,
URLs and the masking of passwords, the audit trail's reader, the choice of a client
tool by major, and the small pure helpers beneath them. Run alone in seconds:
.venv/bin/python -m pytest -m unit"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lib import audit, config
from lib.config import ConnInfo, child_environment, load_settings, loose_password_file, passfile_line, redact
from lib.errors import (
    EXIT_CODES_HELP,
    CatalogError,
    ConfigError,
    ConfirmationRefused,
    ConnectError,
    ConnectProblem,
    CopyDamaged,
    CopyRejected,
    DatabaseError,
    DiffTimeout,
    EncryptionError,
    ExitCode,
    LockHeld,
    MigrationError,
    NoPointError,
    RollbackError,
    ServerStartError,
    ThresholdExceeded,
    ToolError,
    UndoRefused,
    VerificationError,
    VersionMismatch,
)
from lib.files import human_size, percent, slugify
from lib.pg import tools as pgtools
from lib.pg.backrest import Backup, lsn_value, parse_history
from lib.pg.db import derived_name, split_setting_list
from lib.pg.fingerprint import Fingerprint, compare, schema_differences
from lib.pg.locks import lock_key
from lib.process import Command, Finished, PgRestore, is_version_mismatch
from tests.conftest import ROOT

pytestmark = pytest.mark.unit

PASSWORD = "correct-horse-battery-staple-42"


@pytest.fixture(autouse=True)
def no_passwords_seen_before(monkeypatch):
    """redact() blanks every password any URL parsed in this process had; each test here
    starts from none, so that another test's password cannot hide or cause a result."""
    monkeypatch.setattr(config, "_SECRETS", set())


# ------------------------------------------------------------------ exit codes


def test_exit_codes_are_the_documented_numbers():
    assert {c.name: int(c) for c in ExitCode} == {
        "DONE": 0,
        "FAILED": 1,
        "USAGE": 2,
        "VERIFICATION_FAILED": 3,
        "LOCKED": 4,
        "INTERRUPTED": 130,
    }


# every error the toolkit raises on purpose, and the code a script exits with for it
EXIT_CODE_OF = {
    RollbackError: ExitCode.FAILED,
    ConfigError: ExitCode.USAGE,
    ConfirmationRefused: ExitCode.USAGE,
    DatabaseError: ExitCode.FAILED,
    ConnectError: None,  # by its problem: below
    ToolError: ExitCode.FAILED,
    VersionMismatch: ExitCode.FAILED,
    VerificationError: ExitCode.VERIFICATION_FAILED,
    CopyDamaged: ExitCode.VERIFICATION_FAILED,
    CopyRejected: ExitCode.VERIFICATION_FAILED,
    LockHeld: ExitCode.LOCKED,
    CatalogError: ExitCode.FAILED,
    NoPointError: ExitCode.FAILED,
    EncryptionError: ExitCode.USAGE,
    ServerStartError: ExitCode.FAILED,
    DiffTimeout: ExitCode.FAILED,
    MigrationError: ExitCode.FAILED,
    ThresholdExceeded: ExitCode.FAILED,
    UndoRefused: ExitCode.FAILED,  # nothing was changed; the message says why and names the point restore
}


def _every_subclass(cls: type) -> set[type]:
    return {cls} | {sub for direct in cls.__subclasses__() for sub in _every_subclass(direct)}


def test_every_error_class_maps_to_its_exit_code():
    assert _every_subclass(RollbackError) == set(EXIT_CODE_OF), "an error class without a decided exit code"
    for cls, code in EXIT_CODE_OF.items():
        if code is not None:
            assert cls("it failed").exit_code is code, cls.__name__


# why a connection failed, and the code: a wrong URL is configuration (2), a server that is down a failure to retry (1)
EXIT_CODE_BY_PROBLEM = {
    ConnectProblem.LOGIN_REFUSED: ExitCode.USAGE,
    ConnectProblem.NO_DATABASE: ExitCode.USAGE,
    ConnectProblem.UNREACHABLE: ExitCode.FAILED,
    ConnectProblem.NOT_READY: ExitCode.FAILED,
    ConnectProblem.NOT_ACCEPTING: ExitCode.FAILED,
    ConnectProblem.OTHER: ExitCode.FAILED,
}


def test_a_connection_failure_exits_by_its_problem():
    assert set(EXIT_CODE_BY_PROBLEM) == set(ConnectProblem), "a connection problem without a decided exit code"
    for problem, code in EXIT_CODE_BY_PROBLEM.items():
        assert ConnectError("could not connect", problem=problem).exit_code is code, problem


def test_the_exit_code_help_names_every_code_once():
    named = [int(n) for n in re.findall(r"(?:^|, )(\d+) ", EXIT_CODES_HELP.removeprefix("exit codes: "))]
    assert named == [int(c) for c in ExitCode]


def test_an_error_is_one_paragraph_and_may_be_one_methods_own():
    error = ToolError("pg_dump 15 failed: no route.  ", " Check the server. ")
    assert error.paragraph() == "pg_dump 15 failed: no route. Check the server."
    assert ConfigError("Bad flag.").paragraph() == "Bad flag."
    assert error.another_method_may_work is False
    assert error.only_this_method() is error and error.another_method_may_work is True


# ------------------------------------------------------------------ URLs and passwords


def test_a_url_is_parsed_into_its_parts_and_masked():
    info = ConnInfo.parse(f"postgresql://app%20user:{PASSWORD}@db.example:5433/my%20db?sslmode=require&application_name=x")
    assert (info.host, info.port, info.user, info.dbname, info.password) == ("db.example", 5433, "app user", "my db", PASSWORD)
    assert info.params == (("application_name", "x"), ("sslmode", "require"))
    assert info.masked() == "postgresql://app%20user:***@db.example:5433/my%20db?application_name=x&sslmode=require"
    assert PASSWORD not in repr(info)
    assert info.tool_args() == ["--no-password", "-p", "5433", "-h", "db.example", "-U", "app user", "-d", "my db"]
    assert info.tool_args("other")[-2:] == ["-d", "other"]


def test_a_socket_url_and_a_key_value_string_parse_too():
    socket = ConnInfo.parse("postgres://app@/staging?host=/var/run/postgresql")
    assert (socket.host, socket.port, socket.password) == ("/var/run/postgresql", 5432, None)
    assert socket.masked() == "postgresql://app@%2Fvar%2Frun%2Fpostgresql:5432/staging"
    keywords = ConnInfo.parse(f"host=h dbname=d user=u password={PASSWORD}")
    assert (keywords.host, keywords.dbname, keywords.password) == ("h", "d", PASSWORD)
    assert keywords.masked() == "postgresql://u:***@h:5432/d"


@pytest.mark.parametrize(
    "url, says",
    [
        ("", "is empty"),
        ("   ", "is empty"),
        (f"mysql://u:{PASSWORD}@h/db", "is not a PostgreSQL URL"),
        (f"postgresql://u:{PASSWORD}@h:5432/", "names no database"),
        (f"postgresql://u:{PASSWORD}@h:abc/db", "port that is not a number: 'abc'"),
    ],
)
def test_a_bad_url_is_a_configuration_error_that_never_shows_its_password(url, says):
    with pytest.raises(ConfigError) as caught:
        ConnInfo.parse(url, "staging database URL")
    assert caught.value.exit_code is ExitCode.USAGE
    assert says in caught.value.message and "staging database URL" in caught.value.message
    assert PASSWORD not in caught.value.paragraph()


def test_redact_blanks_passwords_in_urls_in_settings_and_every_one_seen():
    assert redact(f"postgresql://u:{PASSWORD}@h/db") == "postgresql://u:***@h/db"
    assert redact("PGPASSWORD unset; password = 'two words' and password=plain") == (
        "PGPASSWORD unset; password = *** and password=***"
    )
    assert redact("postgresql://u:PASSWORD@h/db") == "postgresql://u:PASSWORD@h/db"  # the placeholder of the examples
    assert redact(f"said {PASSWORD} in a message") == f"said {PASSWORD} in a message"  # not seen yet
    ConnInfo.parse(f"postgresql://u:{PASSWORD}@h/db")
    assert redact(f"said {PASSWORD} in a message") == "said *** in a message"


def test_a_child_gets_the_connection_in_pg_variables_and_english_messages(monkeypatch, tmp_path):
    monkeypatch.setenv("PGHOST", "the-callers-host")
    monkeypatch.setenv("STAGING_DATABASE_URL", f"postgresql://u:{PASSWORD}@h/db")
    monkeypatch.setenv("LANGUAGE", "de")
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    monkeypatch.setenv("KEEP_ME", "1")
    env = child_environment()
    assert "PGHOST" not in env and "STAGING_DATABASE_URL" not in env and "LANGUAGE" not in env and "LC_ALL" not in env
    assert (env["LC_MESSAGES"], env["LC_CTYPE"], env["KEEP_ME"]) == ("C", "de_DE.UTF-8", "1")
    info = ConnInfo.parse(f"postgresql://u:{PASSWORD}@h/db?sslmode=verify-full&connect_timeout=3&application_name=a")
    tool = info.tool_env(tmp_path / "pgpass")
    assert (tool["PGSSLMODE"], tool["PGCONNECT_TIMEOUT"], tool["PGAPPNAME"]) == ("verify-full", "3", "a")
    assert tool["PGPASSFILE"] == str(tmp_path / "pgpass") and PASSWORD not in "".join(tool.values())
    assert ConnInfo.parse("postgresql://u@h/db").tool_env(None)["PGCONNECT_TIMEOUT"] == "10"


def test_the_passfile_line_escapes_colons_and_backslashes():
    info = ConnInfo.parse("postgresql://u:a%3Ab%5Cc@h/db")
    assert info.password == "a:b\\c"
    assert passfile_line(info) == "*:*:*:*:a\\:b\\\\c\n"


def test_a_password_file_open_to_others_is_named_with_its_fix(monkeypatch, tmp_path):
    passfile = tmp_path / "pgpass"
    passfile.write_text("*:*:*:*:x\n")
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    passfile.chmod(0o600)
    assert loose_password_file() is None
    passfile.chmod(0o644)
    assert loose_password_file() == (
        f"{passfile} can be read by others (mode 644): libpq ignores such a file, and the passwords in it are exposed. "
        f"Run: chmod 600 {passfile}"
    )
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    assert loose_password_file() is None


# ------------------------------------------------------------------ settings: flag > environment > .env > default

SETTINGS_VARIABLES = (
    "STAGING_DATABASE_URL",
    "V2_DATABASE_URL",
    "BACKUP_DIR",
    "LOG_DIR",
    "PG_BIN_DIR",
    "PG_BIN_DIR_ONLY",
    "RESTORE_JOBS",
    "DUMP_JOBS",
    "ROLLBACK_METHOD",
    "FILE_COPY_METHOD",
    "ROLLBACK_SPARE",
    "PROTECTED_DATABASES",
    "ROLLBACK_ENCRYPT_TO",
    "ROLLBACK_BEFORE_SWAP",
    "ROLLBACK_AFTER_SWAP",
    "ROLLBACK_HOOK_TIMEOUT",
    "KEEP_BEFORE_STATES",
    "PITR_SIDE_DIR",
    "PITR_ARCHIVE_TIMEOUT",
)


@pytest.fixture
def dotenv(monkeypatch, tmp_path):
    """An empty environment for the toolkit's settings and a .env file to write them in."""
    for name in SETTINGS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name in [k for k in os.environ if k.startswith("PGBACKREST_")]:
        monkeypatch.delenv(name)
    path = tmp_path / ".env"
    path.write_text("")
    monkeypatch.setenv("ROLLBACK_ENV_FILE", str(path))
    return path


def test_a_flag_beats_the_environment_which_beats_env_file_which_beats_the_default(dotenv, monkeypatch, tmp_path):
    assert load_settings().backup_dir == config.PROJECT_ROOT / "backups"  # the default, under the project
    assert load_settings().staging_url is None
    dotenv.write_text("STAGING_DATABASE_URL=postgresql://u@h/from_file\nBACKUP_DIR=/srv/from_file\nPGBACKREST_STANZA=file\n")
    assert load_settings().staging_url == "postgresql://u@h/from_file"
    assert load_settings().backup_dir == Path("/srv/from_file")
    monkeypatch.setenv("STAGING_DATABASE_URL", "")  # set but empty: as if unset
    assert load_settings().staging_url == "postgresql://u@h/from_file"
    monkeypatch.setenv("STAGING_DATABASE_URL", "postgresql://u@h/from_env")
    monkeypatch.setenv("BACKUP_DIR", "relative/points")
    monkeypatch.setenv("PGBACKREST_STANZA", "env")
    settings = load_settings()
    assert settings.staging_url == "postgresql://u@h/from_env"
    assert settings.backup_dir == config.PROJECT_ROOT / "relative" / "points"  # relative to the project, not the caller
    assert settings.pgbackrest_stanza == "env"
    flagged = load_settings(staging_url="postgresql://u@h/from_flag", backup_dir=str(tmp_path / "flag"))
    assert flagged.staging_url == "postgresql://u@h/from_flag" and flagged.backup_dir == tmp_path / "flag"
    assert flagged.staging().dbname == "from_flag"


def test_settings_are_read_as_their_kinds(dotenv, monkeypatch):
    dotenv.write_text(
        "PG_BIN_DIR=/opt/pg/bin:/usr/local/bin\nPG_BIN_DIR_ONLY=yes\nROLLBACK_SPARE=off\nROLLBACK_METHOD= Template \n"
        "PROTECTED_DATABASES= prod , ,billing\nROLLBACK_BEFORE_SWAP=pgbouncer-pause --db 'staging db'\nKEEP_BEFORE_STATES=0\n"
    )
    settings = load_settings()
    assert settings.pg_bin_dirs == [Path("/opt/pg/bin"), Path("/usr/local/bin")] and settings.pg_bin_dir_only is True
    assert settings.rollback_spare is False and settings.rollback_method == "template"
    assert settings.protected_databases == ("prod", "billing")
    assert settings.before_swap == ("pgbouncer-pause", "--db", "staging db") and settings.after_swap == ()
    assert settings.keep_before_states == 0
    assert load_settings(encrypt=False).encrypt is False
    monkeypatch.setenv("ROLLBACK_ENCRYPT_TO", "age1example")
    assert load_settings().encrypt is True


@pytest.mark.parametrize(
    "line, says",
    [
        ("RESTORE_JOBS=many", "RESTORE_JOBS must be a whole number, not 'many'."),
        ("DUMP_JOBS=0", "DUMP_JOBS must be at least 1, not 0."),
        ("KEEP_BEFORE_STATES=-1", "KEEP_BEFORE_STATES must be at least 0, not -1."),
        ("FILE_COPY_METHOD=reflink", "FILE_COPY_METHOD='reflink' is not one of auto, copy, clone."),
        ("ROLLBACK_AFTER_SWAP=psql -c 'RESUME", "ROLLBACK_AFTER_SWAP cannot be split into a command and its arguments"),
    ],
)
def test_a_setting_that_makes_no_sense_is_refused_by_name(dotenv, line, says):
    dotenv.write_text(line + "\n")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert caught.value.message.startswith(says) and caught.value.exit_code is ExitCode.USAGE


def test_without_a_staging_url_the_error_says_where_to_set_it(dotenv):
    with pytest.raises(ConfigError) as caught:
        load_settings().staging()
    assert "STAGING_DATABASE_URL is not set" in caught.value.message and ".env" in caught.value.hint
    assert load_settings().v2() is None


# ------------------------------------------------------------------ the audit trail


def test_the_audit_reader_skips_and_names_damaged_lines(tmp_path):
    trail = tmp_path / audit.AUDIT_FILE
    trail.write_bytes(
        b'{"event": "create", "n": 1}\n'
        b'{"event": "restore", "outc\n'  # torn by a crash
        b"\n"  # empty: not an entry, not damage
        b"[1, 2]\n"  # JSON, but not an entry
        b"\xff\xfe\n"  # not UTF-8
        b'{"event": "verify", "n": 2}\n'
    )
    found = audit.read(tmp_path)
    assert [e["n"] for e in found.entries] == [1, 2]
    assert found.damaged == [2, 4, 5]
    assert found.path == trail


def test_the_audit_reader_returns_the_newest_entries_oldest_first(tmp_path):
    for n in range(1, 6):
        audit.append(tmp_path, {"event": "create", "n": n})
    assert [e["n"] for e in audit.read(tmp_path, 2).entries] == [4, 5]
    assert [e["n"] for e in audit.read(tmp_path).entries] == [1, 2, 3, 4, 5]
    assert [e["n"] for e in audit.read(tmp_path, 50).entries] == [1, 2, 3, 4, 5]
    assert audit.read(tmp_path / "nothing here").entries == []


def test_an_entry_after_a_torn_line_starts_a_line_of_its_own_and_hides_passwords(tmp_path):
    (tmp_path / audit.AUDIT_FILE).write_bytes(b'{"event": "create"}\n{"event": "resto')
    audit.append(tmp_path, {"event": "restore", "url": f"postgresql://u:{PASSWORD}@h/db"})
    text = (tmp_path / audit.AUDIT_FILE).read_text()
    assert PASSWORD not in text
    found = audit.read(tmp_path)
    assert found.damaged == [2] and [e["event"] for e in found.entries] == ["create", "restore"]
    assert found.entries[1]["url"] == "postgresql://u:***@h/db"
    assert (tmp_path / audit.AUDIT_FILE).stat().st_mode & 0o777 == 0o600


def test_an_audited_operation_records_its_outcome(tmp_path):
    with audit.audited(tmp_path, "create", "staging", "rb_1"):
        pass
    with pytest.raises(ToolError), audit.audited(tmp_path, "restore", "staging", "rb_1"):
        raise ToolError("pg_restore 18 failed: disk full")
    with pytest.raises(KeyboardInterrupt), audit.audited(tmp_path, "restore", "staging", "rb_1"):
        raise KeyboardInterrupt
    entries = audit.read(tmp_path).entries
    assert [(e["event"], e["outcome"], e["error"]) for e in entries] == [
        ("create", "succeeded", None),
        ("restore", "failed", "pg_restore 18 failed: disk full"),
        ("restore", "aborted", "KeyboardInterrupt"),
    ]
    assert all(e["duration_seconds"] >= 0 and e["point_id"] == "rb_1" for e in entries)
    assert audit.details(entries[1]).startswith("pg_restore 18 failed: disk full; ")


def test_the_audit_command_names_each_damaged_line_and_keeps_to_its_limit(tmp_path):
    """rollback_manager.py audit, as a person runs it: no server is asked."""
    for n in range(1, 4):
        audit.append(tmp_path, {"event": "create", "n": n})
    with open(tmp_path / audit.AUDIT_FILE, "ab") as trail:
        trail.write(b"torn {\n")
    audit.append(tmp_path, {"event": "create", "n": 4})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "STAGING_", "V2_", "BACKUP_DIR"))}
    env.update(LOG_DIR=str(tmp_path), ROLLBACK_ENV_FILE=str(tmp_path / "no.env"), STAGING_DATABASE_URL="postgresql://u@h/db")
    shown = subprocess.run(
        [sys.executable, str(ROOT / "rollback_manager.py"), "audit", "--limit", "2", "--json"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert [e["n"] for e in json.loads(shown.stdout)] == [3, 4]
    said = " ".join(shown.stderr.split())
    assert f"line 4 of {tmp_path / audit.AUDIT_FILE} is damaged (not a JSON entry); skipped" in said


# ------------------------------------------------------------------ client tools: versions and choice by major


@pytest.mark.parametrize(
    "text, major",
    [
        ("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)", 15),
        ("pg_dump (PostgreSQL) 18.1\n", 18),
        ("pg_restore (PostgreSQL) 17devel", 17),
        ("psql (PostgreSQL) 16.4 (Ubuntu 16.4-1.pgdg22.04+1)", 16),
        ("pg_dump (EnterpriseDB) 16.2.0", 16),
        ("pg_dump (PostgreSQL) 9.6.24", 9),
        ("18.1", 18),
    ],
)
def test_a_version_line_gives_its_major(text, major):
    assert pgtools.parse_version(text) == (major, text.strip().splitlines()[0])


@pytest.mark.parametrize("text", ["", "   \n", "pg_dump: command not found"])
def test_a_line_without_a_version_gives_none(text):
    assert pgtools.parse_version(text) is None


def _fake(name: str, *majors: int) -> list[pgtools.Tool]:
    return [pgtools.Tool(name, Path(f"/opt/pg{m}/bin/{name}"), m, f"{name} (PostgreSQL) {m}.2") for m in majors]


@pytest.fixture
def installed(monkeypatch):
    """Tools "found" on this machine: fake records, no binary is run."""
    found: dict[str, list[pgtools.Tool]] = {}
    monkeypatch.setattr(pgtools, "discover", lambda name, settings=None: (found.get(name, []), ["PATH: /opt/pg*/bin"]))
    return found


def test_the_lowest_major_at_least_the_servers_is_tried_first(installed):
    installed["pg_dump"] = _fake("pg_dump", 18, 14, 16)
    assert [t.major for t in pgtools.candidates_for_server("pg_dump", 15, None)] == [16, 18]
    assert [t.major for t in pgtools.candidates_for_server("pg_dump", 14, None)] == [14, 16, 18]
    assert [t.major for t in pgtools.candidates_for_server("pg_dump", 18, None)] == [18]


def test_no_tool_new_enough_names_what_was_found_and_where_it_looked(installed):
    installed["pg_dump"] = _fake("pg_dump", 14, 15)
    with pytest.raises(ToolError) as caught:
        pgtools.candidates_for_server("pg_dump", 18, None)
    message = caught.value.message
    assert "the server is PostgreSQL 18 and pg_dump must be at least that" in message
    assert "/opt/pg14/bin/pg_dump (14), /opt/pg15/bin/pg_dump (15)" in message and "PATH: /opt/pg*/bin" in message
    assert "simple_rollback.py" in caught.value.hint
    assert caught.value.another_method_may_work is True  # --method auto goes on to the next method


def test_an_archive_is_read_by_the_lowest_fitting_major_or_with_an_unknown_writer_the_newest(installed):
    installed["pg_restore"] = _fake("pg_restore", 15, 18, 16)
    assert [t.major for t in pgtools.candidates_for_archive("pg_restore", 16, None)] == [16, 18]
    assert [t.major for t in pgtools.candidates_for_archive("pg_restore", None, None)] == [18, 16, 15]
    with pytest.raises(ToolError, match="the archive was written by pg_dump 19"):
        pgtools.candidates_for_archive("pg_restore", 19, None)


def test_a_version_refusal_moves_on_to_the_next_tool_and_any_other_failure_stops(installed):
    tools = _fake("pg_dump", 15, 16, 18)
    tried = []

    def refuse_below_18(tool):
        tried.append(tool.major)
        if tool.major < 18:
            raise VersionMismatch(f"pg_dump {tool.major} failed: server version mismatch")
        return "dumped"

    assert pgtools.try_each(tools, refuse_below_18) == (tools[2], "dumped") and tried == [15, 16, 18]
    with pytest.raises(ToolError, match="Every installed pg_dump refused on version grounds"):
        pgtools.try_each(tools[:2], refuse_below_18)

    def broken(tool):
        tried.append(tool.major)
        raise ToolError("pg_dump failed: could not connect")

    tried.clear()
    with pytest.raises(ToolError, match="could not connect"):
        pgtools.try_each(tools, broken)
    assert tried == [15]


def test_settings_an_older_server_does_not_know_are_dropped_but_never_copy_data():
    keep = pgtools.UnknownSettingsFilter({"statement_timeout"})
    lines = [
        b"SET statement_timeout = 0;\n",
        b"SET transaction_timeout = 0;\n",
        b"COPY public.notes (id, body) FROM stdin;\n",
        b"1\tSET transaction_timeout = 0;\n",
        b"\\.\n",
        b"SET transaction_timeout = 0;\n",
    ]
    assert [keep(line) for line in lines] == [True, False, True, True, True, False]
    assert keep.dropped == ["transaction_timeout", "transaction_timeout"]


# ------------------------------------------------------------------ what a tool's failure becomes


def test_a_failed_tool_becomes_an_error_with_masked_argv_exit_code_and_stderr():
    argv = ["pg_dump", f"--dbname=postgresql://u:{PASSWORD}@h/db"]
    stderr = "pg_dump: warning: slow\npg_dump: error: connection to server failed: FATAL: no pg_hba.conf entry\n"
    error = Command("pg_dump").failure(Finished(1, "", stderr), argv)
    assert type(error) is ToolError
    assert error.message == "program failed: pg_dump: error: connection to server failed: FATAL: no pg_hba.conf entry"
    assert error.argv == ["pg_dump", "--dbname=postgresql://u:***@h/db"] and error.returncode == 1 and error.stderr == stderr
    assert Command("pg_dump").failure(Finished(0, "", "pg_dump: warning: slow"), argv) is None


@pytest.mark.parametrize(
    "stderr",
    [
        "pg_dump: error: aborting because of server version mismatch\npg_dump: detail: server version: 18.1; pg_dump version: 15.18",
        "pg_restore: error: unsupported version (1.16) in file header",
    ],
)
def test_a_version_refusal_is_recognised_by_the_tools_own_words(stderr):
    assert is_version_mismatch(stderr)
    assert type(Command("pg_dump").failure(Finished(1, "", stderr), ["pg_dump"])) is VersionMismatch


def test_pg_restore_that_ignored_errors_has_failed_even_with_exit_0():
    tool = pgtools.Tool("pg_restore", Path("/opt/pg18/bin/pg_restore"), 18, "pg_restore (PostgreSQL) 18.1")
    said = (
        "pg_restore: error: could not execute query: ERROR: relation exists\npg_restore: warning: errors ignored on restore: 1\n"
    )
    error = PgRestore(tool).failure(Finished(0, "", said), ["pg_restore"])
    assert isinstance(error, ToolError) and "pg_restore 18 reported errors it ignored" in error.message
    assert PgRestore(tool).failure(Finished(0, "", ""), ["pg_restore"]) is None


# ------------------------------------------------------------------ small pure helpers


def test_slugs_sizes_and_rates_read_as_people_expect():
    assert slugify("Before migration: «test» #2") == "before_migration_test_2"
    assert slugify("!!!") == "point" and len(slugify("a" * 80)) == 40
    assert [human_size(n) for n in (None, 0, 1023, 1024, 5 * 1024**3)] == ["-", "0 B", "1023 B", "1.0 KiB", "5.0 GiB"]
    assert [percent(f) for f in (0.10149, 0.1, 1, 0)] == ["10.1%", "10%", "100%", "0%"]


def test_a_derived_database_name_keeps_to_63_bytes_and_distinct_names_distinct():
    assert derived_name("staging", "_spare") == "staging_spare"
    long_a, long_b = derived_name("x" * 60, "_spare"), derived_name("x" * 59 + "y", "_spare")
    assert len(long_a.encode()) == len(long_b.encode()) == 63 and long_a != long_b
    assert long_a.endswith("_spare") and long_b.endswith("_spare")
    umlauts = derived_name("ä" * 40, "_spare")
    assert len(umlauts.encode()) <= 63 and umlauts.endswith("_spare") and umlauts.encode().decode() == umlauts


def test_a_setting_list_splits_as_postgresql_reads_it():
    assert split_setting_list('"$user", public') == ["$user", "public"]
    assert split_setting_list('"a,b", "say ""hi""" ,c') == ["a,b", 'say "hi"', "c"]
    assert split_setting_list("") == [""]


def test_advisory_lock_keys_are_stable_per_server_and_name_and_fit_a_bigint():
    key = lock_key("7300000000000000001", "staging")
    assert key == lock_key("7300000000000000001", "staging") and 0 <= key < 2**63
    assert len({key, lock_key("7300000000000000002", "staging"), lock_key("7300000000000000001", "Staging")}) == 3


def test_wal_positions_and_timelines_decide_which_backups_a_recovery_may_start_from():
    assert lsn_value("16/B374D848") == (0x16 << 32) + 0xB374D848 and lsn_value("0/0") == 0
    history = parse_history(3, "1\t0/3000000\tno recovery target specified\n\n2\t0/5000000\tat restore point\n")
    assert (history.current, history.left_at) == (3, {1: 0x3000000, 2: 0x5000000})

    def backup(timeline: int, stop: str) -> Backup:
        return Backup("label", "full", "0/1000000", stop, 0, 0, 1, timeline)

    assert history.holds(backup(3, "0/9000000"))
    assert history.holds(backup(2, "0/5000000")) and not history.holds(backup(2, "0/5000001"))
    assert not history.holds(backup(4, "0/1000000"))
    assert history.parent().current == 2 and history.parent().left_at == {1: 0x3000000}


def test_a_fingerprint_comparison_says_what_differs_in_sentences():
    recorded = {"row_counts": {"public.a": 3, "public.b": 1}, "sequences": {"public.s": [5, True]}, "large_objects": 0}
    found = Fingerprint("d", 10, {"public.a": 4, "public.c": 2}, {"public.s": [5, True]}, 1, {}, None)
    assert compare(recorded, found) == [
        "public.a: 3 rows recorded, 4 found",
        "public.b: 1 rows recorded, absent found",
        "public.c: absent rows recorded, 2 found",
        "large objects: 0 recorded, 1 found",
    ]
    assert compare({"row_counts": {"public.a": 4, "public.c": 2}}, found) == []
    assert schema_differences(["a", "b"], ["b", "c"]) == ["missing: a", "unexpected: c"]
    many = schema_differences([f"x{i:02}" for i in range(12)], [], limit=5)
    assert many == [*(f"missing: x{i:02}" for i in range(5)), "12 missing and 0 unexpected in all"]
