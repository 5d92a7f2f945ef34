"""The operators' HTTP API (CONTRACT.md section 4 "For operators"), on the Socket.IO port.

Every route needs ``Authorization: Bearer <JWT>`` whose ``roles`` hold ``admin`` (401 without a
valid token, 403 with another one; never the insecure development mode's trust). Every change
is written to the audit trail with the token's ``sub`` and the body's ``reason``.

    GET   /admin/flags                      the live flags and the environment's defaults
    PATCH /admin/flags                      {enabled?, percent?, allowUsers?, allowRoles?,
                                             denyUsers?, fallback?, reason?}
    GET   /admin/rollout                    state, stage, plan, gates, breaker, history
    POST  /admin/rollout/start              {plan?, dwellS?, minSamples?, auto?, reason?}
    POST  /admin/rollout/{promote,pause,resume,rollback}   {reason?, force?}
    GET   /admin/audit?limit=N              newest first (1..1000, default 50)

Errors are ``{code, message}``: 400 (not JSON), 422 (wrong types, out of range), 401, 403, 404,
405, 409 (``FORBIDDEN``: the state does not allow the transition now, or ``promote`` while a gate
fails or waits; the answer lists the gates).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from redis.asyncio import Redis

from bridge.auth import Authenticator, AuthError, Identity
from bridge.errors import StoreError
from bridge.flags import FIELDS, FlagStore
from bridge.gates import blocking
from bridge.rest import reply_json
from bridge.rollout import Controller, RolloutStore, TransitionError, flags_view
from contracts import ContractError, ErrorCode, parse
from contracts.admin import (
    Action,
    BreakerReplica,
    BreakerView,
    FlagsPatch,
    RolloutStart,
    RolloutState,
    RolloutView,
    Transition,
)

log = structlog.get_logger("bridge.admin")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

PREFIX = "/admin/"
ADMIN_ROLE = "admin"
MAX_BODY_BYTES = 64 * 1024
BODY_TIMEOUT_S = 5.0
AUDIT_DEFAULT, AUDIT_LIMIT = 50, 1000


class HttpError(Exception):
    def __init__(self, status: int, code: ErrorCode, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


class AdminApi:
    """``handle`` answers a request under ``/admin/`` or returns False (not ours)."""

    def __init__(
        self, *, auth: Authenticator, flags: FlagStore, store: RolloutStore,
        controller: Controller, redis: Redis,
    ) -> None:  # fmt: skip
        self._auth = auth
        self._flags = flags
        self._store = store
        self._controller = controller
        self._redis = redis

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> bool:
        path: str = scope.get("path", "")
        if not path.startswith(PREFIX):
            return False
        try:
            ident = self._admin(scope)
            status, body = await self._route(scope, receive, path[len(PREFIX) :], ident)
        except HttpError as exc:
            status = exc.status
            body = {"code": exc.code.value, "message": exc.message, **exc.extra}
        except StoreError:
            status, body = 503, {"code": "BACKEND_UNAVAILABLE", "message": "redis unavailable"}
        await reply_json(send, status, orjson.dumps(body))
        return True

    def _admin(self, scope: Scope) -> Identity:
        header = None
        for key, value in scope.get("headers", []):
            if key == b"authorization":
                header = value.decode("latin-1")
        try:
            # a Bearer token only: the development mode's ``auth.userId`` never reaches here
            ident = self._auth.identify(None, {"HTTP_AUTHORIZATION": header})
        except AuthError as exc:
            raise HttpError(401, ErrorCode.UNAUTHORIZED, str(exc)) from None
        if ADMIN_ROLE not in ident.roles:
            raise HttpError(403, ErrorCode.FORBIDDEN, "the admin role is required")
        return ident

    async def _route(
        self, scope: Scope, receive: Receive, route: str, ident: Identity
    ) -> tuple[int, Any]:
        method = scope.get("method", "GET")
        if route == "flags":
            if method == "GET":
                return 200, flags_view(self._flags)
            if method == "PATCH":
                return 200, await self._patch_flags(await _body(receive), ident)
            raise _method("GET, PATCH")
        if route == "rollout":
            if method != "GET":
                raise _method("GET")
            return 200, await self.view()
        if route.startswith("rollout/"):
            if method != "POST":
                raise _method("POST")
            try:
                action = Action(route[len("rollout/") :])
            except ValueError:
                raise HttpError(404, ErrorCode.NOT_FOUND, "no such transition") from None
            return 200, await self._transition(action, await _body(receive), ident)
        if route == "audit":
            if method != "GET":
                raise _method("GET")
            limit = _limit(scope.get("query_string", b""))
            return 200, await self._flags.audit(limit)
        raise HttpError(404, ErrorCode.NOT_FOUND, "no such route")

    async def _patch_flags(self, data: object, ident: Identity) -> Any:
        patch = _parse(FlagsPatch, data)
        changes: dict[str, str] = {}
        for name in FIELDS:
            value = getattr(patch, name)
            if value is None:
                continue
            if isinstance(value, bool):
                changes[name] = "true" if value else "false"
            elif isinstance(value, list):
                changes[name] = ",".join(value)
            else:
                changes[name] = f"{value:g}"
        if not changes:
            raise HttpError(422, ErrorCode.INVALID_PAYLOAD, "no flag to change")
        if "percent" in changes:
            rollout = await self._store.load()
            if rollout.state in (RolloutState.RUNNING, RolloutState.PAUSED):
                # the rollout's stages own the percentage: an edit would be overwritten by the
                # next promote and could take users off the stream path (not sticky)
                raise HttpError(
                    409, ErrorCode.FORBIDDEN,
                    f"a rollout is {rollout.state.value}: roll it back or let it finish before "
                    "setting percent (the kill switch, enabled=false, always works)",
                )  # fmt: skip
        await self._flags.patch(changes, actor=ident.user_id, reason=patch.reason)
        return flags_view(self._flags)

    async def _transition(self, action: Action, data: object, ident: Identity) -> Any:
        start: RolloutStart | None = None
        if action is Action.START:
            start = _parse(RolloutStart, data)
            reason, force = start.reason, False
        else:
            transition = _parse(Transition, data)
            reason, force = transition.reason, transition.force
        current = await self._store.load()
        forced = False
        if action is Action.PROMOTE and current.state is RolloutState.RUNNING:
            gates = await self._controller.gates(current)
            held = blocking(gates)
            if held and not force:
                names = ", ".join(f"{g.name} {g.verdict.value}" for g in held)
                raise HttpError(
                    409, ErrorCode.FORBIDDEN, f"promote: gates do not pass ({names}); "
                    "force to promote anyway", gates=[g.wire() for g in gates],
                )  # fmt: skip
            forced = bool(held)
        try:
            await self._store.transition(
                action, actor=ident.user_id, reason=reason, start=start, forced=forced,
                expect=current,
            )  # fmt: skip
        except TransitionError as exc:
            raise HttpError(409, ErrorCode.FORBIDDEN, exc.message) from None
        return await self.view()

    async def view(self) -> Any:
        rollout = await self._store.load()
        gates = await self._controller.gates(rollout)
        replicas = await _breakers(self._redis)
        view = RolloutView(
            state=rollout.state, stage=rollout.stage, percent=rollout.percent,
            plan=list(rollout.plan), stage_since=rollout.stage_since, dwell_s=rollout.dwell_s,
            min_samples=rollout.min_samples, auto=rollout.auto, gates=gates,
            breaker=BreakerView(replicas=replicas), history=list(rollout.history),
            evaluated_at=self._controller.last_evaluated or (time.time() if gates else None),
        )  # fmt: skip
        return view.wire()


async def _breakers(redis: Redis) -> list[BreakerReplica]:
    from bridge.breaker import read_breakers

    replicas = []
    for snap in await read_breakers(redis):
        try:
            replicas.append(BreakerReplica(id=str(snap["id"]), state=snap["state"]))
        except (KeyError, ValueError):
            continue
    return replicas


def _parse(model: Any, data: object) -> Any:
    try:
        return parse(model, {} if data is None else data)
    except ContractError as exc:
        raise HttpError(422, exc.code, exc.message) from None


async def _body(receive: Receive) -> object:
    """The request's JSON body (``None`` when empty); 400 for anything that is not JSON."""
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            raw = await _read(receive)
    except TimeoutError:
        raise HttpError(400, ErrorCode.INVALID_PAYLOAD, "body not received in time") from None
    if not raw.strip():
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise HttpError(400, ErrorCode.INVALID_PAYLOAD, "body is not JSON") from None


async def _read(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HttpError(400, ErrorCode.INVALID_PAYLOAD, "client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise HttpError(413, ErrorCode.INVALID_PAYLOAD, "body too large")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _limit(query: bytes) -> int:
    for pair in query.decode("latin-1").split("&"):
        key, _, value = pair.partition("=")
        if key == "limit":
            if not value.isdigit() or not 1 <= int(value) <= AUDIT_LIMIT:
                raise HttpError(422, ErrorCode.INVALID_PAYLOAD, f"limit: 1..{AUDIT_LIMIT}")
            return int(value)
    return AUDIT_DEFAULT


def _method(allowed: str) -> HttpError:
    return HttpError(405, ErrorCode.INVALID_PAYLOAD, f"method not allowed (use {allowed})")
