"""The backend client: one shared ``httpx.AsyncClient`` (keep-alive pool) and httpx-sse.

Every request carries the service token and a W3C ``traceparent`` (CONTRACT.md section 2).
Errors leave this module only as ``bridge.errors.UpstreamError`` subclasses (``translating``).

Hot path: a chunk event is decoded with ``orjson.loads`` and two type checks, not a pydantic
model; the rare events (start, end, error, JSON replies) go through the contract models.

The client's transport is httpx-aiohttp's ``AiohttpTransport``: the httpx API and httpx-sse on
top, aiohttp's C HTTP parser and connection pool below. Do not "simplify" it back to httpx's
default transport without measuring (bridge/README.md "Benchmark"): httpcore + h11 parse every
chunk in Python (most of the bridge's CPU per relayed chunk), and httpcore 1.0's pool does
O(connections^2) bookkeeping on every request and response close, which the previous
work-around (32 pools used in turn) only divided.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import httpx
import httpx_sse
import orjson
from httpx_aiohttp import AiohttpTransport

from bridge.errors import (
    UpstreamDisconnected,
    UpstreamHttpError,
    UpstreamProtocolError,
    code_for_status,
    retry_after_ms,
    translating,
)
from bridge.settings import Timeouts
from contracts import (
    ChatRequest,
    CompleteResponse,
    ContractError,
    ErrorBody,
    HistoryResponse,
    NewMessage,
    PostRequest,
    StreamEnd,
    StreamError,
    StreamStart,
    TaskAccepted,
    TaskStatus,
    UsageResponse,
    parse_json,
)

T = TypeVar("T")

MAX_ERROR_BODY_BYTES = 4096
# After the terminal event the backend ends the body; reading it to EOF hands the connection
# back to the keep-alive pool (closing a response with unread body discards the connection,
# and a fresh TCP + HTTP setup per stream costs TTFT and CPU).
DRAIN_TIMEOUT_S = 0.25
MAX_DRAIN_EVENTS = 16
KEEPALIVE_EXPIRY_S = 30.0


@dataclass(frozen=True, slots=True)
class Start:
    message_id: str
    user_message_id: str
    queue_position: int = 0  # > 0: the generation waits for its room (the backend's lock)


@dataclass(frozen=True, slots=True)
class Chunk:
    seq: int
    text: str


@dataclass(frozen=True, slots=True)
class End:
    body: StreamEnd


@dataclass(frozen=True, slots=True)
class Failed:
    body: StreamError


UpstreamEvent = Start | Chunk | End | Failed


class UpstreamStream(Protocol):
    """One open SSE stream of a generation."""

    def events(self) -> AsyncIterator[UpstreamEvent]:
        """The stream's events; raises ``UpstreamDisconnected`` at an EOF without a terminal
        event. It does not time out: the reader bounds each wait (one timer per stream, not a
        timeout context per event: that is measurable per chunk)."""
        ...

    async def aclose(self) -> None: ...


class Upstream(Protocol):
    """The backend endpoints a relay uses (CONTRACT.md section 2)."""

    async def open_stream(self, request: ChatRequest, traceparent: str) -> UpstreamStream: ...

    async def resume(
        self, request_id: str, user_id: str, last_seq: int | None, traceparent: str
    ) -> UpstreamStream: ...

    async def complete(
        self, request: ChatRequest, traceparent: str, timeout_s: float
    ) -> CompleteResponse: ...

    async def cancel(self, request_id: str, user_id: str, traceparent: str) -> None: ...

    async def post_message(
        self, room_id: str, request: PostRequest, traceparent: str
    ) -> NewMessage: ...


class TaskUpstream(Protocol):
    """The backend's batch endpoints (CONTRACT.md section 2 "Batch")."""

    async def create_task(self, request: ChatRequest, traceparent: str) -> TaskAccepted: ...

    async def task_status(self, task_id: str, user_id: str, traceparent: str) -> TaskStatus: ...


def decode_event(name: str, data: str) -> UpstreamEvent | None:
    """One SSE event as an ``UpstreamEvent``; ``None`` for names the contract does not know."""
    if name == "chunk":
        try:
            raw: Any = orjson.loads(data)
            seq, text = raw["seq"], raw["chunk"]
        except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
            raise UpstreamProtocolError("chunk: not a {seq, chunk} object") from None
        if type(seq) is not int or seq < 0 or type(text) is not str:
            raise UpstreamProtocolError("chunk: seq or chunk has the wrong type")
        return Chunk(seq, text)
    try:
        if name == "start":
            start = parse_json(StreamStart, data)
            return Start(start.message_id, start.user_message_id, start.queue_position or 0)
        if name == "end":
            return End(parse_json(StreamEnd, data))
        if name == "error":
            return Failed(parse_json(StreamError, data))
    except ContractError as exc:
        raise UpstreamProtocolError(f"{name}: {exc.message}") from None
    return None


