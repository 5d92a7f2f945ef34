"""The one typed wrapper around python-socketio's untyped ``AsyncServer``.

Choices, and why (do not "simplify" them without reading this):

- ASGI under uvicorn (uvloop + httptools + websockets), as ARCHITECTURE.md draws it: one event
  loop per process, the probes and /metrics served by a tiny ASGI app next to ``/socket.io``.
- Handlers get an explicit ``ack`` callable instead of returning the ack: the ``send_message`` ack
  must reach the sender *before* ``new_message`` (CONTRACT.md ordering, step 1), but the relay
  decides when it is accepted (on the backend's ``start``). ``_handle_event_internal`` is
  overridden for the events registered with ``on``; others keep python-socketio's behaviour.
- Room emits skip ``AsyncManager.emit`` (one task per recipient) and ``AsyncPubSubManager.emit``
  (every emit through Redis and back, even when no other replica has members): the packet is
  encoded once and put straight on each local socket's Engine.IO queue; Redis carries it only
  when another replica has members of the room (``publish``). Events that arrive from other
  replicas through the queue take the same local path (``_handle_emit`` override).
- Every packet to a socket goes through ``push``: the per-socket output is bounded. A queue over
  ``socket_max_queue`` packets that has not drained below it ``drain_grace_s`` later, or that
  reaches ``HARD_QUEUE_FACTOR`` times the bound at any moment, gets its socket disconnected and
  its queue dropped (the client recovers by reconnecting and re-joining), instead of memory
  growing for a slow reader. The grace is there because a healthy socket also sees bursts: a
  relay can put many chunks in a row without yielding (buffered SSE, a joiner's replay), and
  Engine.IO's writer empties the whole queue each time it runs.
- ``DeliveryFilter`` (bridge/fanout.py) orders the ``ai_message_*`` events per socket.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import socketio
import structlog

from bridge import compat
from bridge.fanout import DeliveryFilter, encode, encode_ack
from contracts.aio import cancel_and_wait

log = structlog.get_logger("bridge.sio")

NAMESPACE = compat.NAMESPACE
CONTROL_PREFIX = "bridge:"
KICK_CLOSE_TIMEOUT_S = 5.0
HARD_QUEUE_FACTOR = 10

Payload = dict[str, Any]
AckFn = Callable[[Payload], None]
EventHandler = Callable[[str, object, AckFn], Awaitable[None]]
ConnectHandler = Callable[[str, dict[str, Any], object], Awaitable[None]]
DisconnectHandler = Callable[[str], Awaitable[None]]


class Refused(Exception):
    """Raised by the connect handler: the client gets ``connect_error`` with ``{code, message}``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class SocketServer:
    """Typed face of the Socket.IO server: handlers, rooms, bounded sends, cross-replica emits."""

    def __init__(
        self,
        *,
        redis_url: str,
        channel: str,
        socket_max_queue: int,
        drain_grace_s: float,
        cors_origins: tuple[str, ...],
        on_connect: ConnectHandler,
        on_disconnect: DisconnectHandler,
        on_resubscribed: Callable[[], None] | None = None,
    ) -> None:
        self._manager = compat.Manager(redis_url, channel=channel)
        self._manager.on_remote_emit = self._remote_emit
        self._controls: dict[str, Callable[[str, Payload], None]] = {}
        self._manager.on_resubscribed = on_resubscribed
        cors: str | list[str] | None = None
        if cors_origins:
            cors = "*" if "*" in cors_origins else list(cors_origins)
        sio_logger, eio_logger = compat.quiet_loggers(logging.WARNING)
        self._sio = compat.Server(
            client_manager=self._manager,
            async_mode="asgi",
            cors_allowed_origins=cors,
            logger=sio_logger,
            engineio_logger=eio_logger,
        )
        self._sio.route_event = self._route
        self._sio.send_packet = self.push
        self._handlers: dict[str, EventHandler] = {}
        self._max_queue = socket_max_queue
        self._hard_max_queue = socket_max_queue * HARD_QUEUE_FACTOR
        self._drain_grace_s = drain_grace_s
        self._over: set[str] = set()
        self._kicked: set[str] = set()
        self.kicks = 0
        self.filter = DeliveryFilter()
        # sid -> the rooms it entered here (besides its own): python-socketio's ``get_rooms``
        # scans every room of the replica, and membership is asked on every send (issue 8).
        self._rooms_of: dict[str, set[str]] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self._register(on_connect, on_disconnect)

    @property
    def host_id(self) -> str:
        return str(self._manager.host_id)

    def asgi_app(self, other: Any) -> Any:
        return socketio.ASGIApp(self._sio, other_asgi_app=other, socketio_path="socket.io")

    def on(self, event: str, handler: EventHandler) -> None:
        self._handlers[event] = handler

    def _route(
        self, sid: str, eio_sid: str, data: list[Any], ack_id: Any
    ) -> Awaitable[None] | None:
        event = data[0] if isinstance(data, list) and data else None
        handler = self._handlers.get(event) if isinstance(event, str) else None
        if handler is None:
            return None
        return self.dispatch(handler, sid, eio_sid, data, ack_id)

    async def dispatch(
        self, handler: EventHandler, sid: str, eio_sid: str, data: list[Any], ack_id: Any
    ) -> None:
        sent = False

        def ack(payload: Payload) -> None:
            nonlocal sent
            if sent or not isinstance(ack_id, int):
                return
            sent = True
            self.push(eio_sid, encode_ack(ack_id, payload))

        try:
            await handler(sid, data[1] if len(data) > 1 else None, ack)
        except Exception:
            log.exception("handler_failed", event=data[0])
            ack({"ok": False, "code": "INTERNAL", "message": "internal error"})

    # ---- sending --------------------------------------------------------------------------

    def push(self, eio_sid: str, pkt: Any) -> bool:
        """Queue one packet for a socket, unless its output bound is exceeded (then kick it)."""
        sock = compat.eio_socket(self._sio, eio_sid)
        if sock is None or eio_sid in self._kicked:
            return False
        queue = compat.output_queue(sock)
        size = queue.qsize()
        if size >= self._max_queue:
            if size >= self._hard_max_queue:
                self._kick(eio_sid, queue)
                return False
            if eio_sid not in self._over:
                self._over.add(eio_sid)
                self.spawn(self._check_drained(eio_sid))
        queue.put_nowait(pkt)
        return True

    async def _check_drained(self, eio_sid: str) -> None:
        try:
            await asyncio.sleep(self._drain_grace_s)
        finally:
            self._over.discard(eio_sid)
        sock = compat.eio_socket(self._sio, eio_sid)
        if sock is not None and compat.output_queue(sock).qsize() >= self._max_queue:
            self._kick(eio_sid, compat.output_queue(sock))

    def emit_to(self, sid: str, event: str, payload: Payload, *, follower: bool = False) -> bool:
        """An event for one local socket (through the delivery filter); whether it was queued
        on an open socket."""
        eio_sid = self._manager.eio_sid_from_sid(sid, NAMESPACE)
        if eio_sid is not None and self.filter.admit(sid, event, payload, follower=follower):
            return self.push(eio_sid, encode(event, payload))
        return False

    def emit_local(self, room: str, event: str, payload: Payload) -> None:
        """An event for every socket of ``room`` on this replica; encoded once."""
        pkt = None
        for sid, eio_sid in self._participants(room):
            if self.filter.admit(sid, event, payload):
                if pkt is None:
                    pkt = encode(event, payload)
                self.push(eio_sid, pkt)

    def emit_local_except(self, room: str, event: str, payload: Payload, skip_sid: str) -> None:
        """``emit_local`` to every socket of ``room`` here but ``skip_sid``."""
        pkt = encode(event, payload)
        for sid, eio_sid in self._participants(room):
            if sid != skip_sid:
                self.push(eio_sid, pkt)

    # ---- control messages between replicas ------------------------------------------------

    def on_control(self, name: str, handler: Callable[[str, Payload], None]) -> None:
        """``handler(room, payload)`` runs on every replica for ``control(room, name, ...)``.
        Control names start with ``bridge:``: never a contract event, never sent to a client."""
        assert name.startswith(CONTROL_PREFIX)
        self._controls[name] = handler

    async def control(self, room: str, name: str, payload: Payload) -> None:
        """Run a control handler here, then on the other replicas (through the Redis queue)."""
        self._controls[name](room, payload)
        await self.publish(room, name, payload)

    def _remote_emit(self, room: str, event: str, payload: Payload) -> None:
        if event.startswith(CONTROL_PREFIX):
            handler = self._controls.get(event)
            if handler is not None:
                try:
                    handler(room, payload)
                except Exception:
                    log.exception("control_failed", control=event)
            return
        self.emit_local(room, event, payload)

    async def publish(self, room: str, event: str, payload: Payload) -> None:
        """Hand an event to the other replicas (python-socketio's Redis queue format)."""
        await self._manager.publish_emit(room, event, payload)

    # ---- rooms and sockets ----------------------------------------------------------------

    async def enter_room(self, sid: str, room: str) -> None:
        await self._sio.enter_room(sid, room)
        self._rooms_of.setdefault(sid, set()).add(room)

    async def leave_room(self, sid: str, room: str) -> None:
        rooms = self._rooms_of.get(sid)
        if rooms is not None:
            rooms.discard(room)
        await self._sio.leave_room(sid, room)

    def leave_room_now(self, sid: str, room: str) -> None:
        """Take a local socket out of ``room`` before anything else is emitted to it."""
        rooms = self._rooms_of.get(sid)
        if rooms is not None:
            rooms.discard(room)
        self._manager.basic_leave_room(sid, NAMESPACE, room)

    def local_sids(self, room: str) -> list[str]:
        return [sid for sid, _ in self._participants(room)]

    def in_room(self, sid: str, room: str) -> bool:
        rooms = self._rooms_of.get(sid)
        return rooms is not None and room in rooms

    def rooms_of(self, sid: str) -> list[str]:
        return list(self._rooms_of.get(sid, ()))

    def local_members(self, room: str) -> int:
        return sum(1 for _ in self._participants(room))

    def local_rooms(self) -> list[str]:
        return self._manager.local_rooms()

    def connected(self) -> int:
        return self._manager.connected_sockets()

    async def disconnect(self, sid: str) -> None:
        await self._sio.disconnect(sid)

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        """A background task kept referenced until it ends (python-socketio's pattern)."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def subscribed(self) -> bool:
        """Whether events of the other replicas reach this one: the Redis subscription is held,
        or not needed yet (python-socketio starts its listener with the first connection)."""
        return self._manager.listener() is None or self._manager.subscribed

    async def shutdown(self) -> None:
        await cancel_and_wait(list(self.tasks), 5.0)
        await self._sio.shutdown()
        listener = self._manager.listener()
        if listener is not None:
            await cancel_and_wait([listener], 2.0)
        redis = self._manager.redis_client()
        if redis is not None:
            await redis.aclose()

    def _participants(self, room: str) -> Iterator[tuple[str, str]]:
        members = self._manager.members(room)
        return iter(list(members.items())) if members else iter(())

    def _kick(self, eio_sid: str, queue: asyncio.Queue[Any]) -> None:
        if eio_sid in self._kicked:
            return
        self._kicked.add(eio_sid)
        self.kicks += 1
        while not queue.empty():  # drop what it never read: that is the memory being bounded
            queue.get_nowait()
            queue.task_done()
        sid = self._manager.sid_from_eio_sid(eio_sid, NAMESPACE)
        log.warning("slow_consumer_disconnected", sid=sid, bound=self._max_queue)
        self.spawn(self._close_kicked(eio_sid, sid))

    async def _close_kicked(self, eio_sid: str, sid: str | None) -> None:
        try:
            async with asyncio.timeout(KICK_CLOSE_TIMEOUT_S):
                if sid is not None:
                    await self._sio.disconnect(sid)
                await compat.abort(self._sio, eio_sid)
        except Exception:
            log.exception("kick_close_failed", sid=sid)
        finally:
            self._kicked.discard(eio_sid)

    def _register(self, on_connect: ConnectHandler, on_disconnect: DisconnectHandler) -> None:
        async def connect(sid: str, environ: dict[str, Any], auth: object = None) -> None:
            try:
                await on_connect(sid, environ, auth)
            except Refused as exc:
                raise socketio.exceptions.ConnectionRefusedError(
                    exc.message, {"code": exc.code, "message": exc.message}
                ) from None
            except Exception:
                log.exception("connect_failed")
                raise socketio.exceptions.ConnectionRefusedError(
                    "internal error", {"code": "INTERNAL", "message": "internal error"}
                ) from None

        async def disconnect(sid: str, reason: object = None) -> None:
            self.filter.forget(sid)
            try:
                await on_disconnect(sid)  # still in its rooms here
            finally:
                self._rooms_of.pop(sid, None)

        self._sio.on("connect", connect)
        self._sio.on("disconnect", disconnect)
