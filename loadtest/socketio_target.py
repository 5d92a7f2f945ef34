"""The bridge as a target: one Socket.IO connection per simulated user, events routed by requestId.

Payload checks are split by rate (measured, see ``loadtest.clientbench``): ``ai_message_chunk`` is
the hot event (one per chunk per stream) and is checked by hand (``seq`` an int, ``chunk`` a str);
acks and terminal events are rare and validated with the ``contracts`` models. A payload that fails
either check counts as ``malformed`` on its request (a correctness violation).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from contracts import (
    AiMessageEnd,
    AiMessageError,
    ContractError,
    MessageAck,
    SendAccepted,
    SendRejected,
    parse,
)
from loadtest.record import RequestTracker
from loadtest.runner import ConnectStats, TargetHooks
from loadtest.sio_client import ConnectRefused, SioConnection, websocket_url
from loadtest.tokens import User

__all__ = ["SocketIoSettings", "SocketIoTarget"]


@dataclass(frozen=True, kw_only=True)
class SocketIoSettings:
    prompt: str
    socketio_path: str = "/socket.io/"
    connect_timeout_s: float = 10.0
    connect_concurrency: int = 50
    reconnect_attempts: int = 5
    reconnect_delay_s: float = 1.0


class SocketIoTarget:
    """Drives the bridge the way a browser would: ``send_message`` with an ack, then listens."""

    name = "bridge"

    def __init__(self, url: str, settings: SocketIoSettings) -> None:
        self.url = websocket_url(url, settings.socketio_path)
        self.settings = settings
        self.connect = ConnectStats()
        self._session: aiohttp.ClientSession | None = None
        self._hooks: TargetHooks | None = None
        self._users: Sequence[User] = ()
        self._conns: dict[int, SioConnection] = {}
        self._user_of: dict[int, int] = {}  # id(connection) -> user
        self._trackers: dict[str, RequestTracker] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def open(self, users: Sequence[User], hooks: TargetHooks) -> None:
        """Connect every user (a bounded number at a time); failures are counted, not raised."""
        self._hooks, self._users = hooks, users
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        self._session = aiohttp.ClientSession(connector=connector)
        gate = asyncio.Semaphore(self.settings.connect_concurrency)

        async def one(user: User) -> None:
            async with gate:
                if await self._connect(user):
                    hooks.user_ready(user.index)

        await asyncio.gather(*(one(user) for user in users))

    async def _connect(self, user: User) -> bool:
        assert self._session is not None
        conn = SioConnection(self._on_event, self._on_close)
        started = time.perf_counter()
        try:
            await conn.connect(
                self._session, self.url, {"token": user.token}, self.settings.connect_timeout_s
            )
        except ConnectRefused as exc:
            self._count_failure(exc.code)
            return False
        except TimeoutError:
            self._count_failure("TIMEOUT")
            return False
        except (aiohttp.ClientError, OSError) as exc:
            self._count_failure(type(exc).__name__)
            return False
        self.connect.connect_ms.append((time.perf_counter() - started) * 1000.0)
        self._conns[user.index] = conn
        self._user_of[id(conn)] = user.index
        return True

    def _count_failure(self, code: str) -> None:
        self.connect.failures[code] = self.connect.failures.get(code, 0) + 1

    async def start(self, tracker: RequestTracker, user: User) -> None:
        conn = self._conns.get(user.index)
        request_id = tracker.record.request_id
        self._trackers[request_id] = tracker
        payload = {"roomId": user.room_id, "content": self.settings.prompt, "requestId": request_id}

        def on_ack(data: Any, now: float) -> None:
            self._on_send_ack(tracker, data, now)

        now = time.perf_counter()
        tracker.on_sent(now)
        if conn is None or conn.closed:
            tracker.on_disconnect(now)
            return
        try:
            await conn.emit("send_message", payload, on_ack)
        except (ConnectionError, aiohttp.ClientError):
            tracker.on_disconnect(time.perf_counter())

    def _on_send_ack(self, tracker: RequestTracker, data: Any, now: float) -> None:
        try:
            if isinstance(data, dict) and data.get("ok") is True:
                accepted = parse(SendAccepted, data)
                tracker.on_ack(now, ok=True, path=accepted.path.value, code=None)
            else:
                rejected = parse(SendRejected, data)
                tracker.on_ack(now, ok=False, path=None, code=rejected.code.value)
        except ContractError:
            tracker.record.malformed += 1
            ok = isinstance(data, dict) and data.get("ok") is True
            code = str(data.get("code")) if isinstance(data, dict) else None
            tracker.on_ack(now, ok=ok, path=None, code=None if ok else code)

    def _on_event(self, name: str, data: Any, now: float) -> None:
        if not isinstance(data, dict):
            return
        if name == "ai_message_chunk":
            tracker = self._trackers.get(data.get("requestId", ""))
            if tracker is None:
                self.connect.late_events += 1
                return
            seq, chunk = data.get("seq"), data.get("chunk")
            if type(seq) is int and isinstance(chunk, str):
                tracker.on_chunk(now, seq, chunk)
            else:
                tracker.record.malformed += 1
            return
        message = data.get("message")
        request_id = data.get("requestId")
        if name == "new_message" and isinstance(message, dict):
            request_id = message.get("requestId")
        tracker = self._trackers.get(request_id) if isinstance(request_id, str) else None
        if tracker is None:
            self.connect.late_events += 1
            return
        try:
            self._on_rare_event(tracker, name, data, now)
        except ContractError:
            tracker.record.malformed += 1

    @staticmethod
    def _on_rare_event(
        tracker: RequestTracker, name: str, data: dict[str, Any], now: float
    ) -> None:
        if name == "ai_message_end":
            tracker.on_end(now, parse(AiMessageEnd, data).content)
        elif name == "ai_message_error":
            tracker.on_error(now, parse(AiMessageError, data).code.value)
        elif name == "message_ack":
            ack = parse(MessageAck, data)
            code = ack.code.value if ack.code is not None else None
            tracker.on_done(now, ok=ack.ok, path=ack.path.value, code=code)
        elif name == "new_message":
            message = data["message"]
            if message.get("role") == "assistant" and tracker.record.chunks == 0:
                tracker.on_content(now)

    def _on_close(self, conn: SioConnection, now: float) -> None:
        user = self._user_of.pop(id(conn), None)
        if user is None or self._stopping:
            return
        self._conns.pop(user, None)
        self.connect.disconnects += 1
        assert self._hooks is not None
        self._hooks.user_lost(user, now)
        task = asyncio.create_task(self._reconnect(self._users[user]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reconnect(self, user: User) -> None:
        for attempt in range(self.settings.reconnect_attempts):
            await asyncio.sleep(self.settings.reconnect_delay_s * (attempt + 1))
            if self._stopping:
                return
            if await self._connect(user):
                self.connect.reconnects += 1
                assert self._hooks is not None
                self._hooks.user_ready(user.index)
                return

    def forget(self, request_id: str) -> None:
        self._trackers.pop(request_id, None)

    def tick(self, now: float) -> None:
        for conn in list(self._conns.values()):
            if not conn.closed and now - conn.last_rx_at > conn.ping_deadline_s:
                conn.abort()

    async def close(self) -> None:
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        conns = list(self._conns.values())
        self._conns.clear()
        await asyncio.gather(*(conn.close() for conn in conns), return_exceptions=True)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
        if self._session is not None:
            await self._session.close()
