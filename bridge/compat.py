"""Every python-socketio / python-engineio internal the bridge uses, and nothing else.

The bridge overrides three private methods of ``socketio.AsyncServer`` and three of
``socketio.AsyncRedisManager``, and reads a few private attributes (why each is needed is said
where it is used, bridge/sio.py). They are not API: pyproject.toml bounds both libraries from
above, and tests/bridge/test_compat.py checks every name and signature listed in ``OVERRIDDEN``
and every attribute this module reads against the installed versions, so an upgrade that
renames or reshapes one fails that test instead of breaking delivery at run time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import socketio
from engineio import packet as eio_packet

NAMESPACE = "/"

Payload = dict[str, Any]
RemoteEmit = Callable[[str, str, Payload], None]
EventRoute = Callable[[str, str, list[Any], Any], Any]  # -> awaitable, or None: library default
SendPacket = Callable[[str, Any], bool]

# (class, private method, its parameter names): what the overrides below rely on.
OVERRIDDEN: tuple[tuple[type, str, tuple[str, ...]], ...] = (
    (
        socketio.AsyncServer,
        "_handle_event_internal",
        ("self", "server", "sid", "eio_sid", "data", "namespace", "id"),
    ),
    (socketio.AsyncServer, "_send_packet", ("self", "eio_sid", "pkt")),
    (socketio.AsyncServer, "_send_eio_packet", ("self", "eio_sid", "eio_pkt")),
    (socketio.AsyncRedisManager, "_handle_emit", ("self", "message")),
    (socketio.AsyncRedisManager, "_publish", ("self", "data")),
    (socketio.AsyncRedisManager, "_redis_listen_with_retries", ("self",)),
)
# The manager's pub/sub listener retries at once, then backs off to this (python-socketio's
# own doubles to 60 s: after a Redis restart, events between replicas stayed lost that long).
LISTEN_RETRY_FIRST_S = 0.1
LISTEN_RETRY_MAX_S = 2.0


class Manager(socketio.AsyncRedisManager):  # type: ignore[misc]
    """The Redis queue between replicas; plain room emits from other replicas go to
    ``on_remote_emit`` (the bridge's own local fan-out) instead of one task per recipient."""

    on_remote_emit: RemoteEmit
    subscribed = False  # whether the pub/sub listener holds its subscription (readiness)
    # called when the listener subscribed again after losing Redis (which may be a new, empty
    # server: the bridge re-asserts its presence before it calls itself ready again)
    on_resubscribed: Callable[[], None] | None = None

    async def _handle_emit(self, message: dict[str, Any]) -> None:
        data, room, event = message.get("data"), message.get("room"), message.get("event")
        if (
            message.get("callback") is None
            and not message.get("binary")
            and message.get("namespace", NAMESPACE) == NAMESPACE
            and isinstance(room, str)
            and isinstance(event, str)
            and isinstance(data, list)
            and len(data) == 1
            and isinstance(data[0], dict)
        ):
            self.on_remote_emit(room, event, data[0])
            return
        await super()._handle_emit(message)

    async def _redis_listen_with_retries(self) -> AsyncIterator[Any]:
        # python-socketio's loop, with a short capped back-off (and its ``_redis_connect``,
        # ``pubsub`` and ``channel``). The first failure's log is python-socketio's; the
        # bridge's logging throttles repeats (bridge/logs.py).
        sleep_s = LISTEN_RETRY_FIRST_S
        subscribed = lost = False
        while True:
            try:
                if not subscribed:
                    self._redis_connect()
                    await self.pubsub.subscribe(self.channel)
                    subscribed = self.subscribed = True
                    if lost and self.on_resubscribed is not None:
                        self.on_resubscribed()
                    sleep_s = LISTEN_RETRY_FIRST_S
                    lost = False
                async for message in self.pubsub.listen():
                    yield message
            except Exception as exc:  # python-socketio's own catch: the listener never exits
                self._get_logger().error(
                    "Cannot receive from redis... retrying in %s secs",
                    sleep_s,
                    extra={"redis_exception": type(exc).__name__},
                )
                subscribed = self.subscribed = False
                lost = True
                await asyncio.sleep(sleep_s)
                sleep_s = min(sleep_s * 2, LISTEN_RETRY_MAX_S)

    async def publish_emit(self, room: str, event: str, payload: Payload) -> None:
        """An emit for ``room`` on the other replicas, in python-socketio's queue format."""
        await self._publish(
            {
                "method": "emit",
                "event": event,
                "data": [payload],
                "binary": False,
                "namespace": NAMESPACE,
                "room": room,
                "skip_sid": None,
                "callback": None,
                "host_id": self.host_id,
            }
        )

    def members(self, room: str) -> Mapping[str, str]:
        """sid -> eio_sid of the room's sockets on this replica (a live view: copy to iterate
        across an await)."""
        found: Mapping[str, str] | None = self.rooms.get(NAMESPACE, {}).get(room)
        return found if found is not None else {}

    def connected_sockets(self) -> int:
        return len(self.rooms.get(NAMESPACE, {}).get(None, {}))

    def local_rooms(self) -> list[str]:
        """Rooms with sockets on this replica (not the per-socket rooms named by sids)."""
        ns = self.rooms.get(NAMESPACE, {})
        sids = ns.get(None, {})
        return [room for room in ns if isinstance(room, str) and room not in sids]

    def listener(self) -> asyncio.Task[Any] | None:
        task = getattr(self, "thread", None)
        return task if isinstance(task, asyncio.Task) else None

    def redis_client(self) -> Any:
        return getattr(self, "redis", None)


class Server(socketio.AsyncServer):  # type: ignore[misc]
    """``AsyncServer`` whose registered events and every outgoing packet go through the bridge.

    - ``route_event(sid, eio_sid, data, ack_id)`` returns an awaitable for the events the bridge
      handles (it gets an explicit ack callable), or None to keep python-socketio's behaviour;
    - ``send_packet(eio_sid, eio_packet)`` is the one bounded output of every socket.
    """

    route_event: EventRoute
    send_packet: SendPacket

    async def _handle_event_internal(
        self, server: Any, sid: str, eio_sid: str, data: list[Any], namespace: Any, id: Any
    ) -> None:
        routed = self.route_event(sid, eio_sid, data, id) if namespace == NAMESPACE else None
        if routed is None:
            await super()._handle_event_internal(server, sid, eio_sid, data, namespace, id)
            return
        await routed

    async def _send_packet(self, eio_sid: str, pkt: Any) -> None:
        encoded = pkt.encode()
        for part in encoded if isinstance(encoded, list) else [encoded]:
            self.send_packet(eio_sid, eio_packet.Packet(eio_packet.MESSAGE, part))

    async def _send_eio_packet(self, eio_sid: str, eio_pkt: Any) -> None:
        self.send_packet(eio_sid, eio_pkt)


def message_packet(data: str) -> Any:
    """One Engine.IO MESSAGE packet (its encoding is cached by the packet and shared)."""
    return eio_packet.Packet(eio_packet.MESSAGE, data)


def eio_socket(server: Server, eio_sid: str) -> Any | None:
    """The Engine.IO socket of ``eio_sid`` while it is open, else None."""
    sock = server.eio.sockets.get(eio_sid)
    if sock is None or sock.closed or sock.closing:
        return None
    return sock


def output_queue(sock: Any) -> asyncio.Queue[Any]:
    """The socket's Engine.IO output queue (its writer task drains it)."""
    queue: asyncio.Queue[Any] = sock.queue
    return queue


async def abort(server: Server, eio_sid: str) -> None:
    """Close the Engine.IO socket at once, without flushing its queue."""
    sock = server.eio.sockets.get(eio_sid)
    if sock is not None:
        await sock.close(wait=False, abort=True)


def quiet_loggers(level: int) -> tuple[logging.Logger, logging.Logger]:
    """The loggers to hand to python-socketio and python-engineio.

    Given ``logger=False`` they each add a ``StreamHandler`` of their own to a module logger
    that also propagates to the root, which printed every line twice, once as plain text
    (issue 7). Given a logger object they use it as it is: the root's JSON handler prints it.
    """
    sio_logger = logging.getLogger("socketio.server")
    eio_logger = logging.getLogger("engineio.server")
    for logger in (sio_logger, eio_logger):
        logger.setLevel(level)
    return sio_logger, eio_logger
