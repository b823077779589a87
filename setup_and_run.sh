#!/usr/bin/env bash
# Usage: ./setup_and_run.sh [COMMAND] [ARGS...]
#
# Commands:
#   demo       set up .venv and run the demo on an embedded PostgreSQL (no configuration):
#              a dry run of a migration, a production run rolled back by itself, the audit trail
#   test       set up .venv (and PostgreSQL 15 from Debian if missing) and run the whole test suite
#   install    only set up .venv with the pinned requirements
#   menu       the interactive menu (the default when run on a terminal with no command)
#   help       this text
#
# Menu options 5-9 are the rollback operations; each runs one Python script.
# Settings come from the environment or .env: STAGING_DATABASE_URL, V2_DATABASE_URL,
# BACKUP_DIR, LOG_DIR, PG_BIN_DIR (see ROLLBACK_GUIDE.md).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly ROOT
readonly VENV="${ROOT}/.venv"
readonly PY="${VENV}/bin/python"
readonly STAMP="${VENV}/.requirements.sha256"
readonly PG_TEST_MAJOR=15

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
}

install_test_tools() {
  local missing=()
  [[ -x "/usr/lib/postgresql/${PG_TEST_MAJOR}/bin/postgres" ]] || missing+=("postgresql-${PG_TEST_MAJOR}")
  command -v shellcheck >/dev/null || missing+=(shellcheck)
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null; then
    die "the tests need ${missing[*]} from Debian: sudo apt-get install ${missing[*]}"
  fi
  echo "Installing ${missing[*]} from Debian for the tests"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

run_py() { (cd "${ROOT}" && exec "${PY}" "$@"); }

cmd_test() {
  install_venv
  install_test_tools
  cd "${ROOT}"
  exec "${PY}" -m pytest tests "$@"
}

menu() {
  [[ -t 0 ]] || die "the menu needs a terminal; use a command instead: $0 help"
  install_venv
  local choice id answer
  while true; do
    cat <<'EOF'

  Migration rollback toolkit
  1) Set up (.venv and requirements)
  2) Demo on an embedded PostgreSQL
  3) Run the test suite
  4) Run a migration
  5) Create a rollback point
  6) List rollback points
  7) Quick rollback to the newest point
  8) Advanced rollback (restore a chosen point)
  9) Reset staging from V2
  q) Quit
EOF
    read -r -p "Choose: " choice || exit 0
    case "${choice}" in
      1) install_venv ;;
      2) run_py demo.py || true ;;
      3) (cmd_test) || true ;;
      4)
        (cd "${ROOT}" && ls -1 migrations/*)
        read -r -a answer -p "Migration file (a dry run; add --production after it to run it for real): "
        [[ ${#answer[@]} -gt 0 ]] && { run_py run_migration.py "${answer[@]}" || true; }
        ;;
      5)
        read -r -p "Description: " id
        run_py create_rollback_point.py "${id:-Manual rollback point}" || true
        ;;
      6) run_py rollback_manager.py list || true ;;
      7) run_py quick_rollback.py || true ;;
      8)
        run_py rollback_manager.py list || true
        read -r -p "Point id to restore: " id
        [[ -n "${id}" ]] && { run_py rollback_manager.py restore "${id}" || true; }
        ;;
      9) run_py reset_staging.py || true ;;
      q | Q) exit 0 ;;
      *) err "unknown choice: ${choice}" ;;
    esac
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
    demo-stop)
      install_venv
      run_py demo.py --stop
      ;;
    test) cmd_test "$@" ;;
    install) install_venv ;;
    menu) menu ;;
    help | -h | --help) usage ;;
    "")
      if [[ -t 0 ]]; then menu; else usage; fi
      ;;
    *)
      usage >&2
      die "unknown command: ${command}"
      ;;
  esac
}

main "$@"