class HttpUpstreamStream:
    """An open ``text/event-stream`` response read event by event."""

    def __init__(self, response: httpx.Response, what: str) -> None:
        self._response = response
        self._what = what
        self._finished = False
        self._events: AsyncGenerator[httpx_sse.ServerSentEvent, None] = httpx_sse.EventSource(
            response
        ).aiter_sse()
        self._iter: AsyncGenerator[UpstreamEvent, None] | None = None

    def events(self) -> AsyncIterator[UpstreamEvent]:
        if self._iter is None:
            self._iter = self._iterate()
        return self._iter

    async def _iterate(self) -> AsyncGenerator[UpstreamEvent, None]:
        with translating(self._what):
            async for sse in self._events:
                event = decode_event(sse.event, sse.data)
                if event is None:
                    continue
                if type(event) is End or type(event) is Failed:
                    self._finished = True
                yield event
            raise UpstreamDisconnected(f"{self._what}: stream ended early")

    async def aclose(self) -> None:
        if self._iter is not None:
            await self._iter.aclose()
        if self._finished:
            try:
                async with asyncio.timeout(DRAIN_TIMEOUT_S):
                    for _ in range(MAX_DRAIN_EVENTS):
                        await anext(self._events)
            except (StopAsyncIteration, TimeoutError, httpx.HTTPError):
                pass
        try:
            await self._events.aclose()
        except Exception:  # closing a broken stream must not raise
            pass
        await self._response.aclose()


