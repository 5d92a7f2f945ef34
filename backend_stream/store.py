"""Everything the backend keeps in Redis, one round trip per operation on the hot path.

Keys (ids use a safe alphabet without ``/``, so ``/`` joins them unambiguously):
- ``bs:gen:{userId}/{requestId}``  hash: the idempotency record and the generation's state
  (``running`` -> ``done`` | ``failed``; a batch task's starts ``queued``: tasks.py), its ids,
  and at the end its content/usage/latency/error.
- ``bs:buf:{userId}/{requestId}/{attempt}``  stream: chunk ``seq`` n has entry id ``n+1-0``, the
  terminal entry (end/error) follows the last chunk. Explicit ids make "after seq N" an XREAD from
  ``N+1-0``, and a second writer impossible (Redis refuses a smaller id).
- ``bs:req:{requestId}``  set of userIds: resolves resume/cancel calls that carry no userId.
- ``bs:room:{roomId}:messages``  list of ChatMessage JSON, oldest first, capped (LTRIM); it
  expires ``history_ttl_s`` after the last message stored (an idle room's history goes away).
- ``bs:post:{userId}/{requestId}``  the stored person-to-person message (idempotency).
- ``bs:character:{characterId}``  hash, optional ``systemPrompt`` set by operators.
- ``bs:lease:{userId}/{requestId}``  string with a TTL, refreshed by the replica running the
  generation: a "running" record without it belongs to a replica that died (see scripts.CLAIM).
- ``bs:room:{roomId}:lock`` / ``:queue`` / ``:waiting`` / ``:fence``  the room's lock (one
  generation at a time, in acceptance order; scripts.ROOM_LIB): the holder's "<token> <ticket>"
  with a TTL, the waiting tickets in order, their deadlines, the fencing-token counter.
- channel ``bs:cancel``: ``{userId}/{requestId}`` to stop a generation on whichever replica runs it.
- channel ``bs:turn``: ``{roomId}`` when a room's lock is released with generations waiting.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, cast

import orjson
from redis.asyncio import Redis

from backend_stream import scripts
from backend_stream.chunk_writer import ChunkWriter
from contracts import ChatMessage

CANCEL_CHANNEL = "bs:cancel"
TURN_CHANNEL = "bs:turn"
DEFAULT_LEASE_MS = 10_000
DEFAULT_ROOM_QUEUE_MAX = 5
DEFAULT_ROOM_LOCK_MS = 10_000
DEFAULT_HISTORY_TTL_S = 30 * 86_400


class GenState(StrEnum):
    QUEUED = "queued"  # a batch task's record, made at acceptance (tasks.py); CLAIM runs it
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class ClaimOutcome(StrEnum):
    NEW = "new"  # this request starts the generation
    RETRY = "retry"  # a retryable failure before: run again, same ids, user message kept
    EXISTING = "existing"  # attach to it (running) or answer from its record (done / failed)
    BUSY = "busy"  # the room's queue is full: nothing was written (ROOM_BUSY)


@dataclass(frozen=True, slots=True)
class GenKey:
    user_id: str
    request_id: str

    @property
    def slug(self) -> str:
        return f"{self.user_id}/{self.request_id}"

    @property
    def meta(self) -> str:
        return f"bs:gen:{self.slug}"

    @property
    def lease(self) -> str:
        return f"bs:lease:{self.slug}"

    def buffer(self, attempt: int) -> str:
        return f"bs:buf:{self.slug}/{attempt}"

    def ticket(self, attempt: int) -> str:
        """This attempt's place in its room's queue (scripts.ROOM_LIB)."""
        return f"{self.slug}/{attempt}"

    @classmethod
    def from_slug(cls, slug: str) -> GenKey | None:
        user_id, sep, request_id = slug.partition("/")
        return cls(user_id, request_id) if sep and user_id and request_id else None


def room_key(room_id: str) -> str:
    return f"bs:room:{room_id}:messages"


@dataclass(frozen=True, slots=True)
class RoomKeys:
    """The keys of one room's lock (scripts.ROOM_LIB)."""

    lock: str
    queue: str
    waiting: str
    fence: str

    @classmethod
    def of(cls, room_id: str) -> RoomKeys:
        base = f"bs:room:{room_id}"
        return cls(f"{base}:lock", f"{base}:queue", f"{base}:waiting", f"{base}:fence")


def index_key(request_id: str) -> str:
    return f"bs:req:{request_id}"


def character_key(character_id: str) -> str:
    return f"bs:character:{character_id}"


def entry_id(seq: int) -> str:
    """Stream entry id of chunk ``seq`` (and of the terminal entry after ``seq - 1``)."""
    return f"{seq + 1}-0"


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """A stored message as the prompt needs it (no pydantic on the path to the first token)."""

    role: str
    content: str
    request_id: str
    user_id: str | None = None


