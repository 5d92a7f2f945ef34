"""Runs one generation from the user message to its terminal event, whoever is listening.

The generation's task reads the model's stream itself and flushes chunks synchronously: the
first token at once, later ones coalesced per flush window (issue 2, "The backend owns chunking
and seq") with one loop timer per window, not per token. Timeouts (first token, idle, total)
are not an ``asyncio.timeout`` per token either: one sweeper task checks every running
generation every ``SWEEP_INTERVAL_S`` and stops the late ones, and pokes idle ones so their
listeners can send ``: ping``. A cancel or a timeout cancels the generation's task; ``run``
tells them from a shutdown by ``Generation.cancel_requested`` / ``stop_error``. The local
fan-out is published before the chunk is queued for Redis, so listeners here never wait on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import structlog
from opentelemetry.context import Context
from redis.exceptions import RedisError

from backend_stream.chunk_writer import ChunkWriter
from backend_stream.errors import (
    BackendStreamError,
    BudgetExceeded,
    GenerationTimeout,
    ModelFailed,
    ModelTimeout,
    ProviderError,
    RequestRejected,
    RoomWaitTimeout,
    Superseded,
)
from backend_stream.generation import Generation, payload_event
from backend_stream.metrics import Metrics
from backend_stream.prompt import build_prompt
from backend_stream.providers import Delta, ModelRequest, Provider
from backend_stream.settings import Settings
from backend_stream.store import Claim, ClaimOutcome, GenerationStore, dumps
from backend_stream.tracing import Tracing
from backend_stream.turns import RoomTurns
from backend_stream.usage import UsageLedger, estimate_tokens
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
from contracts.aio import cancel_and_wait

log = structlog.get_logger("backend_stream.runner")

SHUTDOWN_WRITE_TIMEOUT_S = 1.0
MAX_SWEEP_INTERVAL_S = 0.05


@dataclass
class _Run:
    """A generation's progress: stage times (time.monotonic), pending text, deadlines."""

    gen: Generation
    settings_loaded: float
    first_token_deadline: float
    total_deadline: float
    prompt_built: float | None = None
    first_token: float | None = None
    last_token: float = 0.0
    first_chunk: float | None = None
    model_done: float | None = None
    usage: Usage | None = None
    prompt_chars: int = 0  # the prompt's length: its tokens' estimate when the model says none
    model_called: bool = False
    finish: FinishReason = FinishReason.STOP
    pending: list[str] = field(default_factory=list)
    next_flush: float = 0.0
    flush_timer: asyncio.TimerHandle | None = None
    written: asyncio.Future[None] | None = None  # the batch holding the last chunk
    trace_parent: Context | None = None  # the request span that started it (when tracing)
    waiting: bool = False  # queued for the room's lock (its deadlines start when it runs)
    wait_deadline: float = math.inf

    def latency(self, now: float) -> BackendLatency:
        received_at = self.gen.received_at

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
        self,
        *,
        store: GenerationStore,
        writer: ChunkWriter,
        provider: Provider,
        settings: Settings,
        metrics: Metrics,
        tracing: Tracing | None = None,
        turns: RoomTurns | None = None,
        ledger: UsageLedger | None = None,
    ) -> None:
        self._ledger = ledger
        self._tracing = tracing or Tracing(None)
        self._turns = turns or RoomTurns()
        self._store = store
        self._writer = writer
        self._provider = provider
        self._settings = settings
        self._metrics = metrics
        self._window_s = settings.flush_window_ms / 1000
        self._runs: dict[Generation, _Run] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def aclose(self) -> None:
        if self._sweeper is not None:
            await cancel_and_wait([self._sweeper], SHUTDOWN_WRITE_TIMEOUT_S)

    async def run(
        self, gen: Generation, user_message: ChatMessage, claim: Claim, claimed_at: float
    ) -> None:
        """Run to the end; always leaves ``gen.terminal`` set, never raises but CancelledError.

        Must run in ``gen.task``. When the claim took the room's lock (``gen.token``) it
        carries what it loaded (history, character prompt) and the user message is already
        stored, atomically with the claim; else the generation first waits for its turn.
        """
        s = self._settings
        run = _Run(
            gen=gen,
            settings_loaded=claimed_at,
            first_token_deadline=claimed_at + s.first_token_timeout_s,
            total_deadline=gen.received_at + s.total_timeout_s,
            trace_parent=self._tracing.current(),
        )
        if gen.token is None:
            run.waiting = True
            run.first_token_deadline = run.total_deadline = math.inf
            run.wait_deadline = gen.received_at + s.room_queue_wait_s
        self._runs[gen] = run
        try:
            await self._run(run, user_message, claim)
        finally:
            self._runs.pop(gen, None)
            if run.flush_timer is not None:
                run.flush_timer.cancel()
            if gen.terminal is None:  # storage failed while failing: listeners must still end
                err = StreamError(code=ErrorCode.INTERNAL, message="internal error", retryable=True)
                gen.publish_terminal(payload_event(SseEvent.ERROR, err.wire()))

    async def _run(self, run: _Run, user_message: ChatMessage, claim: Claim) -> None:
        gen = run.gen
        try:
            if gen.cancel_requested:  # before this task could be cancelled
                raise asyncio.CancelledError
            if run.waiting:
                claim = await self._wait_turn(run, user_message)
            await self._stream(run, user_message.content, claim)
            gen.finishing = True
            await self._finish(run)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not (gen.cancel_requested or gen.stop_error) or task is None:
                await self._shutdown(run)
                raise
            task.uncancel()  # the cancel was ours: a stop request, not a shutdown
            gen.finishing = True
            if gen.cancel_requested:
                self._flush(run)
                run.finish = FinishReason.CANCELLED
                run.model_done = run.model_done or time.monotonic()
                await self._finish_or_fail(run)
            else:
                assert gen.stop_error is not None
                await self._fail_with(run, gen.stop_error)
        except BackendStreamError as exc:
            gen.finishing = True
            await self._fail_with(run, exc)
        except (RedisError, OSError):
            await self._fail(run, ErrorCode.BACKEND_UNAVAILABLE, "storage unavailable")
        except Exception:
            log.exception("generation_crashed")
            await self._fail(run, ErrorCode.INTERNAL, "internal error")

    async def _wait_turn(self, run: _Run, user_message: ChatMessage) -> Claim:
        """Wait in the room's queue until this attempt holds the room's lock; the history is
        read then, so the prompt sees every earlier exchange complete."""
        gen, s = run.gen, self._settings
        room_id = gen.start.room_id
        with self._turns.waiting(room_id):
            while True:
                woken = self._turns.armed(room_id)
                turn = await self._store.turn(
                    gen.key,
                    gen.attempt,
                    room_id=room_id,
                    user_message=user_message,
                    history_messages=s.history_messages,
                    character_id=gen.character_id,
                )
                if turn.position == 0:
                    break
                if turn.position < 0:
                    raise Superseded("lost its place in the room's queue")
                await self._turns.wait(woken, turn.lock_ttl_ms)
        gen.token = turn.token
        now = time.monotonic()
        self._metrics.room_wait.observe(now - gen.received_at)
        run.waiting = False
        run.settings_loaded = now
        run.first_token_deadline = now + s.first_token_timeout_s
        run.total_deadline = now + s.total_timeout_s
        return Claim(ClaimOutcome.NEW, {}, turn.history, turn.system_prompt)

    async def _stream(self, run: _Run, user_content: str, claim: Claim) -> None:
        s = self._settings
        request = build_prompt(
            system_prompt=claim.system_prompt or s.system_prompt,
            history=claim.history,
            user_content=user_content,
            request_id=run.gen.key.request_id,
            max_output_tokens=run.gen.max_output_tokens or s.max_output_tokens,
            user_id=run.gen.key.user_id,
        )
        run.prompt_built = time.monotonic()
        run.prompt_chars = sum(len(m.content) for m in request.messages)
        if self._ledger is not None:
            key = run.gen.key
            try:  # a prompt beyond its reserve reserves the rest too, or is refused here
                await self._ledger.top_up(
                    key.user_id, key.request_id, estimate_tokens(run.prompt_chars, 3.0)
                )
            except RequestRejected as exc:
                raise BudgetExceeded(exc.message, retry_after_s=exc.retry_after_s) from None
        run.model_called = True
        self._metrics.count_model_call(self._provider.name)
        tokens = await self._open(request)
        run.gen.mark_opened()
        try:
            async for delta in tokens:
                if delta.text:
                    self._on_text(run, delta.text)
                run.usage = delta.usage or run.usage
                run.finish = delta.finish_reason or run.finish
        except ProviderError:
            self._flush(run)  # what the model did say goes out before its error
            raise
        except (asyncio.CancelledError, RedisError, OSError):
            raise
        except Exception as exc:  # a provider bug ends the generation instead of hanging it
            log.exception("provider_crashed")
            raise ModelFailed("model provider failed") from exc
        finally:
            with contextlib.suppress(Exception):
                await tokens.aclose()
        run.model_done = time.monotonic()
        self._flush(run)

    async def _open(self, request: ModelRequest) -> AsyncGenerator[Delta, None]:
        try:
            return await self._provider.open_stream(request)
        except ProviderError:
            raise
        except Exception as exc:
            log.exception("provider_crashed")
            raise ModelFailed("model provider failed") from exc

    def _on_text(self, run: _Run, text: str) -> None:
        now = time.monotonic()
        run.first_token = run.first_token or now
        run.last_token = now
        run.pending.append(text)
        if not run.gen.chunks or now >= run.next_flush:
            self._flush(run, now)
        elif run.flush_timer is None:
            loop = asyncio.get_running_loop()
            delay = run.next_flush - now
            run.flush_timer = loop.call_at(loop.time() + delay, self._on_flush_timer, run)

    def _on_flush_timer(self, run: _Run) -> None:
        run.flush_timer = None
        if not run.gen.finishing:
            self._flush(run)

    def _flush(self, run: _Run, now: float | None = None) -> None:
        if run.flush_timer is not None:
            run.flush_timer.cancel()
            run.flush_timer = None
        if not run.pending:
            return
        now = time.monotonic() if now is None else now
        gen = run.gen
        text = "".join(run.pending)
        run.pending.clear()
        run.next_flush = now + self._window_s
        seq = gen.publish_chunk(text, now)
        if seq == 0:
            run.first_chunk = now
            self._metrics.first_chunk.observe(now - gen.received_at)
            if run.first_token is not None:
                self._metrics.first_token.observe(run.first_token - gen.received_at)
        self._metrics.chunks.inc()
        run.written = self._store.append_chunk(self._writer, gen.key, gen.attempt, seq, text)

    async def _sweep_forever(self) -> None:
        interval_s = min(MAX_SWEEP_INTERVAL_S, self._settings.ping_interval_s / 4)
        while True:
            await asyncio.sleep(interval_s)
            try:
                self._sweep(time.monotonic())
            except Exception:  # loop edge: a bug here must not stop timeouts for good
                log.exception("sweep_failed")

    def _sweep(self, now: float) -> None:
        """Stop late generations; poke idle ones so their listeners can ping."""
        s = self._settings
        poke_after_s = s.ping_interval_s / 2
        for gen, run in list(self._runs.items()):
            if run.waiting:
                if now >= run.wait_deadline:
                    gen.request_stop(
                        RoomWaitTimeout(
                            f"waited {s.room_queue_wait_s:g}s for the room",
                            retry_after_s=s.room_busy_retry_s,
                        )
                    )
            elif now >= run.total_deadline:
                gen.request_stop(GenerationTimeout(f"generation exceeded {s.total_timeout_s:g}s"))
            elif run.first_token is None and now >= run.first_token_deadline:
                gen.request_stop(
                    ModelTimeout(
                        f"no first token from the model within {s.first_token_timeout_s:g}s"
                    )
                )
            elif run.first_token is not None and now - run.last_token >= s.idle_timeout_s:
                gen.request_stop(GenerationTimeout(f"model sent nothing for {s.idle_timeout_s:g}s"))
            if now - gen.notified_at >= poke_after_s:
                gen.poke(now)

    async def _finish(self, run: _Run) -> None:
        gen = run.gen
        if run.written is not None:
            await run.written  # the terminal entry must not overtake a chunk
        content = gen.content
        latency = run.latency(time.monotonic())
        end = StreamEnd(
            message_id=gen.start.message_id,
            content=content,
            finish_reason=run.finish,
            usage=run.usage or Usage(),
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
        stored = await self._store.finish(
            gen.key,
            gen.attempt,
            chunks=len(gen.chunks),
            end_json=dumps(payload),
            place=gen.place(),
            assistant=assistant if gen.token is not None else None,  # never ran: no exchange
        )
        if not stored:
            if gen.token is not None:
                self._metrics.room_lock_lost.inc()
            raise Superseded("another replica took this generation or its room over")
        gen.publish_terminal(payload_event(SseEvent.END, payload))
        # Post-processing: after `end` is out, never on the path to the first chunk.
        self._metrics.count_generation(run.finish.value)
        usage = run.usage or Usage()
        self._metrics.count_tokens(usage.prompt_tokens, usage.completion_tokens)
        await self._settle(run)
        self._trace(run, None)
        log.info(
            "generation_end",
            finishReason=run.finish.value,
            chunks=len(gen.chunks),
            attempt=gen.attempt,
            **latency.wire(),
        )

    async def _settle(self, run: _Run) -> None:
        """The generation's real usage against its budget reservation (backend_stream/usage.py);
        a failure here never fails the generation (the reservation expires instead)."""
        if self._ledger is None:
            return
        key = run.gen.key
        usage = run.usage
        if usage is None and run.model_called:
            # The providers report usage last: a generation cancelled, timed out or failed
            # mid-stream has none. It was not free: count an estimate from the texts.
            prompt = estimate_tokens(run.prompt_chars)
            completion = estimate_tokens(len(run.gen.content))
            usage = Usage(
                prompt_tokens=prompt, completion_tokens=completion,
                total_tokens=prompt + completion,
            )  # fmt: skip
        try:
            async with asyncio.timeout(SHUTDOWN_WRITE_TIMEOUT_S):
                await self._ledger.settle(key.user_id, key.request_id, usage)
        except (RedisError, OSError, TimeoutError):
            log.warning("usage_not_settled")

    def _trace(self, run: _Run, error: str | None) -> None:
        if not self._tracing.enabled:
            return
        gen, now = run.gen, time.monotonic()
        usage = run.usage or Usage()
        self._tracing.record_generation(
            run.trace_parent,
            stages={
                "received": gen.received_at, "settings_loaded": run.settings_loaded,
                "prompt_built": run.prompt_built, "first_token": run.first_token,
                "first_chunk": run.first_chunk, "done": now,
            },
            model=(run.prompt_built, run.model_done),
            end=now,
            attributes={
                "chat.request_id": gen.key.request_id, "chat.room_id": gen.start.room_id,
                "chat.attempt": gen.attempt, "chat.chunks": len(gen.chunks),
                "chat.finish_reason": FinishReason.ERROR.value if error else run.finish.value,
                **({"chat.code": error} if error else {}),
            },
            model_attributes={
                "gen_ai.system": self._provider.name,
                "gen_ai.usage.input_tokens": usage.prompt_tokens,
                "gen_ai.usage.output_tokens": usage.completion_tokens,
            },
            error=error,
        )  # fmt: skip

    async def _finish_or_fail(self, run: _Run) -> None:
        try:
            await self._finish(run)
        except BackendStreamError as exc:
            await self._fail_with(run, exc)
        except (RedisError, OSError):
            await self._fail(run, ErrorCode.BACKEND_UNAVAILABLE, "storage unavailable")

    async def _fail_with(self, run: _Run, exc: BackendStreamError) -> None:
        await self._fail(run, exc.code, exc.message, exc.retry_after_s)

    async def _shutdown(self, run: _Run) -> None:
        """Say so to every listener, and let another replica retry the request."""
        run.gen.finishing = True
        with contextlib.suppress(Exception):
            async with asyncio.timeout(SHUTDOWN_WRITE_TIMEOUT_S):
                await self._fail(run, ErrorCode.BACKEND_UNAVAILABLE, "backend shutting down")

    async def _fail(
        self, run: _Run, code: ErrorCode, message: str, retry_after_s: float | None = None
    ) -> None:
        gen = run.gen
        gen.finishing = True
        err = StreamError(code=code, message=message, retryable=code in RETRYABLE)
        payload = err.wire()
        stored = False
        try:
            if run.written is not None and not run.written.done():
                with contextlib.suppress(RedisError, OSError):
                    await run.written
            stored = await self._store.fail(
                gen.key,
                gen.attempt,
                chunks=len(gen.chunks),
                error_json=dumps(payload),
                retryable=err.retryable,
                retry_after_s=retry_after_s,
                place=gen.place(),
            )
            if not stored:
                log.warning("generation_superseded", code=code.value)
        except (RedisError, OSError):
            log.warning("generation_fail_not_stored", code=code.value)
        gen.publish_terminal(payload_event(SseEvent.ERROR, payload, retry_after_s))
        self._metrics.count_generation(FinishReason.ERROR.value)
        if run.usage is not None:
            self._metrics.count_tokens(run.usage.prompt_tokens, run.usage.completion_tokens)
        if stored:
            await self._settle(run)  # a superseded attempt leaves it to the one that took over
        self._trace(run, code.value)
        self._metrics.errors.labels(code.value).inc()
        log.warning("generation_failed", code=code.value, chunks=len(gen.chunks), reason=message)
