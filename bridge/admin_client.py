"""``python -m bridge flags ...`` and ``python -m bridge rollout ...``: clients of the operator API.

Every change goes through the bridge's ``/admin`` routes (bridge/admin.py), so the audit trail
names who made it; nothing here writes Redis.

    python -m bridge flags show
    python -m bridge flags set enabled=false --reason "incident 42"     (the kill switch)
    python -m bridge flags set percent=25 allow_roles=internal,admin deny_users=c
    python -m bridge flags reset                   every flag back to the environment's value
    python -m bridge rollout status
    python -m bridge rollout start [--plan 10,25,50,100] [--dwell-s 600] [--min-samples 200]
                                   [--auto] [--reason R]
    python -m bridge rollout promote|pause|resume|rollback [--reason R] [--force]

Where: ``--url`` (or ``BRIDGE_URL``, default http://127.0.0.1:8080), any replica. Who:
``--token`` (or ``BRIDGE_ADMIN_TOKEN``), a JWT with role ``admin``; without one, a five-minute
admin token is signed with ``JWT_SECRET`` for ``--actor`` (default ``cli:<login>``).
Exit status: 0 done, 1 refused or unreachable (the API's code and message on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx

from bridge.auth import make_token
from bridge.flags import WIRE_NAMES, validate_changes

DEFAULT_URL = "http://127.0.0.1:8080"
TIMEOUT_S = 10.0
CLI_TOKEN_TTL_S = 300
ROLLOUT_ACTIONS = ("status", "start", "promote", "pause", "resume", "rollback")


class UsageError(Exception):
    pass


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="a bridge replica (default $BRIDGE_URL or 127.0.0.1:8080)")
    parser.add_argument("--token", help="an admin JWT (default $BRIDGE_ADMIN_TOKEN)")
    parser.add_argument("--actor", help="sub of a token signed here with JWT_SECRET")
    parser.add_argument("--reason", help="written to the audit trail")


def flags_main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    parser = argparse.ArgumentParser(prog="bridge flags")
    parser.add_argument("action", choices=["show", "set", "reset"])
    parser.add_argument("changes", nargs="*", help="name=value pairs (set)")
    _common(parser)
    args = parser.parse_args(argv)

    def act(api: _Api) -> Any:
        if args.action == "show":
            return api.call("GET", "/admin/flags")
        if args.action == "reset":
            defaults = api.call("GET", "/admin/flags")["defaults"]
            return api.call("PATCH", "/admin/flags", {**defaults, "reason": args.reason})
        return api.call("PATCH", "/admin/flags", flags_body(args.changes, args.reason))

    return _run("bridge flags", args, environ, act)


def rollout_main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    parser = argparse.ArgumentParser(prog="bridge rollout")
    parser.add_argument("action", choices=ROLLOUT_ACTIONS)
    parser.add_argument("--plan", help="stages in percent, e.g. 10,25,50,100 (start)")
    parser.add_argument("--dwell-s", type=float, help="seconds each stage is judged (start)")
    parser.add_argument("--min-samples", type=int, help="finished requests a gate needs (start)")
    parser.add_argument("--auto", action="store_true", help="promote / roll back on the gates")
    parser.add_argument("--force", action="store_true", help="promote although gates do not pass")
    _common(parser)
    args = parser.parse_args(argv)

    def act(api: _Api) -> Any:
        if args.action == "status":
            return api.call("GET", "/admin/rollout")
        body: dict[str, Any] = {"reason": args.reason}
        if args.action == "start":
            body["auto"] = args.auto
            if args.plan:
                body["plan"] = _plan(args.plan)
            if args.dwell_s is not None:
                body["dwellS"] = args.dwell_s
            if args.min_samples is not None:
                body["minSamples"] = args.min_samples
        elif args.force:
            body["force"] = True
        return api.call("POST", f"/admin/rollout/{args.action}", body)

    return _run("bridge rollout", args, environ, act)


def _run(
    prog: str, args: argparse.Namespace, environ: Mapping[str, str], act: Callable[[_Api], Any]
) -> int:
    try:
        print(json.dumps(act(_Api(args, environ)), indent=2))
    except UsageError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except _Refused as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    return 0


def flags_body(pairs: Sequence[str], reason: str | None) -> dict[str, Any]:
    """``name=value`` pairs (the names of bridge/flags.py) as a ``PATCH /admin/flags`` body."""
    changes: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"expected name=value, got {pair!r}")
        changes[name.strip()] = value
    if not changes:
        raise UsageError("nothing to set (name=value ...)")
    try:
        checked = validate_changes(changes)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    body: dict[str, Any] = {"reason": reason}
    for name, value in checked.items():
        if name in ("enabled", "fallback"):
            body[name] = value.lower() in ("1", "true", "yes", "on")
        elif name == "percent":
            body[name] = float(value)
        else:
            body[WIRE_NAMES[name]] = [v for v in value.split(",") if v]
    return body


def _plan(raw: str) -> list[float]:
    try:
        return [float(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--plan: numbers separated by commas, got {raw!r}") from None


class _Refused(Exception):
    pass


class _Api:
    def __init__(self, args: argparse.Namespace, environ: Mapping[str, str]) -> None:
        self.url = (args.url or environ.get("BRIDGE_URL") or DEFAULT_URL).rstrip("/")
        token = args.token or environ.get("BRIDGE_ADMIN_TOKEN")
        if not token:
            secret = environ.get("JWT_SECRET")
            if not secret:
                raise UsageError("no admin token: --token, BRIDGE_ADMIN_TOKEN or JWT_SECRET")
            actor = args.actor or f"cli:{getpass.getuser()}"
            token = make_token(secret, actor, roles=["admin"], ttl_s=CLI_TOKEN_TTL_S)
        self.headers = {"Authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            reply = httpx.request(
                method, f"{self.url}{path}", json=body, headers=self.headers, timeout=TIMEOUT_S
            )
        except httpx.HTTPError as exc:
            raise _Refused(f"{self.url} unreachable ({type(exc).__name__})") from None
        try:
            data = reply.json()
        except ValueError:
            raise _Refused(f"{reply.status_code}: not a JSON answer") from None
        if reply.status_code >= 400:
            code = data.get("code") if isinstance(data, dict) else None
            message = data.get("message") if isinstance(data, dict) else None
            raise _Refused(f"{reply.status_code} {code}: {message}")
        return data
