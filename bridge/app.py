"""Composition of one bridge process: Redis, upstream pool, flags, rooms, Socket.IO, probes.

``Bridge.serve`` runs the ASGI app under uvicorn (uvloop, httptools, websockets) with
``/socket.io`` for clients, the try-it page at ``/`` (bridge/page.py) and ``/healthz``,
``/readyz``, ``/metrics`` for probes and scrapers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import uvicorn
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from bridge.admin import AdminApi
from bridge.auth import Authenticator
from bridge.breaker import Breaker, remove_breaker, write_breaker
from bridge.errors import StoreError
from bridge.flags import FlagStore
from bridge.gates import Prometheus
from bridge.handlers import ChatHandlers
from bridge.metrics import Metrics
from bridge.page import PageApp
from bridge.rest import ClientApi
from bridge.rollout import Controller, RolloutStore
from bridge.rooms import RoomRegistry
from bridge.settings import Settings
from bridge.sio import SocketServer
from bridge.tasks import BatchTasks
from bridge.tracing import Tracing
from bridge.upstream import HttpUpstream
from contracts.aio import cancel_and_wait

log = structlog.get_logger("bridge.app")

HEARTBEAT_INTERVAL_S = 5.0
HEARTBEAT_RETRY_S = 0.5
BREAKER_PUBLISH_S = 2.0  # the breaker's snapshot in Redis is at most this old (plus a change)
REDIS_MAX_CONNECTIONS = 64
REDIS_WARM_CONNECTIONS = 16
REDIS_TIMEOUT_S = 5.0
GRACEFUL_SHUTDOWN_S = 5
STOP_TASKS_TIMEOUT_S = 5.0
# A pooled connection that Redis closed (a restart, a failover) fails its next command: that
# command is retried on a new connection instead of failing a user's message (issue 7). Only
# connection errors: after a timeout the command may have run.
REDIS_RETRY = Retry(
    ExponentialWithJitterBackoff(base=0.02, cap=0.2), 2, supported_errors=(RedisConnectionError,)
)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Bridge:
    """One bridge process: build with settings and a Redis URL, then ``serve``."""

    def __init__(self, settings: Settings, *, redis_url: str) -> None:
        self.settings = settings
        self.metrics = Metrics()
        # A fixed, pre-warmed pool: under a burst of sends, waiting a few microseconds for a
        # free connection beats opening hundreds of new ones (each a multi-round-trip setup).
        pool = BlockingConnectionPool.from_url(
            redis_url,
            decode_responses=True,
            max_connections=REDIS_MAX_CONNECTIONS,
            timeout=REDIS_TIMEOUT_S,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            retry=REDIS_RETRY,
        )
        self.redis: Redis = Redis(connection_pool=pool)
        self.upstream = HttpUpstream(
            base_url=settings.backend_url,
            token=settings.backend_token,
            timeouts=settings.timeouts,
            max_connections=settings.upstream_max_connections,
        )
        self.flags = FlagStore(self.redis, settings.flags, refresh_s=settings.flags_refresh_s)
        auth = Authenticator(secret=settings.jwt_secret, insecure_dev=settings.insecure_dev_auth)
        self._handlers: ChatHandlers | None = None
        self.server = SocketServer(
            redis_url=redis_url,
            channel=settings.channel,
            socket_max_queue=settings.socket_max_queue,
            drain_grace_s=settings.socket_drain_grace_s,
            cors_origins=settings.cors_origins,
            on_connect=lambda sid, environ, a: self.handlers.connect(sid, environ, a),
            on_disconnect=lambda sid: self.handlers.disconnect(sid),
            on_resubscribed=self._redis_came_back,
        )
        self.rooms = RoomRegistry(
            self.redis,
            host_id=self.server.host_id,
            inflight_ttl_s=int(settings.timeouts.total_s) + 60,
            rate_limit=settings.rate_limit,
            rate_window_s=settings.rate_window_s,
            room_ttl_s=settings.room_ttl_s,
        )
        self.client_api = ClientApi(auth=auth, rooms=self.rooms, upstream=self.upstream)
        self.rollout = RolloutStore(self.redis, self.flags, settings.rollout)
        self.prometheus = Prometheus(settings.rollout.prometheus_url)
        self.controller = Controller(
            self.rollout, self.prometheus, replica_id=self.server.host_id, redis=self.redis
        )
        self.admin_api = AdminApi(
            auth=auth, flags=self.flags, store=self.rollout, controller=self.controller,
            redis=self.redis,
        )  # fmt: skip
        self.tracing = Tracing.create(enabled=settings.tracing, service_name=settings.service_name)
        self._breaker_changed = asyncio.Event()
        self.breaker = Breaker.from_settings(
            self.server.host_id, settings.breaker, on_change=self._breaker_changed.set
        )
        self.tasks = BatchTasks(self.redis, self.upstream, self.metrics)
        self._handlers = ChatHandlers(
            settings=settings, auth=auth, rooms=self.rooms, flags=self.flags,
            upstream=self.upstream, metrics=self.metrics, tracing=self.tracing,
            breaker=self.breaker, tasks=self.tasks,
        )  # fmt: skip
        self._handlers.bind(self.server)
        self.metrics.bind(
            sockets=self.server.connected,
            kicks=lambda: self.server.kicks,
            rollout_percent=self._rollout_percent,
            replica=self.server.host_id,
            breaker_open=self.breaker.open_value,
        )
        self._background: list[asyncio.Task[None]] = []
        self._redis_ok = False
        self._beat_now = asyncio.Event()
        self._uvicorn: uvicorn.Server | None = None

    @property
    def handlers(self) -> ChatHandlers:
        assert self._handlers is not None
        return self._handlers

    def request_exit(self) -> None:
        """Stop ``serve`` as SIGTERM would (tests and embedders)."""
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True

    def ready(self) -> bool:
        """Flags loaded, the last heartbeat written (presence re-asserted: after a Redis restart
        the rooms' host sets are back) and the subscription to the other replicas held."""
        return self.flags.loaded and self._redis_ok and self.server.subscribed()

    async def start(self) -> None:
        try:
            await asyncio.gather(*(self.redis.ping() for _ in range(REDIS_WARM_CONNECTIONS)))
            await self.flags.load()
            await self.rooms.heartbeat()
            self._redis_ok = True
        except (StoreError, RedisError, OSError) as exc:
            log.warning("redis_unavailable_at_start", error=type(exc).__name__)
        self._background = [
            asyncio.create_task(self.flags.poll_forever()),
            asyncio.create_task(self._heartbeat_forever()),
            asyncio.create_task(self._publish_breaker_forever()),
            asyncio.create_task(self.controller.run_forever()),
            asyncio.create_task(self.tasks.listen_forever()),  # batch outcomes (bridge/tasks.py)
        ]
        if self.settings.insecure_dev_auth:
            log.warning("insecure_dev_auth_enabled", detail="auth.userId is trusted without token")

    async def stop(self) -> None:
        left = await cancel_and_wait(self._background, STOP_TASKS_TIMEOUT_S)
        if left:
            log.warning("background_tasks_left_running", count=len(left))
        await self.controller.release()
        await self.prometheus.aclose()
        local_rooms = self.server.local_rooms()
        await self.server.shutdown()
        try:
            await self.rooms.retire(local_rooms)
        except StoreError:
            pass
        await remove_breaker(self.redis, self.breaker.replica_id)
        await self.upstream.aclose()
        await self.redis.aclose()
        await asyncio.to_thread(self.tracing.shutdown)

    def _rollout_percent(self) -> float:
        flags = self.flags.current
        return flags.percent if flags.enabled else 0.0

    def _redis_came_back(self) -> None:
        # The subscription was lost and is back: Redis may be a new, empty server (a restart
        # without persistence, a failover), without this replica's heartbeat and room presence.
        # Not ready, and a heartbeat now; until it lands the other replicas would take this
        # one for dead and stop sending it their rooms' events.
        self._redis_ok = False
        self._beat_now.set()

    async def _heartbeat_forever(self) -> None:
        while True:
            # after a failure, soon again: a Redis that came back empty gets presence back
            interval = HEARTBEAT_INTERVAL_S if self._redis_ok else HEARTBEAT_RETRY_S
            try:
                await asyncio.wait_for(self._beat_now.wait(), interval)
            except TimeoutError:
                pass
            self._beat_now.clear()
            try:
                await self.rooms.heartbeat()
                self._redis_ok = True
            except StoreError:
                self._redis_ok = False
                log.warning("heartbeat_failed")

    async def _publish_breaker_forever(self) -> None:
        """The breaker's snapshot to ``bridge:breakers`` at once on a change, else every
        ``BREAKER_PUBLISH_S`` (read by the operators' API: bridge.breaker.read_breakers)."""
        while True:
            self._breaker_changed.clear()  # a change while writing sets it again: written next
            await write_breaker(self.redis, self.breaker)  # never raises on a Redis failure
            try:
                await asyncio.wait_for(self._breaker_changed.wait(), BREAKER_PUBLISH_S)
            except TimeoutError:
                pass

    def asgi(self) -> Any:
        return self.server.asgi_app(PageApp(self._probe_app))

    async def _probe_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":
            return
        path = scope.get("path", "")
        if path == "/healthz":
            await _reply(send, 200, b'{"status":"ok"}')
        elif path == "/readyz":
            ok = self.ready()
            body = json.dumps(
                {"ready": ok, "redis": self._redis_ok, "subscribed": self.server.subscribed()}
            ).encode()
            await _reply(send, 200 if ok else 503, body)
        elif path == "/metrics":
            await _reply(send, 200, self.metrics.render(), "text/plain; version=0.0.4")
        elif await self.client_api.handle(scope, send):
            pass
        elif await self.admin_api.handle(scope, receive, send):
            pass
        else:
            await _reply(send, 404, b'{"error":"not found"}')

    async def serve(
        self, host: str, port: int, *, on_ready: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Run until SIGINT/SIGTERM; ``on_ready`` runs once the port accepts connections."""
        config = uvicorn.Config(
            self.asgi(),
            host=host,
            port=port,
            lifespan="off",
            interface="asgi3",
            log_config=None,  # its records go through the root's JSON handler (contracts/logs.py)
            access_log=False,
            log_level="warning",
            http="httptools",
            ws="websockets-sansio",
            # Chunks are small: deflating each one costs more CPU than the bytes it saves.
            ws_per_message_deflate=False,
            # No WebSocket-level keepalive: Engine.IO pings every socket itself (pingInterval /
            # pingTimeout drop a dead peer), so uvicorn's own ping per connection every 20 s was
            # a second timer, frame and pong per idle socket (1.4 % of the CPU at 5,000 idle
            # sockets by py-spy, issue 8).
            ws_ping_interval=None,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            backlog=4096,
        )
        server = self._uvicorn = uvicorn.Server(config)
        await self.start()
        watcher = asyncio.create_task(_when_started(server, on_ready))
        try:
            await server.serve()
        finally:
            await cancel_and_wait([watcher], STOP_TASKS_TIMEOUT_S)
            await self.stop()


async def _when_started(
    server: uvicorn.Server, on_ready: Callable[[], Awaitable[None]] | None
) -> None:
    while not server.started:  # noqa: ASYNC110 - uvicorn exposes no "started" event
        await asyncio.sleep(0.02)
    log.info("bridge_listening")
    if on_ready is not None:
        await on_ready()


async def _reply(
    send: Send, status: int, body: bytes, content_type: str = "application/json"
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type.encode()), (b"cache-control", b"no-store")],
        }
    )
    await send({"type": "http.response.body", "body": body})
