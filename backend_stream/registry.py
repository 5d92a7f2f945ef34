"""Starts generations (one task each, kept referenced) or attaches requests to existing ones.

Idempotency per ``(userId, requestId)`` is decided by one atomic Lua claim in Redis, so a second
request on any replica attaches instead of calling the model again. Cancels reach the replica
that runs a generation through a Redis channel, and the ``cancel`` flag in the record covers the
instant between a claim and the registration of its generation here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field

import structlog
from redis.exceptions import RedisError

from backend_stream.errors import RequestRejected
from backend_stream.generation import Generation
from backend_stream.metrics import Metrics
from backend_stream.runner import GenerationRunner
from backend_stream.store import (
    CANCEL_CHANNEL,
    TURN_CHANNEL,
    Claim,
    ClaimOutcome,
    GenerationStore,
    GenKey,
    GenState,
)
from backend_stream.turns import RoomTurns
from backend_stream.usage import UsageLedger
from contracts import ChatMessage, ChatRequest, ErrorCode, Role, StreamStart, utc_now_iso
from contracts.aio import cancel_and_wait

log = structlog.get_logger("backend_stream.registry")

SHUTDOWN_TIMEOUT_S = 5.0
PUBSUB_POLL_S = 1.0
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0
EARLY_CANCEL_MAX = 10_000
EARLY_CANCEL_TTL_S = 10.0


@dataclass(frozen=True, slots=True)
class Attachment:
    """A request's handle on a generation: run here (``local``) or known from Redis (``meta``)."""

    key: GenKey
    start: StreamStart
    attempt: int
    attached: bool  # False only for the request that started this attempt
    local: Generation | None = None
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def state(self) -> GenState:
        if self.local is not None:
            return GenState.RUNNING
        return GenState(self.meta.get("state", GenState.RUNNING))


def start_from_meta(meta: dict[str, str], queue_position: int = 0) -> StreamStart:
    return StreamStart(
        request_id=meta["requestId"],
        room_id=meta["roomId"],
        message_id=meta["messageId"],
        user_message_id=meta["userMessageId"],
        queue_position=queue_position or None,
    )


# Generations a request over budget may still attach to (no model call follows)
FREE_STATES = frozenset({GenState.RUNNING.value, GenState.DONE.value})


