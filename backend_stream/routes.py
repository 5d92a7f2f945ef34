"""HTTP endpoints of CONTRACT.md section 2.

Resume and cancel paths carry only the requestId while idempotency is per (userId, requestId):
both take an optional ``userId`` (query; cancel also a JSON body ``{userId}``). Without it the
requestId is resolved through the ``bs:req:{requestId}`` index: 404 when unknown, 409 when more
than one user used that requestId.
"""

from __future__ import annotations

import datetime
import hmac
import re
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Annotated

import orjson
import structlog
from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import Response
from redis.exceptions import RedisError

from backend_stream.app import Services
from backend_stream.errors import RequestRejected
from backend_stream.generation import Event, payload_event
from backend_stream.listeners import is_ping
from backend_stream.logs import bind_request
from backend_stream.registry import Attachment
from backend_stream.sse import SseResponse
from backend_stream.store import GenKey, GenState
from backend_stream.usage import utc_day
from contracts import (
    CancelResponse,
    ChatMessage,
    ChatRequest,
    CompleteResponse,
    ErrorCode,
    HistoryResponse,
    NewMessage,
    PostRequest,
    Role,
    SseEvent,
    StreamError,
    check_content,
    parse_json,
    utc_now_iso,
)
from contracts.base import ID_PATTERN, MAX_ID_LENGTH

log = structlog.get_logger("backend_stream.routes")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DEFAULT_HISTORY_LIMIT = 50
OPEN_WAIT_MARGIN_S = 1.0
MAX_CANCEL_BODY_BYTES = 4096

IdPath = Annotated[str, Path(pattern=ID_PATTERN, max_length=MAX_ID_LENGTH)]
UserQuery = Annotated[
    str | None, Query(alias="userId", pattern=ID_PATTERN, max_length=MAX_ID_LENGTH)
]


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


async def require_token(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> None:
    """``async`` so FastAPI runs it inline: a plain ``def`` dependency costs a thread hop."""
    expected = services(request).settings.backend_token
    scheme, _, token = (authorization or "").partition(" ")
    valid = scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), expected.encode())
    if not valid:
        raise RequestRejected(ErrorCode.UNAUTHORIZED, "missing or wrong service token")


public = APIRouter()
router = APIRouter()
secured = APIRouter(dependencies=[Depends(require_token)])


@public.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@public.get("/readyz")
async def readyz(request: Request) -> Response:
    try:
        await services(request).redis.ping()
    except (RedisError, OSError):
        return Response(b'{"status":"redis unavailable"}', 503, media_type="application/json")
    return Response(b'{"status":"ready"}', media_type="application/json")


@public.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(services(request).metrics.render(), media_type="text/plain; version=0.0.4")


@secured.post("/chat/messages/stream")
async def stream_message(request: Request) -> Response:
    received_at = time.monotonic()
    svc = services(request)
    req = await _chat_request(request, svc, "stream")
    att = await svc.registry.start_or_attach(req, received_at)
    await _raise_if_failed(att, svc)
    return _sse(svc, att, after_seq=-1, received_at=received_at)


