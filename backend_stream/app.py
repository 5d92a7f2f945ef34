"""The FastAPI application: services wired in the lifespan, errors answered as ``ErrorBody``."""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.utils import HIREDIS_AVAILABLE
from starlette.exceptions import HTTPException as StarletteHTTPException

from backend_stream.chunk_writer import ChunkWriter
from backend_stream.errors import RequestRejected
from backend_stream.listeners import EventFeed
from backend_stream.metrics import Metrics
from backend_stream.providers import Provider, make_provider
from backend_stream.registry import GenerationRegistry
from backend_stream.runner import GenerationRunner
from backend_stream.settings import Settings
from backend_stream.store import GenerationStore
from backend_stream.tracing import TraceMiddleware, Tracing
from backend_stream.turns import RoomTurns
from backend_stream.usage import UsageLedger
from contracts import HTTP_STATUS, RETRYABLE, ContractError, ErrorBody, ErrorCode

log = structlog.get_logger("backend_stream.app")

STATUS_CODES = {401: ErrorCode.UNAUTHORIZED, 403: ErrorCode.FORBIDDEN, 404: ErrorCode.NOT_FOUND}


@dataclass(frozen=True, slots=True)
class Services:
    """What the handlers use; built once per process in the lifespan."""

    settings: Settings
    redis: Redis
    store: GenerationStore
    registry: GenerationRegistry
    feed: EventFeed
    metrics: Metrics
    provider: Provider
    writer: ChunkWriter
    runner: GenerationRunner
    tracing: Tracing
    ledger: UsageLedger | None = None  # usage per user and day, budgets (backend_stream/usage.py)


def error_response(
    code: ErrorCode,
    message: str,
    status: int | None = None,
    retry_after_s: float | None = None,
    retryable: bool | None = None,
) -> JSONResponse:
    """An ``ErrorBody``; ``retryable`` always says whether the same request may succeed later."""
    headers = {}
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    word = retryable if retryable is not None else code in RETRYABLE
    body = ErrorBody(code=code, message=message, retryable=word).wire()
    return JSONResponse(body, status_code=status or HTTP_STATUS[code], headers=headers)


# A pooled connection that Redis closed (a restart, a failover) fails its next command: that
# command is retried on a new connection instead of failing a generation (issue 7). Only
# connection errors: after a timeout the command may have run.
REDIS_RETRY = Retry(
    ExponentialWithJitterBackoff(base=0.02, cap=0.2), 2, supported_errors=(RedisConnectionError,)
)


def build_services(settings: Settings, metrics: Metrics, tracing: Tracing) -> Services:
    if settings.redis_url is None:
        raise ValueError("Settings.redis_url must be set (the launcher starts an embedded Redis)")
    # A plain pool: BlockingConnectionPool costs ~0.2 ms per command in Python; an exhausted
    # pool raises (503 BACKEND_UNAVAILABLE) instead of queueing.
    pool = ConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        decode_responses=True,
        retry=REDIS_RETRY,
    )
    redis = Redis(connection_pool=pool)
    store = GenerationStore(
        redis,
        buffer_ttl_s=settings.buffer_ttl_s,
        idempotency_ttl_s=settings.idempotency_ttl_s,
        history_cap=settings.history_cap,
        history_ttl_s=settings.history_ttl_s,
        lease_ms=int(settings.lease_s * 1000),
        room_queue_max=settings.room_queue_max,
        room_lock_ms=int(settings.room_lock_ttl_s * 1000),
    )
    provider = make_provider(settings)
    writer = ChunkWriter(redis, on_batch=metrics.chunk_batches.inc)
    turns = RoomTurns()
    # a reservation outlives anything that may still settle it: a generation (room wait plus its
    # total timeout) or a queued task (its whole timeout)
    longest_s = max(settings.room_queue_wait_s + settings.total_timeout_s, settings.tasks.timeout_s)
    ledger = UsageLedger(
        redis, settings.budget, metrics, reservation_ttl_s=max(600, math.ceil(2 * longest_s))
    )
    runner = GenerationRunner(
        store=store, writer=writer, provider=provider, settings=settings, metrics=metrics,
        tracing=tracing, turns=turns, ledger=ledger,
    )  # fmt: skip
    registry = GenerationRegistry(
        store=store, runner=runner, metrics=metrics, history_messages=settings.history_messages,
        turns=turns, room_busy_retry_s=settings.room_busy_retry_s, ledger=ledger,
        max_output_tokens=settings.max_output_tokens,
    )  # fmt: skip
    feed = EventFeed(store, settings)
    return Services(
        settings, redis, store, registry, feed, metrics, provider, writer, runner, tracing,
        ledger=ledger,
    )  # fmt: skip