class GenerationRegistry:
    """This process's running generations and the cancel listener."""

    def __init__(
        self,
        *,
        store: GenerationStore,
        runner: GenerationRunner,
        metrics: Metrics,
        history_messages: int,
        turns: RoomTurns | None = None,
        room_busy_retry_s: float = 2.0,
        ledger: UsageLedger | None = None,
        max_output_tokens: int = 512,
    ) -> None:
        self._ledger = ledger
        self._max_output_tokens = max_output_tokens
        self._store = store
        self._turns = turns or RoomTurns()
        self._room_busy_retry_s = room_busy_retry_s
        self._history_messages = history_messages
        # Cancels that arrived before their generation was registered here (the claim's reply
        # and the cancel message travel on different connections); bounded, short-lived.
        self._early_cancels: dict[GenKey, float] = {}
        self._runner = runner
        self._metrics = metrics
        self._local: dict[GenKey, Generation] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._cancel_listener: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._cancel_listener = asyncio.create_task(self._listen_for_cancels())
        self._heartbeat = asyncio.create_task(self._refresh_leases())

    async def aclose(self) -> None:
        """Cancel every generation (each stores a retryable error) and the cancel listener."""
        tasks = list(self._tasks)
        tasks += [t for t in (self._cancel_listener, self._heartbeat) if t is not None]
        left = await cancel_and_wait(tasks, SHUTDOWN_TIMEOUT_S)
        if left:
            log.warning("tasks_left_running_at_shutdown", count=len(left))

    async def _release(self, req: ChatRequest, reserved: bool) -> None:
        if reserved and self._ledger is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._ledger.release(req.user_id, req.request_id)

    async def start_or_attach(
        self, req: ChatRequest, received_at: float, *, max_output_tokens: int | None = None
    ) -> Attachment:
        key = GenKey(req.user_id, req.request_id)
        local = self._local.get(key)
        if local is not None:
            return Attachment(key, local.start, local.attempt, attached=True, local=local)
        record = _new_record(req)
        # The budgets, before anything is stored or the model called: BUDGET_EXCEEDED (429)
        reserved = False
        if self._ledger is not None:
            try:
                reserved = await self._ledger.reserve(
                    req.user_id, req.request_id, max_output_tokens or self._max_output_tokens
                )
            except RequestRejected:
                # over budget now, but the generation runs or is done: attaching to it or
                # replaying it calls no model. A queued task or a failed one (a retry) would.
                existing = await self._store.get_meta(key)
                if existing.get("state") not in FREE_STATES:
                    raise

        try:
            claim = await self._store.claim(
                key,
                record,
                room_id=req.room_id,
                user_message=_user_message(req, record),
                history_messages=self._history_messages,
                character_id=req.character_id,
            )
        except BaseException:
            await self._release(req, reserved)
            raise
        claimed_at = time.monotonic()
        if claim.outcome in (ClaimOutcome.EXISTING, ClaimOutcome.BUSY):
            await self._release(req, reserved)  # no model call follows: nothing to reserve for
        if claim.outcome is ClaimOutcome.BUSY:
            self._metrics.room_busy.inc()
            raise RequestRejected(
                ErrorCode.ROOM_BUSY,
                f"the room already has {claim.position} generations waiting; try again later",
                retry_after_s=self._room_busy_retry_s,
            )
        meta = claim.meta
        local = self._local.get(key)
        if claim.outcome is ClaimOutcome.EXISTING or local is not None:
            start = local.start if local is not None else start_from_meta(meta)
            attempt = local.attempt if local is not None else int(meta["attempt"])
            return Attachment(key, start, attempt, attached=True, local=local, meta=meta)
        gen = Generation(
            key=key,
            attempt=int(meta["attempt"]),
            start=start_from_meta(meta, claim.position),
            received_at=received_at,
            character_id=meta.get("characterId") or None,
            token=claim.token,
            # a batch task's record carries its output budget (BATCH_MAX_TOKENS), whoever runs it
            max_output_tokens=int(meta.get("maxOutputTokens") or 0) or max_output_tokens,
        )
        self._local[key] = gen
        user_message = _user_message(req, meta)  # the record's ids (a retry keeps its first)
        task = asyncio.create_task(self._run(gen, user_message, claim, claimed_at))
        gen.task = task
        if self._early_cancels.pop(key, None) is not None:
            gen.request_cancel()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return Attachment(key, gen.start, gen.attempt, attached=False, local=gen, meta=meta)

    async def find(self, key: GenKey) -> Attachment | None:
        """The generation for ``key`` as a resume sees it, or None when unknown or expired."""
        local = self._local.get(key)
        if local is not None:
            return Attachment(key, local.start, local.attempt, attached=True, local=local)
        meta = await self._store.get_meta(key)
        if not meta or "messageId" not in meta or meta.get("state") == GenState.QUEUED:
            return None  # a queued batch task has no generation yet
        return Attachment(key, start_from_meta(meta), int(meta["attempt"]), True, meta=meta)

    async def cancel(self, key: GenKey) -> str | None:
        """``cancelling``, ``done`` (nothing left to stop) or None (unknown)."""
        status = await self._store.request_cancel(key)
        local = self._local.get(key)
        if status == "cancelling" and local is not None:
            local.request_cancel()
        return status

    async def _run(
        self, gen: Generation, user_message: ChatMessage, claim: Claim, claimed_at: float
    ) -> None:
        self._metrics.active_generations.inc()
        try:
            await self._runner.run(gen, user_message, claim, claimed_at)
        finally:
            if self._local.get(gen.key) is gen:
                del self._local[gen.key]
            self._metrics.active_generations.dec()

    async def _refresh_leases(self) -> None:
        """Every third of the lease (or of the room lock's TTL, the shorter): one pipeline for
        this replica's generations, their leases and their places in their rooms."""
        interval_s = min(self._store.lease_ms, self._store.room_lock_ms) / 1000 / 3
        while True:
            await asyncio.sleep(interval_s)
            try:
                gens = list(self._local.values())
                await self._store.refresh_leases(
                    [g.key for g in gens], [g.place() for g in gens if not g.finishing]
                )
            except Exception as exc:  # loop edge: log and try again next beat
                log.warning("lease_refresh_failed", error=type(exc).__name__)

    async def _listen_for_cancels(self) -> None:
        backoff_s = BACKOFF_MIN_S
        while True:
            try:
                async with self._store.redis.pubsub() as pubsub:
                    await pubsub.subscribe(CANCEL_CHANNEL, TURN_CHANNEL)
                    backoff_s = BACKOFF_MIN_S
                    while True:
                        msg = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=PUBSUB_POLL_S
                        )
                        if msg is None:
                            continue
                        data = msg.get("data")
                        if msg.get("channel") == TURN_CHANNEL:
                            if isinstance(data, str):
                                self._turns.wake(data)
                        else:
                            self._on_cancel_message(data)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # loop edge: log, back off with a cap, reconnect
                log.warning("cancel_listener_error", error=type(exc).__name__)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)

    def _on_cancel_message(self, data: object) -> None:
        key = GenKey.from_slug(data) if isinstance(data, str) else None
        if key is None:
            return
        local = self._local.get(key)
        if local is not None:
            local.request_cancel()
            return
        now = time.monotonic()
        if len(self._early_cancels) >= EARLY_CANCEL_MAX:
            self._early_cancels = {
                k: t for k, t in self._early_cancels.items() if now - t < EARLY_CANCEL_TTL_S
            }
        if len(self._early_cancels) < EARLY_CANCEL_MAX:
            self._early_cancels[key] = now


def _user_message(req: ChatRequest, record: dict[str, str]) -> ChatMessage:
    return ChatMessage(
        id=record["userMessageId"],
        request_id=req.request_id,
        role=Role.USER,
        content=req.content,
        user_id=req.user_id,
        character_id=req.character_id,
        created_at=record["createdAt"],
    )


def _new_record(req: ChatRequest) -> dict[str, str]:
    return {
        "state": GenState.RUNNING,
        "attempt": "1",
        "requestId": req.request_id,
        "roomId": req.room_id,
        "userId": req.user_id,
        "characterId": req.character_id or "",
        "messageId": f"m_{uuid.uuid4().hex}",
        "userMessageId": f"u_{uuid.uuid4().hex}",
        "createdAt": utc_now_iso(),
        "startedAtMs": str(int(time.time() * 1000)),
    }
