"""The bridge's HTTP API for clients (CONTRACT.md section 4), on the Socket.IO port.

``GET /rooms/{roomId}/messages?limit=N`` (1..200, default 50): the room's history, oldest first,
for a client JWT (``Authorization: Bearer``) whose user may use the room by the same rules as
the socket's (owner, added member, or the token's ``rooms`` claim). The backend's history route
stays internal: the bridge reads it with the service token. Errors are ``{code, message}`` with
the contract's status.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, unquote

import orjson
import structlog

from bridge.auth import Authenticator, AuthError, Identity
from bridge.errors import StoreError, UpstreamError
from bridge.rooms import RoomRegistry
from bridge.tracing import random_traceparent
from bridge.upstream import HttpUpstream
from contracts import ErrorCode
from contracts.base import ID_PATTERN, MAX_ID_LENGTH
from contracts.errors import HTTP_STATUS

log = structlog.get_logger("bridge.rest")

Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]

USAGE_PATH = "/me/usage"
HISTORY_PATH = re.compile(r"^/rooms/([^/]+)/messages$")
DEFAULT_LIMIT = 50
MAX_LIMIT = 200
_ID = re.compile(ID_PATTERN)
TASK_PATH = re.compile(r"^/tasks/([^/]+)$")


class ClientApi:
    """Routes of section 4 "For clients"; ``handle`` answers or returns False (not ours)."""

    def __init__(self, *, auth: Authenticator, rooms: RoomRegistry, upstream: HttpUpstream):
        self._auth = auth
        self._rooms = rooms
        self._upstream = upstream

    async def handle(self, scope: Scope, send: Send) -> bool:
        path = scope.get("path", "")
        if path == USAGE_PATH:
            if scope.get("method") != "GET":
                await _error(send, 405, ErrorCode.INVALID_PAYLOAD, "only GET")
            else:
                await self._usage(scope, send)
            return True
        task = TASK_PATH.match(path)
        if task is not None:
            if scope.get("method") != "GET":
                await _error(send, 405, ErrorCode.INVALID_PAYLOAD, "only GET")
            else:
                await self._task(scope, send, unquote(task.group(1)))
            return True
        match = HISTORY_PATH.match(path)
        if match is None:
            return False
        if scope.get("method") != "GET":
            await _error(send, 405, ErrorCode.INVALID_PAYLOAD, "only GET")
            return True
        await self._history(scope, send, unquote(match.group(1)))
        return True

    async def _usage(self, scope: Scope, send: Send) -> None:
        """``GET /me/usage``: the caller's usage and budget today (CONTRACT.md section 4)."""
        try:
            ident = self._identify(scope)
        except AuthError as exc:
            return await _error(send, 401, ErrorCode.UNAUTHORIZED, str(exc))
        try:
            usage = await self._upstream.usage(ident.user_id, random_traceparent())
        except UpstreamError as exc:
            log.warning("usage_failed", code=exc.code.value)
            return await _error(send, HTTP_STATUS.get(exc.code, 502), exc.code, "usage unavailable")
        await reply_json(send, 200, usage.wire_json().encode())

    def _identify(self, scope: Scope) -> Identity:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        return self._auth.identify(None, {"HTTP_AUTHORIZATION": headers.get("authorization")})

    async def _history(self, scope: Scope, send: Send, room_id: str) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            ident = self._auth.identify(None, {"HTTP_AUTHORIZATION": headers.get("authorization")})
        except AuthError as exc:
            return await _error(send, 401, ErrorCode.UNAUTHORIZED, str(exc))
        if len(room_id) > MAX_ID_LENGTH or not _ID.match(room_id):
            return await _error(send, 422, ErrorCode.INVALID_PAYLOAD, "roomId: invalid")
        limit = _limit(scope.get("query_string", b""))
        if limit is None:
            return await _error(send, 422, ErrorCode.INVALID_PAYLOAD, f"limit: 1..{MAX_LIMIT}")
        try:
            allowed = await self._rooms.may_read(
                room_id, ident.user_id, granted=ident.rooms.admits(room_id)
            )
        except StoreError:
            return await _error(send, 503, ErrorCode.BACKEND_UNAVAILABLE, "try again")
        if allowed is None:
            return await _error(send, 404, ErrorCode.NOT_FOUND, "no such room")
        if not allowed:
            return await _error(send, 403, ErrorCode.FORBIDDEN, "not a member of this room")
        try:
            history = await self._upstream.history(room_id, limit, random_traceparent())
        except UpstreamError as exc:
            log.warning("history_failed", code=exc.code.value)
            status = HTTP_STATUS.get(exc.code, 502)
            return await _error(send, status, exc.code, "history unavailable")
        await reply_json(send, 200, history.wire_json().encode())

    async def _task(self, scope: Scope, send: Send, task_id: str) -> None:
        """``GET /tasks/{taskId}``: the caller's batch task, its content once done; the
        backend is asked with userId = the caller, so another user's task is 404."""
        try:
            ident = self._identify(scope)
        except AuthError as exc:
            return await _error(send, 401, ErrorCode.UNAUTHORIZED, str(exc))
        if len(task_id) > MAX_ID_LENGTH or not _ID.match(task_id):
            return await _error(send, 422, ErrorCode.INVALID_PAYLOAD, "taskId: invalid")
        try:
            status = await self._upstream.task_status(task_id, ident.user_id, random_traceparent())
        except UpstreamError as exc:
            if exc.code is ErrorCode.NOT_FOUND:
                return await _error(send, 404, ErrorCode.NOT_FOUND, "no such task")
            log.warning("task_status_failed", code=exc.code.value)
            status_code = HTTP_STATUS.get(exc.code, 502)
            return await _error(send, status_code, exc.code, "task status unavailable")
        await reply_json(send, 200, status.wire_json().encode())


def _limit(query: bytes) -> int | None:
    values = parse_qs(query.decode("latin-1")).get("limit")
    if not values:
        return DEFAULT_LIMIT
    raw = values[0]
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        return None
    return int(raw)


async def _error(send: Send, status: int, code: ErrorCode, message: str) -> None:
    await reply_json(send, status, orjson.dumps({"code": code.value, "message": message}))


async def reply_json(send: Send, status: int, body: bytes) -> None:
    """One JSON answer, never cached (the client and operator APIs)."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"cache-control", b"no-store")],
        }
    )
    await send({"type": "http.response.body", "body": body})