@secured.get("/chat/messages/stream/{request_id}")
async def resume_stream(
    request: Request,
    request_id: IdPath,
    user_id: UserQuery = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> Response:
    received_at = time.monotonic()
    svc = services(request)
    after_seq = _parse_last_event_id(last_event_id)
    key = await _resolve_key(svc, request_id, user_id)
    bind_request(path="resume", request_id=request_id, user_id=key.user_id)
    att = await svc.registry.find(key)
    if att is None:
        raise RequestRejected(ErrorCode.NOT_FOUND, "no such generation (or it has expired)")
    return _sse(svc, att, after_seq=after_seq, received_at=received_at)


@secured.post("/chat/messages")
async def complete_message(request: Request) -> Response:
    received_at = time.monotonic()
    svc = services(request)
    req = await _chat_request(request, svc, "complete")
    att = await svc.registry.start_or_attach(req, received_at)
    await _raise_if_failed(att, svc)
    terminal = await _wait_terminal(svc, att, received_at)
    if terminal.kind is not SseEvent.END or terminal.payload is None:
        raise terminal.as_error()
    start = att.start
    payload = {
        **terminal.payload,
        "requestId": start.request_id,
        "roomId": start.room_id,
        "userMessageId": start.user_message_id,
    }
    body = CompleteResponse.model_validate(payload).wire()
    return Response(orjson.dumps(body), media_type="application/json")


@secured.post("/chat/messages/{request_id}/cancel")
async def cancel_message(
    request: Request, request_id: IdPath, user_id: UserQuery = None
) -> Response:
    svc = services(request)
    user_id = user_id or await _user_from_body(request)
    key = await _resolve_key(svc, request_id, user_id)
    bind_request(path="cancel", request_id=request_id, user_id=key.user_id)
    status = await svc.registry.cancel(key)
    if status is None:
        raise RequestRejected(ErrorCode.NOT_FOUND, "no such generation (or it has expired)")
    reply = CancelResponse(
        ok=True, request_id=request_id, status="done" if status == "done" else "cancelling"
    )
    return Response(reply.wire_json(), media_type="application/json")


@secured.post("/chat/rooms/{room_id}/messages")
async def post_message(request: Request, room_id: IdPath) -> Response:
    """A person-to-person message: stored in order with the room's AI exchanges, once per
    (userId, requestId); answers the stored message (``{roomId, message}``)."""
    svc = services(request)
    raw = await _read_body(request, svc.settings.max_body_bytes)
    post = parse_json(PostRequest, raw)
    bind_request(path="post", request_id=post.request_id, room_id=room_id, user_id=post.user_id)
    check_content(post.content, svc.settings.max_content_chars)
    message = ChatMessage(
        id=f"p-{uuid.uuid4().hex}", request_id=post.request_id, role=Role.USER,
        content=post.content, user_id=post.user_id, created_at=utc_now_iso(),
    )  # fmt: skip
    _, stored = await svc.store.post(room_id, message)
    reply = NewMessage(room_id=room_id, message=stored)
    return Response(reply.wire_json(), media_type="application/json")


@secured.get("/chat/rooms/{room_id}/messages")
async def room_history(
    request: Request,
    room_id: IdPath,
    limit: Annotated[int, Query(ge=1, le=10_000)] = DEFAULT_HISTORY_LIMIT,
) -> Response:
    svc = services(request)
    messages = await svc.store.history(room_id, min(limit, svc.settings.history_cap))
    reply = HistoryResponse(room_id=room_id, messages=messages)
    return Response(reply.wire_json(), media_type="application/json")


DayQuery = Annotated[str | None, Query(pattern=r"^\d{4}-\d{2}-\d{2}$")]


@secured.get("/chat/usage/{user_id}")
async def user_usage(request: Request, user_id: IdPath, day: DayQuery = None) -> Response:
    """The user's usage on a UTC day (default today) and what its budgets leave."""
    svc = services(request)
    if svc.ledger is None:
        raise RequestRejected(ErrorCode.NOT_FOUND, "usage is not counted here")
    if day is not None:
        try:
            datetime.date.fromisoformat(day)
        except ValueError:
            raise RequestRejected(ErrorCode.INVALID_PAYLOAD, "day: YYYY-MM-DD") from None
    reply = await svc.ledger.read(user_id, day or utc_day())
    return Response(reply.wire_json(), media_type="application/json")


router.include_router(public)
router.include_router(secured)


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused with 413 past ``max_bytes`` before it is all read or parsed."""
    declared = request.headers.get("content-length", "")
    too_big = RequestRejected(
        ErrorCode.INVALID_PAYLOAD, f"request body larger than {max_bytes} bytes", status=413
    )
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_big
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > max_bytes:
            raise too_big
    return bytes(body)


async def _chat_request(request: Request, svc: Services, path: str) -> ChatRequest:
    raw = await _read_body(request, svc.settings.max_body_bytes)
    req = parse_json(ChatRequest, raw)
    bind_request(
        path=path,
        request_id=req.request_id,
        room_id=req.room_id,
        user_id=req.user_id,
        character_id=req.character_id,
    )
    check_content(req.content, svc.settings.max_content_chars)
    return req


async def _user_from_body(request: Request) -> str | None:
    raw = await _read_body(request, MAX_CANCEL_BODY_BYTES)
    if not raw.strip():
        return None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise RequestRejected(ErrorCode.INVALID_PAYLOAD, "body must be JSON") from None
    user_id = data.get("userId") if isinstance(data, dict) else None
    if user_id is None:
        return None
    if not isinstance(user_id, str) or not _valid_id(user_id):
        raise RequestRejected(ErrorCode.INVALID_PAYLOAD, "userId: invalid")
    return user_id


def _valid_id(value: str) -> bool:
    return len(value) <= MAX_ID_LENGTH and re.fullmatch(ID_PATTERN, value) is not None


async def _resolve_key(svc: Services, request_id: str, user_id: str | None) -> GenKey:
    if user_id:
        return GenKey(user_id, request_id)
    users = await svc.store.users_for_request(request_id)
    if not users:
        raise RequestRejected(ErrorCode.NOT_FOUND, "no such generation (or it has expired)")
    if len(users) > 1:
        raise RequestRejected(
            ErrorCode.INVALID_PAYLOAD, "requestId used by several users: pass userId", status=409
        )
    return GenKey(users[0], request_id)


def _parse_last_event_id(raw: str | None) -> int:
    if raw is None or raw.strip() == "":
        return -1
    value = raw.strip()
    if not value.isdigit() or len(value) > 12:
        raise RequestRejected(ErrorCode.INVALID_PAYLOAD, "Last-Event-ID must be a chunk seq")
    return int(value)


async def _raise_if_failed(att: Attachment, svc: Services) -> None:
    """Failures before the stream starts are plain HTTP errors (CONTRACT.md section 2)."""
    gen = att.local
    if gen is not None and not att.attached:
        if gen.start.queue_position:  # waits for its room: `start` now, the chunks later
            return
        try:
            await gen.wait_opened(svc.settings.first_token_timeout_s + OPEN_WAIT_MARGIN_S)
        except TimeoutError:
            return
        if gen.terminal is not None and gen.terminal.kind is SseEvent.ERROR and not gen.opened:
            raise gen.terminal.as_error()
    elif gen is None and att.state is GenState.FAILED:
        raise payload_event(SseEvent.ERROR, orjson.loads(att.meta.get("error") or "{}")).as_error()


async def _wait_terminal(svc: Services, att: Attachment, received_at: float) -> Event:
    async with aclosing(svc.feed.events(att, after_seq=-1, received_at=received_at)) as events:
        async for event in events:
            if event.kind in (SseEvent.END, SseEvent.ERROR) and not is_ping(event):
                return event
    raise RequestRejected(ErrorCode.INTERNAL, "generation ended without a terminal event")


def _sse(svc: Services, att: Attachment, *, after_seq: int, received_at: float) -> Response:
    events = svc.feed.events(att, after_seq=after_seq, received_at=received_at)

    async def body() -> AsyncGenerator[bytes, None]:
        svc.metrics.active_streams.inc()
        try:
            async for event in events:
                yield event.frame
        except (RedisError, OSError) as exc:
            log.warning("stream_storage_error", error=type(exc).__name__)
            err = StreamError(
                code=ErrorCode.BACKEND_UNAVAILABLE, message="storage unavailable", retryable=True
            )
            yield payload_event(SseEvent.ERROR, err.wire()).frame
        finally:
            svc.metrics.active_streams.dec()
            await events.aclose()

    return SseResponse(body(), headers=SSE_HEADERS)
