"""A lean Socket.IO v4 / Engine.IO v4 client over aiohttp websockets, built to hold thousands.

Why not ``socketio.AsyncClient``: measured on this machine (2 cores) with
``python -m loadtest.clientbench`` -- N clients in one process against a python-socketio server in
another, every client receiving a stream of events, CPU of the *client* process only:

    2,000 clients, 5 s idle then 10 s of broadcasts (~6,500 events/s received in total)
    impl              loop     connect 2,000  RSS/conn  tasks/conn  CPU per event  idle CPU
    socketio.Async*   asyncio  2.7 s          32 KiB    4           88 us          ~0 %
    this module       asyncio  1.3 s          15 KiB    1           23 us          ~0 %
    socketio.Async*   uvloop   2.2 s          32 KiB    4           66 us          ~0 %
    this module       uvloop   1.6 s          15 KiB    1           17 us          ~0 %
    (200 clients: 50 vs 21 us per event, 75 vs 14 KiB per connection)

2,000 streams at ~20 chunks/s each are 40,000 events/s: 2.6-3.5 cores of CPU for python-socketio's
client (this machine has 2, shared with the system under test) against ~0.7 core for this one,
so python-socketio's client would distort the figures it is meant to measure. The CLI runs on
uvloop when it is installed (it comes with ``uvicorn[standard]``).

python-socketio's client runs, per connection, its own read loop, write loop and ping tasks plus a
new task for every received event (``async_handlers``), and decodes each packet through its packet
classes. This client runs one task per connection (the reader), decodes with orjson, answers pings
inline and leaves timeouts to the runner's single watchdog. All connections share one
``aiohttp.ClientSession``. It speaks only what the load test needs: websocket transport (no
long-polling, no upgrade), namespace ``/``, text packets, events, acks and connect errors.

Wire reference (socket.io-protocol v5 over engine.io v4): ``0{...}`` open; ``2``/``3`` ping/pong
(the server pings); ``40{auth}`` connect; ``40{"sid"}`` connected; ``44{...}`` connect_error;
``42[...]`` event; ``42<id>[...]`` event with an ack id; ``43<id>[...]`` ack; ``41`` disconnect;
``1`` engine close.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson

__all__ = [
    "AckCallback",
    "CloseCallback",
    "ConnectRefused",
    "EventCallback",
    "SioConnection",
    "websocket_url",
]

EventCallback = Callable[[str, Any, float], None]
AckCallback = Callable[[Any, float], None]
CloseCallback = Callable[["SioConnection", float], None]

DEFAULT_SOCKETIO_PATH = "/socket.io/"
# Silence longer than the server's ping interval + timeout means a dead peer; never less than this.
MIN_PING_DEADLINE_S = 1.0


class ConnectRefused(ConnectionError):
    """The server refused the connection; ``code`` is the contract's code or ``HTTP_<status>``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def websocket_url(base_url: str, path: str = DEFAULT_SOCKETIO_PATH) -> str:
    """``http://h:p`` -> ``ws://h:p/socket.io/?EIO=4&transport=websocket``."""
    parts = urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    full_path = "/" + path.strip("/") + "/"
    return urlunsplit((scheme, parts.netloc, full_path, "EIO=4&transport=websocket", ""))


