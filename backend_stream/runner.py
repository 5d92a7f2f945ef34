"""Runs one generation from the user message to its terminal event, whoever is listening.

Shape: a producer task opens the model stream and pushes deltas into ``Generation.wake``; this
runner is the only consumer, so cancel requests, timeouts and flush deadlines are all decided in
one loop without cancelling the provider's iterator mid-``__anext__``. The first token is flushed
at once, later ones coalesced per flush window (issue 2, "The backend owns chunking and seq").
The local fan-out is published before the Redis XADD, so listeners here never wait on Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import structlog
from redis.exceptions import RedisError

from backend_stream.errors import (
    BackendStreamError,
    GenerationTimeout,
    ModelFailed,
    ModelRateLimited,
    ModelTimeout,
    ProviderError,
)
from backend_stream.generation import Generation, payload_event
from backend_stream.metrics import Metrics
from backend_stream.prompt import build_prompt
from backend_stream.providers import Delta, ModelRequest, Provider
from backend_stream.settings import Settings
from backend_stream.store import GenerationStore, dumps
from contracts import (
    RETRYABLE,
    BackendLatency,
    ChatMessage,
    ErrorCode,
    FinishReason,
    Role,
    SseEvent,
    StreamEnd,
    StreamError,
    Usage,
    utc_now_iso,
)

log = structlog.get_logger("backend_stream.runner")

OPENED = object()
DONE = object()
CANCEL = object()
SHUTDOWN_WRITE_TIMEOUT_S = 1.0


@dataclass
class _Stamps:
    """Stage times (time.monotonic) and what the model reported."""

    settings_loaded: float | None = None
    prompt_built: float | None = None
    first_token: float | None = None
    first_chunk: float | None = None
    model_done: float | None = None
    usage: Usage | None = None
    finish: FinishReason = FinishReason.STOP

    def latency(self, received_at: float, now: float) -> BackendLatency:
        def ms(t: float | None) -> float | None:
            return None if t is None else round((t - received_at) * 1000, 3)

        return BackendLatency(
            settings_loaded_ms=ms(self.settings_loaded),
            prompt_built_ms=ms(self.prompt_built),
            model_first_token_ms=ms(self.first_token),
            first_chunk_ms=ms(self.first_chunk),
            model_done_ms=ms(self.model_done),
            total_ms=ms(now),
        )


class GenerationRunner:
    """Drives ``Generation`` objects; one ``run`` call per generation, in its own task."""

    def __init__(
        self, *, store: GenerationStore, provider: Provider, settings: Settings, metrics: Metrics
    ) -> None:
        self._store = store
        self._provider = provider
        self._settings = settings
        self._metrics = metrics

    async def run(
        self, gen: Generation, user_content: str, user_message: ChatMessage | None
    ) -> None:
        """Run to the end; always leaves ``gen.terminal`` set, never raises but CancelledError."""
        stamps = _Stamps()
        try:
            await self._execute(gen, user_content, user_message, stamps)
            await self._finish(gen, stamps)
        except BackendStreamError as exc:
            retry_after = exc.retry_after_s if isinstance(exc, ModelRateLimited) else None
            await self._fail(gen, exc.code, exc.message, retry_after)
        except RedisError:
            await self._fail(gen, ErrorCode.BACKEND_UNAVAILABLE, "storage unavailable", None)
        except asyncio.CancelledError:
            # Shutdown: say so to every listener, and let another replica retry the request.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(SHUTDOWN_WRITE_TIMEOUT_S):
                    await self._fail(gen, ErrorCode.BACKEND_UNAVAILABLE, "backend shutting down")
            raise
        except Exception:
            log.exception("generation_crashed")
            await self._fail(gen, ErrorCode.INTERNAL, "internal error", None)
        finally:
            if gen.terminal is None:  # storage failed while failing: listeners must still end
                err = StreamError(code=ErrorCode.INTERNAL, message="internal error", retryable=True)
                gen.publish_terminal(payload_event(SseEvent.ERROR, err.wire()))

    async def _execute(
        self,
        gen: Generation,
        user_content: str,
        user_message: ChatMessage | None,
        stamps: _Stamps,
    ) -> None:
        s = self._settings
        prepared = await self._store.prepare(
            gen.key,
            room_id=gen.start.room_id,
            character_id=gen.character_id,
            history_messages=s.history_messages,
            user_message=user_message,
        )
        stamps.settings_loaded = time.monotonic()
        if prepared.cancel_requested:
            gen.request_cancel(CANCEL)
        request = build_prompt(
            system_prompt=prepared.system_prompt or s.system_prompt,
            history=prepared.history,
            user_content=user_content,
            request_id=gen.key.request_id,
            max_output_tokens=s.max_output_tokens,
        )
        stamps.prompt_built = time.monotonic()
        self._metrics.model_calls.labels(self._provider.name).inc()
        producer = asyncio.create_task(self._produce(request, gen.wake))
        try:
            await self._consume(gen, stamps)
        finally:
            if not producer.done():
                producer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await producer

    async def _produce(self, request: ModelRequest, wake: asyncio.Queue[object]) -> None:
        try:
            tokens = await self._provider.open_stream(request)
            wake.put_nowait(OPENED)
            try:
                async for delta in tokens:
                    wake.put_nowait(delta)
            finally:
                await tokens.aclose()
            wake.put_nowait(DONE)
        except ProviderError as exc:
            wake.put_nowait(exc)
        except Exception:  # a provider bug ends the generation instead of hanging it
            log.exception("provider_crashed")
            wake.put_nowait(ModelFailed("model provider failed"))

    async def _consume(self, gen: Generation, stamps: _Stamps) -> None:
        s = self._settings
        window_s = s.flush_window_ms / 1000
        pending: list[str] = []
        next_flush = 0.0
        total_deadline = gen.received_at + s.total_timeout_s
        token_deadline = time.monotonic() + s.first_token_timeout_s
        while True:
            wait_until = min(token_deadline, total_deadline)
            # Decided before waiting: timer wheels (uvloop) may fire a hair early.
            flush_due = bool(pending) and next_flush < wait_until
            if flush_due:
                wait_until = next_flush
            try:
                async with asyncio.timeout(max(0.0, wait_until - time.monotonic())):
                    items = [await gen.wake.get()]
            except TimeoutError:
                if not flush_due:
                    raise self._timeout(stamps, time.monotonic(), total_deadline) from None
                await self._flush(gen, pending, stamps)
                next_flush = time.monotonic() + window_s
                continue
            while not gen.wake.empty():
                items.append(gen.wake.get_nowait())
            now = time.monotonic()
            finished = False
            for item in items:
                if isinstance(item, Delta):
                    if item.text:
                        stamps.first_token = stamps.first_token or now
                        pending.append(item.text)
                        token_deadline = now + s.idle_timeout_s
                    stamps.usage = item.usage or stamps.usage
                    stamps.finish = item.finish_reason or stamps.finish
                elif item is OPENED:
                    gen.mark_opened()
                elif item is DONE or item is CANCEL:
                    finished = True
                    if item is CANCEL:
                        stamps.finish = FinishReason.CANCELLED
                    stamps.model_done = stamps.model_done or now
                    break
                elif isinstance(item, BaseException):
                    if pending:  # what the model did say goes out before its error
                        await self._flush(gen, pending, stamps)
                    raise item
            if finished:
                if pending:
                    await self._flush(gen, pending, stamps)
                return
            if pending and (not gen.chunks or now >= next_flush):
                await self._flush(gen, pending, stamps)
                next_flush = time.monotonic() + window_s

    def _timeout(self, stamps: _Stamps, now: float, total_deadline: float) -> BackendStreamError:
        s = self._settings
        if now >= total_deadline:
            return GenerationTimeout(f"generation exceeded {s.total_timeout_s:g}s")
        if stamps.first_token is None:
            return ModelTimeout(
                f"no first token from the model within {s.first_token_timeout_s:g}s"
            )
        return GenerationTimeout(f"model sent nothing for {s.idle_timeout_s:g}s")

    async def _flush(self, gen: Generation, pending: list[str], stamps: _Stamps) -> None:
        text = "".join(pending)
        pending.clear()
        seq = gen.publish_chunk(text)
        if seq == 0:
            stamps.first_chunk = time.monotonic()
            self._metrics.first_chunk.observe(stamps.first_chunk - gen.received_at)
            if stamps.first_token is not None:
                self._metrics.first_token.observe(stamps.first_token - gen.received_at)
        self._metrics.chunks.inc()
        await self._store.append_chunk(gen.key, gen.attempt, seq, text)

    async def _finish(self, gen: Generation, stamps: _Stamps) -> None:
        content = gen.content
        latency = stamps.latency(gen.received_at, time.monotonic())
        end = StreamEnd(
            message_id=gen.start.message_id,
            content=content,
            finish_reason=stamps.finish,
            usage=stamps.usage or Usage(),
            latency=latency,
        )
        payload = end.wire()
        assistant = ChatMessage(
            id=gen.start.message_id,
            request_id=gen.key.request_id,
            role=Role.ASSISTANT,
            content=content,
            character_id=gen.character_id,
            created_at=utc_now_iso(),
        )
        await self._store.finish(
            gen.key,
            gen.attempt,
            chunks=len(gen.chunks),
            end_json=dumps(payload),
            room_id=gen.start.room_id,
            assistant=assistant,
        )
        gen.publish_terminal(payload_event(SseEvent.END, payload))
        # Post-processing: after `end` is out, never on the path to the first chunk.
        self._metrics.generations.labels(stamps.finish.value).inc()
        log.info(
            "generation_end",
            finishReason=stamps.finish.value,
            chunks=len(gen.chunks),
            attempt=gen.attempt,
            **latency.model_dump(),
        )

    async def _fail(
        self, gen: Generation, code: ErrorCode, message: str, retry_after_s: float | None = None
    ) -> None:
        err = StreamError(code=code, message=message, retryable=code in RETRYABLE)
        payload = err.wire()
        try:
            await self._store.fail(
                gen.key,
                gen.attempt,
                chunks=len(gen.chunks),
                error_json=dumps(payload),
                retryable=err.retryable,
                retry_after_s=retry_after_s,
            )
        except RedisError:
            log.warning("generation_fail_not_stored", code=code.value)
        gen.publish_terminal(payload_event(SseEvent.ERROR, payload, retry_after_s))
        self._metrics.generations.labels(FinishReason.ERROR.value).inc()
        self._metrics.errors.labels(code.value).inc()
        log.warning("generation_failed", code=code.value, chunks=len(gen.chunks), reason=message)
