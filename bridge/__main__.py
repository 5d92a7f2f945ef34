"""``python -m bridge`` (console script ``chat-bridge``): serve, flags, stack, token, client.

    python -m bridge [--host H] [--port P]            serve (settings from the environment)
    python -m bridge flags show                       the live flags (through the operator API)
    python -m bridge flags set enabled=true percent=25 allow_users=a,b allow_roles=internal,admin
                               deny_users=c fallback=true [--reason R]
    python -m bridge flags reset                      every flag back to its environment value
    python -m bridge rollout status|start|promote|pause|resume|rollback [--reason R] ...
                                                      (bridge/admin_client.py: --url, --token)
    python -m bridge stack [--host H] [--port P] [--prometheus]
                                                      Redis + backend + bridge, prints READY {...}
    python -m bridge token USER [--roles a,b] [--ttl-s N]   a JWT signed with JWT_SECRET
    python -m bridge client --url URL (--token T | --user U) --room R   a terminal client

The only module that reads ``os.environ``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
from collections.abc import Sequence

from bridge.logs import configure
from bridge.settings import DEV_JWT_SECRET, Settings, SettingsError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
COMMANDS = ("flags", "rollout", "stack", "token", "client")


def _exit_on_sigterm() -> None:
    """uvicorn handles SIGTERM / SIGINT itself, then restores this handler and re-raises the signal
    once it has shut down: make that a clean ``SystemExit(0)`` so every ``finally`` (the
    bridge's own shutdown, the stack's backend and Redis) still runs."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args and args[0] in COMMANDS else "serve"
    rest = args[1:] if command != "serve" else args
    try:
        settings = Settings.from_env(os.environ)
    except SettingsError as exc:
        print(f"bridge: {exc}", file=sys.stderr)
        return 2
    configure(settings.log_level)
    if command in ("flags", "rollout"):
        from bridge import admin_client

        run = admin_client.flags_main if command == "flags" else admin_client.rollout_main
        return run(rest, os.environ)
    if command == "token":
        return _token(rest)
    if command == "client":
        from bridge.client import main as client_main

        return int(client_main(rest))
    parser = argparse.ArgumentParser(prog=f"bridge {command}".strip())
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    if command == "stack":
        parser.add_argument(
            "--prometheus", action="store_true",
            help="also run Debian's prometheus scraping the stack, with the chart's alarms",
        )  # fmt: skip
    parsed = parser.parse_args(rest)
    _exit_on_sigterm()
    if command == "stack":
        from bridge.stack import run_stack

        return run_stack(parsed.host, parsed.port, os.environ, prometheus=parsed.prometheus)
    return _serve(parsed.host, parsed.port, settings)


def _serve(host: str, port: int, settings: Settings) -> int:
    from bridge.app import Bridge
    from contracts.redis_server import EmbeddedRedis

    if settings.jwt_secret is None and not settings.insecure_dev_auth:
        print(
            "bridge: set JWT_SECRET (or BRIDGE_INSECURE_DEV_AUTH=1 for development)",
            file=sys.stderr,
        )
        return 2
    embedded = None
    redis_url = settings.redis_url
    if redis_url is None:
        embedded = EmbeddedRedis().start()
        redis_url = embedded.url
        print(f"bridge: no REDIS_URL, using an embedded Redis at {redis_url}", file=sys.stderr)
    try:
        _run(Bridge(settings, redis_url=redis_url).serve(host, port))
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


# The cyclic GC's young threshold: CPython's default (700) ran a collection every few hundred
# allocations, and each full one walked every live object of every socket and stream: at 1,000
# streams 9 full collections in 30 s, up to 440 ms each, were the whole p95 TTFT tail and ~8 % of
# the CPU (issue 8). Young garbage dies by reference count anyway; cycles are still collected,
# later and in fewer, shorter passes. ``gc.freeze`` keeps what startup built (modules, classes)
# out of every pass.
GC_THRESHOLDS = (50_000, 20, 20)


def _tune_gc() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _run(coro: object) -> None:
    _tune_gc()
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]


def _token(rest: list[str]) -> int:
    from bridge.auth import make_token

    parser = argparse.ArgumentParser(prog="bridge token")
    parser.add_argument("user")
    parser.add_argument("--roles", default="")
    parser.add_argument("--ttl-s", type=int, default=3600)
    parsed = parser.parse_args(rest)
    secret = os.environ.get("JWT_SECRET") or DEV_JWT_SECRET
    roles = [r for r in parsed.roles.split(",") if r]
    print(make_token(secret, parsed.user, roles=roles, ttl_s=parsed.ttl_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