def _history_entry(raw: str) -> HistoryEntry:
    data = orjson.loads(raw)
    user = data.get("userId")
    return HistoryEntry(
        str(data["role"]), str(data["content"]), str(data["requestId"]),
        str(user) if user else None,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Claim:
    """What the claim found or made. A request that runs the generation either holds its
    room's lock (``token``; history and prompt loaded) or waits in the room's queue
    (``position`` > 0: ``GenerationStore.turn`` takes the lock later). ``BUSY``: the queue was
    full (``position`` = its length) and nothing was written."""

    outcome: ClaimOutcome
    meta: dict[str, str]
    history: list[HistoryEntry]
    system_prompt: str | None
    position: int = 0
    token: str | None = None


@dataclass(frozen=True, slots=True)
class RoomPlace:
    """Where one attempt stands in its room: holding the lock (``token``) or queued."""

    room_id: str
    ticket: str
    token: str | None


@dataclass(frozen=True, slots=True)
class Turn:
    """A waiter's ask for the room: the lock (``token``, history, prompt) or its place."""

    position: int  # 0: the lock is ours; -1: no longer queued (its deadline lapsed)
    token: str | None = None
    history: list[HistoryEntry] = field(default_factory=list)
    system_prompt: str | None = None
    lock_ttl_ms: int = -2  # the holder's remaining lock (PTTL) while waiting


class GenerationStore:
    """Typed operations over the keys above; every call is one round trip."""

    def __init__(
        self,
        redis: Redis,
        *,
        buffer_ttl_s: int,
        idempotency_ttl_s: int,
        history_cap: int,
        history_ttl_s: int = DEFAULT_HISTORY_TTL_S,
        lease_ms: int = DEFAULT_LEASE_MS,
        room_queue_max: int = DEFAULT_ROOM_QUEUE_MAX,
        room_lock_ms: int = DEFAULT_ROOM_LOCK_MS,
    ) -> None:
        self.redis = redis
        self._buffer_ttl_s = buffer_ttl_s
        self._idem_ttl_s = idempotency_ttl_s
        self._history_cap = history_cap
        self._history_ttl_s = history_ttl_s
        self.lease_ms = lease_ms
        self._room_queue_max = room_queue_max
        self.room_lock_ms = room_lock_ms
        self._turn = redis.register_script(scripts.TURN)
        self._keep = redis.register_script(scripts.KEEP)
        self._claim = redis.register_script(scripts.CLAIM)
        self._finish = redis.register_script(scripts.FINISH)
        self._cancel = redis.register_script(scripts.CANCEL)
        self._post = redis.register_script(scripts.POST)

    async def claim(
        self,
        key: GenKey,
        fields: dict[str, str],
        *,
        room_id: str,
        user_message: ChatMessage,
        history_messages: int,
        character_id: str | None,
    ) -> Claim:
        """Atomically create the record (storing the user message), or return the existing one.

        A record whose generation failed with a retryable error is reset for another attempt:
        same ids, the user message kept (it is not stored twice).
        """
        flat = [x for pair in fields.items() for x in pair]
        character = character_key(character_id) if character_id else "bs:character:-"
        room = RoomKeys.of(room_id)
        res = await self._claim(
            keys=[
                key.meta, index_key(key.request_id), room_key(room_id), character, key.lease,
                room.lock, room.queue, room.waiting, room.fence,
            ],
            args=[
                self._idem_ttl_s,
                key.user_id,
                history_messages,
                self._history_cap,
                orjson.dumps(user_message.wire()),
                self.lease_ms,
                self._history_ttl_s,
                self._room_queue_max,
                self.room_lock_ms,
                key.slug,
                *flat,
            ],
        )  # fmt: skip
        outcome, meta_flat, history, prompt, position, token = res
        meta = dict(zip(meta_flat[::2], meta_flat[1::2], strict=True))
        return Claim(
            ClaimOutcome(outcome),
            meta,
            [_history_entry(m) for m in history],
            prompt or None,
            int(position),
            token or None,
        )

    async def turn(
        self,
        key: GenKey,
        attempt: int,
        *,
        room_id: str,
        user_message: ChatMessage,
        history_messages: int,
        character_id: str | None,
    ) -> Turn:
        """A waiting attempt asks for its room's lock (one round trip)."""
        character = character_key(character_id) if character_id else "bs:character:-"
        room = RoomKeys.of(room_id)
        res = await self._turn(
            keys=[
                key.meta, room_key(room_id), character, room.lock, room.queue, room.waiting,
                room.fence,
            ],
            args=[
                key.ticket(attempt), self.room_lock_ms, history_messages, self._history_cap,
                orjson.dumps(user_message.wire()), self._history_ttl_s,
            ],
        )  # fmt: skip
        position = int(res[0])
        if position != 0:
            return Turn(position, lock_ttl_ms=int(res[1]) if len(res) > 1 else -2)
        return Turn(0, str(res[1]), [_history_entry(m) for m in res[2]], res[3] or None)

    async def get_meta(self, key: GenKey) -> dict[str, str]:
        return cast(dict[str, str], await self.redis.hgetall(key.meta))

    async def users_for_request(self, request_id: str) -> list[str]:
        return sorted(cast(set[str], await self.redis.smembers(index_key(request_id))))

    def append_chunk(
        self, writer: ChunkWriter, key: GenKey, attempt: int, seq: int, chunk: str
    ) -> asyncio.Future[None]:
        """Queue the chunk's XADD (the first one also sets the buffer's TTL)."""
        expire_s = self._buffer_ttl_s if seq == 0 else None
        return writer.write(key.buffer(attempt), entry_id(seq), chunk, expire_s)

    async def finish(
        self,
        key: GenKey,
        attempt: int,
        *,
        chunks: int,
        end_json: str,
        place: RoomPlace,
        assistant: ChatMessage | None,
    ) -> bool:
        """Terminal ``end`` entry, the record marked done, the assistant message stored (None:
        the attempt never held its room, e.g. cancelled while queued), the room released.

        False (nothing written) when a later attempt has taken the record over, or when the
        room's lock is no longer this attempt's (fencing).
        """
        return await self._end(
            key, attempt, chunks, "end", end_json, place=place, assistant=assistant
        )

    async def fail(
        self,
        key: GenKey,
        attempt: int,
        *,
        chunks: int,
        error_json: str,
        retryable: bool,
        retry_after_s: float | None,
        place: RoomPlace,
    ) -> bool:
        """Terminal ``error`` entry and the record marked failed; no assistant message; the
        room released. A retryable failure lets the next request with the same key run again
        (``claim``)."""
        return await self._end(
            key,
            attempt,
            chunks,
            "error",
            error_json,
            place=place,
            retryable=retryable,
            retry_after_s=retry_after_s,
        )

    async def refresh_leases(self, keys: list[GenKey], places: list[RoomPlace]) -> None:
        """Keep this replica's generations alive in the eyes of the others, and their places
        in their rooms (held locks, queued tickets): one pipeline."""
        if not keys and not places:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.pexpire(key.lease, self.lease_ms)
            for place in places:
                room = RoomKeys.of(place.room_id)
                await self._keep(
                    keys=[room.lock, room.queue, room.waiting],
                    args=[place.token or "", place.ticket, self.room_lock_ms],
                    client=pipe,
                )
            await pipe.execute()

    async def is_orphaned(self, key: GenKey, meta: dict[str, str]) -> bool:
        """A "running" record whose owner's lease has lapsed: nobody will end it."""
        return meta.get("state") == GenState.RUNNING and not await self.redis.exists(key.lease)

    async def request_cancel(self, key: GenKey) -> str | None:
        """``cancelling`` (signalled to every replica), ``done``, or None when unknown."""
        res = await self._cancel(keys=[key.meta], args=[CANCEL_CHANNEL, key.slug])
        return str(res) if res else None

    async def post(self, room_id: str, message: ChatMessage) -> tuple[bool, ChatMessage]:
        """Store a person-to-person message once per (userId, requestId); (new, the message
        as stored: a repeat gets the first call's)."""
        key = f"bs:post:{message.user_id}/{message.request_id}"
        new, raw = await self._post(
            keys=[key, room_key(room_id)],
            args=[dumps(message.wire()), self._idem_ttl_s, self._history_cap, self._history_ttl_s],
        )
        return bool(new), ChatMessage.model_validate_json(raw)

    async def history(self, room_id: str, limit: int) -> list[ChatMessage]:
        raw = await self.redis.lrange(room_key(room_id), -limit, -1)
        return [ChatMessage.model_validate_json(m) for m in raw]

    async def read_buffer(
        self, key: GenKey, attempt: int, after_id: str, block_ms: int | None, count: int = 512
    ) -> list[tuple[str, dict[str, str]]]:
        """Entries after ``after_id``, waiting up to ``block_ms`` (None: not at all)."""
        res: Any = await self.redis.xread(
            {key.buffer(attempt): after_id}, count=count, block=block_ms
        )
        if not res:
            return []
        return cast(list[tuple[str, dict[str, str]]], res[0][1])

    async def _end(
        self,
        key: GenKey,
        attempt: int,
        chunks: int,
        kind: str,
        data: str,
        *,
        place: RoomPlace,
        assistant: ChatMessage | None = None,
        retryable: bool = False,
        retry_after_s: float | None = None,
    ) -> bool:
        room = RoomKeys.of(place.room_id)
        res = await self._finish(
            keys=[
                key.meta,
                key.buffer(attempt),
                room_key(place.room_id),
                key.lease,
                room.lock,
                room.queue,
                room.waiting,
            ],  # fmt: skip
            args=[
                attempt,
                entry_id(chunks),
                kind,
                data,
                self._buffer_ttl_s,
                self._idem_ttl_s,
                "1" if retryable else "0",
                "" if retry_after_s is None else f"{retry_after_s:g}",
                orjson.dumps(assistant.wire()) if assistant is not None else "",
                self._history_cap,
                self._history_ttl_s,
                place.token or "",
                place.ticket,
                TURN_CHANNEL,
                place.room_id,
            ],
        )
        return bool(res)


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()