class SioConnection:
    """One Socket.IO client connection; events and acks go to plain callbacks on the loop."""

    __slots__ = (
        "_acks",
        "_next_ack_id",
        "_on_close",
        "_on_event",
        "_reader",
        "_ws",
        "closed",
        "last_rx_at",
        "ping_deadline_s",
        "sid",
    )

    def __init__(self, on_event: EventCallback, on_close: CloseCallback) -> None:
        self._on_event = on_event
        self._on_close = on_close
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._acks: dict[int, AckCallback] = {}
        self._next_ack_id = 0
        self.closed = True
        self.sid: str | None = None
        self.last_rx_at = 0.0
        self.ping_deadline_s = 45.0

    async def connect(
        self, session: aiohttp.ClientSession, url: str, auth: dict[str, Any], timeout_s: float
    ) -> None:
        """Open the websocket, do both handshakes, start the reader. Raises on refusal/timeout."""
        async with asyncio.timeout(timeout_s):
            try:
                ws = await session.ws_connect(url, autoping=True, max_msg_size=0)
            except aiohttp.WSServerHandshakeError as exc:
                raise ConnectRefused(f"HTTP_{exc.status}", exc.message) from None
            try:
                await self._handshake(ws, auth)
            except BaseException:
                await ws.close()
                raise
        self._ws = ws
        self.closed = False
        self.last_rx_at = time.perf_counter()
        self._reader = asyncio.create_task(self._read_loop(ws), name=f"sio-reader-{self.sid}")

    async def _handshake(self, ws: aiohttp.ClientWebSocketResponse, auth: dict[str, Any]) -> None:
        opened = False
        while True:  # bounded by the caller's timeout
            text = await _receive_text(ws)
            if text.startswith("0") and not opened:
                info = orjson.loads(text[1:])
                interval_s = info.get("pingInterval", 25000) / 1000.0
                timeout_s = info.get("pingTimeout", 20000) / 1000.0
                self.ping_deadline_s = max(interval_s + timeout_s, MIN_PING_DEADLINE_S)
                opened = True
                await ws.send_str("40" + orjson.dumps(auth).decode())
            elif text == "2":
                await ws.send_str("3")
            elif text.startswith("40") and opened:
                self.sid = orjson.loads(text[2:] or b"{}").get("sid")
                return
            elif text.startswith("44"):
                data = orjson.loads(text[2:] or b"{}")
                # python-socketio nests the refusal's payload: {"message", "data": {code, message}}
                detail = data.get("data") if isinstance(data.get("data"), dict) else data
                code = str(detail.get("code") or "CONNECT_ERROR")
                raise ConnectRefused(code, str(detail.get("message") or data.get("message")))
            elif text.startswith(("1", "41")):
                raise ConnectRefused("CLOSED", "server closed during the handshake")

    async def emit(self, event: str, data: Any, ack: AckCallback | None = None) -> None:
        """Send an event; ``ack`` is called with the ack's first argument when it arrives."""
        if self._ws is None or self.closed:
            raise ConnectionResetError("not connected")
        if ack is None:
            await self._ws.send_str("42" + orjson.dumps([event, data]).decode())
            return
        ack_id = self._next_ack_id
        self._next_ack_id += 1
        self._acks[ack_id] = ack
        await self._ws.send_str(f"42{ack_id}" + orjson.dumps([event, data]).decode())

    def forget_ack(self, ack: AckCallback) -> None:
        for ack_id, callback in list(self._acks.items()):
            if callback is ack:
                del self._acks[ack_id]

    async def _read_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for msg in ws:
                now = time.perf_counter()
                self.last_rx_at = now
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    continue
                text: str = msg.data
                if text == "2":
                    await ws.send_str("3")
                elif text.startswith("42"):
                    self._dispatch_event(text, now)
                elif text.startswith("43"):
                    self._dispatch_ack(text, now)
                elif text.startswith(("41", "1")):
                    break
        except (aiohttp.ClientError, ConnectionError, orjson.JSONDecodeError):
            pass
        finally:
            await self._mark_closed(ws)

    def _dispatch_event(self, text: str, now: float) -> None:
        start = 2
        while start < len(text) and text[start].isdigit():  # server asks for an ack: not used
            start += 1
        payload = orjson.loads(text[start:])
        if isinstance(payload, list) and payload and isinstance(payload[0], str):
            self._on_event(payload[0], payload[1] if len(payload) > 1 else None, now)

    def _dispatch_ack(self, text: str, now: float) -> None:
        bracket = text.find("[")
        if bracket < 3:
            return
        callback = self._acks.pop(int(text[2:bracket]), None)
        if callback is not None:
            args = orjson.loads(text[bracket:])
            callback(args[0] if args else None, now)

    async def _mark_closed(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        if self.closed:
            return
        self.closed = True
        self._acks.clear()
        if not ws.closed:
            await ws.close()
        self._on_close(self, time.perf_counter())

    async def close(self, timeout_s: float = 5.0) -> None:
        """Disconnect politely (``41``), stop the reader; never raises on a dead connection."""
        ws, reader = self._ws, self._reader
        if ws is None:
            return
        try:
            async with asyncio.timeout(timeout_s):
                if not ws.closed:
                    await ws.send_str("41")
                    await ws.close()
                if reader is not None:
                    await reader
        except (TimeoutError, aiohttp.ClientError, ConnectionError):
            if reader is not None:
                reader.cancel()

    def abort(self) -> None:
        """Drop the connection at once (used by the ping watchdog on a dead peer)."""
        if self._reader is not None:
            self._reader.cancel()


async def _receive_text(ws: aiohttp.ClientWebSocketResponse) -> str:
    msg = await ws.receive()
    if msg.type is aiohttp.WSMsgType.TEXT:
        return str(msg.data)
    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
        raise ConnectRefused("CLOSED", "websocket closed during the handshake")
    if msg.type is aiohttp.WSMsgType.ERROR:
        raise ConnectRefused("WS_ERROR", str(msg.data))
    return ""