def create_app(settings: Settings) -> FastAPI:
    """The ASGI app; Redis and the provider are opened in its lifespan, closed at shutdown."""
    from backend_stream.routes import router  # routes import Services from here
    from backend_stream.task_routes import router as task_router
    from backend_stream.tasks import TaskQueue

    metrics = Metrics()
    tracing = Tracing.create(enabled=settings.tracing, service_name=settings.service_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = build_services(settings, metrics, tracing)
        app.state.services = services
        services.writer.start()
        services.runner.start()
        services.registry.start()
        # batch tasks: this replica's workers and webhook deliverer (backend_stream/tasks.py)
        tasks = TaskQueue(
            redis=services.redis, store=services.store, registry=services.registry,
            feed=services.feed, settings=settings, metrics=metrics, ledger=services.ledger,
        )  # fmt: skip
        app.state.tasks = tasks
        tasks.start()
        if settings.token_is_default:
            log.warning("backend_token_default", hint="set BACKEND_TOKEN outside development")
        log.info(
            "backend_started",
            provider=services.provider.name,
            pid=os.getpid(),
            # True when the hiredis wheel parses Redis replies in C: ~30 % less backend CPU
            # (README "Benchmark").
            redis_c_parser=HIREDIS_AVAILABLE,
        )
        try:
            yield
        finally:
            await tasks.aclose()  # first: a job in progress is handed to the other replicas
            await services.registry.aclose()
            await services.runner.aclose()
            await services.writer.aclose()
            await services.provider.aclose()
            await services.redis.aclose()
            await asyncio.to_thread(tracing.shutdown)

    app = FastAPI(title="backend_stream", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.include_router(router)
    app.include_router(task_router)
    _install_error_handlers(app)
    if tracing.tracer is not None:
        app.add_middleware(TraceMiddleware, tracer=tracing.tracer)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    async def on_contract_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ContractError)
        status = getattr(exc, "status", None)
        retry_after = getattr(exc, "retry_after_s", None)
        retryable = getattr(exc, "retryable_word", None)
        _count(request, exc.code)
        return error_response(exc.code, exc.message, status, retry_after, retryable)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        parts = [
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}"
            for err in exc.errors()[:5]
        ]
        _count(request, ErrorCode.INVALID_PAYLOAD)
        return error_response(ErrorCode.INVALID_PAYLOAD, "; ".join(parts) or "invalid request")

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = STATUS_CODES.get(exc.status_code, ErrorCode.INVALID_PAYLOAD)
        if exc.status_code >= 500:
            code = ErrorCode.INTERNAL
        return error_response(code, str(exc.detail), exc.status_code)

    async def on_redis_error(request: Request, exc: Exception) -> Response:
        log.warning("redis_unavailable", error=type(exc).__name__)
        _count(request, ErrorCode.BACKEND_UNAVAILABLE)
        return error_response(ErrorCode.BACKEND_UNAVAILABLE, "storage unavailable")

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.error("unhandled_error", error=type(exc).__name__, exc_info=exc)
        _count(request, ErrorCode.INTERNAL)
        return error_response(ErrorCode.INTERNAL, "internal error")

    app.add_exception_handler(ContractError, on_contract_error)
    app.add_exception_handler(RequestRejected, on_contract_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RedisError, on_redis_error)
    app.add_exception_handler(Exception, on_unexpected)


def _count(request: Request, code: ErrorCode) -> None:
    services = getattr(request.app.state, "services", None)
    if isinstance(services, Services):
        services.metrics.errors.labels(code.value).inc()