class HttpUpstream:
    """``Upstream`` over HTTP/1.1 keep-alive; the pool is shared by every relay."""

    def __init__(
        self,
        *,
        base_url: str,
        token: str,
        timeouts: Timeouts,
        max_connections: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._timeouts = timeouts
        if transport is None:
            limits = httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
                keepalive_expiry=KEEPALIVE_EXPIRY_S,
            )
            transport = AiohttpTransport(limits=limits)
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers={"Authorization": f"Bearer {token}"},
            # Read waits are bounded per event by the relay (first event, TTFT, idle), so the
            # transport's own read timeout is off; connect and pool waits stay bounded here.
            timeout=httpx.Timeout(connect=timeouts.connect_s, read=None, write=5.0, pool=5.0),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def open_stream(self, request: ChatRequest, traceparent: str) -> UpstreamStream:
        req = self._client.build_request(
            "POST",
            "/chat/messages/stream",
            content=request.wire_json(),
            headers=_headers(traceparent, sse=True),
        )
        return await self._send_stream(req, "open stream")

    async def resume(
        self, request_id: str, user_id: str, last_seq: int | None, traceparent: str
    ) -> UpstreamStream:
        headers = _headers(traceparent, sse=True)
        if last_seq is not None:
            headers["Last-Event-ID"] = str(last_seq)
        req = self._client.build_request(
            "GET",
            f"/chat/messages/stream/{quote(request_id, safe='')}",
            params={"userId": user_id},
            headers=headers,
        )
        return await self._send_stream(req, "resume stream")

    async def complete(
        self, request: ChatRequest, traceparent: str, timeout_s: float
    ) -> CompleteResponse:
        return await self._call(
            "complete", "POST", "/chat/messages", traceparent, timeout_s,
            CompleteResponse.model_validate_json, content=request.wire_json(),
        )  # fmt: skip

    async def post_message(
        self, room_id: str, request: PostRequest, traceparent: str
    ) -> NewMessage:
        """``POST /chat/rooms/{roomId}/messages``: store a person-to-person message (idempotent
        per user and requestId); the message as stored."""
        return await self._call(
            "post message", "POST", f"/chat/rooms/{quote(room_id, safe='')}/messages",
            traceparent, self._timeouts.cancel_s, NewMessage.model_validate_json,
            content=request.wire_json(),
        )  # fmt: skip

    async def history(self, room_id: str, limit: int, traceparent: str) -> HistoryResponse:
        """``GET /chat/rooms/{roomId}/messages`` with the service token (internal to the two)."""
        return await self._call(
            "history", "GET", f"/chat/rooms/{quote(room_id, safe='')}/messages", traceparent,
            self._timeouts.cancel_s, HistoryResponse.model_validate_json, params={"limit": limit},
        )  # fmt: skip

    async def create_task(self, request: ChatRequest, traceparent: str) -> TaskAccepted:
        """``POST /chat/tasks``: queue a batch answer (202; the same requestId again is the
        same task, its current status)."""
        return await self._call(
            "create task", "POST", "/chat/tasks", traceparent, self._timeouts.cancel_s,
            TaskAccepted.model_validate_json, content=request.wire_json(), accept=(200, 202),
        )  # fmt: skip

    async def task_status(self, task_id: str, user_id: str, traceparent: str) -> TaskStatus:
        """``GET /chat/tasks/{taskId}?userId=U`` (404 when that user has no such task)."""
        return await self._call(
            "task status", "GET", f"/chat/tasks/{quote(task_id, safe='')}", traceparent,
            self._timeouts.cancel_s, TaskStatus.model_validate_json, params={"userId": user_id},
        )  # fmt: skip

    async def usage(self, user_id: str, traceparent: str) -> UsageResponse:
        """``GET /chat/usage/{userId}``: today's usage and budget of one user."""
        return await self._call(
            "usage", "GET", f"/chat/usage/{quote(user_id, safe='')}", traceparent,
            self._timeouts.cancel_s, UsageResponse.model_validate_json,
        )  # fmt: skip

    async def cancel(self, request_id: str, user_id: str, traceparent: str) -> None:
        await self._call(
            "cancel", "POST", f"/chat/messages/{quote(request_id, safe='')}/cancel", traceparent,
            self._timeouts.cancel_s, _ignore, params={"userId": user_id},
        )  # fmt: skip

    async def _call(
        self,
        what: str,
        method: str,
        path: str,
        traceparent: str,
        timeout_s: float,
        parse: Callable[[bytes], T],
        *,
        params: dict[str, str | int] | None = None,
        content: str | None = None,
        accept: tuple[int, ...] = (200,),
    ) -> T:
        """One bounded JSON request: ``parse`` of a 200 (or ``accept``) body, else the
        backend's error."""
        with translating(what):
            async with asyncio.timeout(timeout_s):
                response = await self._client.request(
                    method, path, params=params, content=content,
                    headers=_headers(traceparent, sse=False),
                )  # fmt: skip
                if response.status_code not in accept:
                    raise _http_error(response, response.content)
                return parse(response.content)

    async def _send_stream(self, req: httpx.Request, what: str) -> UpstreamStream:
        with translating(what):
            async with asyncio.timeout(self._timeouts.connect_s + self._timeouts.first_event_s):
                response = await self._client.send(req, stream=True)
            try:
                if response.status_code != 200:
                    async with asyncio.timeout(self._timeouts.connect_s):
                        body = await _read_capped(response)
                    raise _http_error(response, body)
                content_type = response.headers.get("content-type", "")
                if not content_type.startswith("text/event-stream"):
                    raise UpstreamProtocolError(f"{what}: not an event stream")
            except BaseException:
                await response.aclose()
                raise
            return HttpUpstreamStream(response, what)


def _ignore(body: bytes) -> None:
    return None


def _headers(traceparent: str, *, sse: bool) -> dict[str, str]:
    headers = {"traceparent": traceparent, "Content-Type": "application/json"}
    if sse:
        headers["Accept"] = "text/event-stream"
        headers["Cache-Control"] = "no-store"
    return headers


async def _read_capped(response: httpx.Response) -> bytes:
    body = bytearray()
    async for part in response.aiter_bytes():
        body += part
        if len(body) >= MAX_ERROR_BODY_BYTES:
            break
    return bytes(body[:MAX_ERROR_BODY_BYTES])


def _http_error(response: httpx.Response, body: bytes) -> UpstreamHttpError:
    status = response.status_code
    after_ms = retry_after_ms(response.headers.get("retry-after"))
    try:
        parsed = ErrorBody.model_validate_json(body)
    except ValueError:
        code = code_for_status(status)
        return UpstreamHttpError(
            status, code, f"backend answered {status}", retry_after_ms=after_ms
        )
    return UpstreamHttpError(
        status, parsed.code, parsed.message, retryable=parsed.retryable, retry_after_ms=after_ms
    )
