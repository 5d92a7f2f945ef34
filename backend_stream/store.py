"""Everything the backend keeps in Redis, one round trip per operation on the hot path.

Keys (ids use a safe alphabet without ``/``, so ``/`` joins them unambiguously):
- ``bs:gen:{userId}/{requestId}``  hash: the idempotency record and the generation's state
  (``running`` -> ``done`` | ``failed``), its ids, and at the end its content/usage/latency/error.
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
- channel ``bs:cancel``: ``{userId}/{requestId}`` to stop a generation on whichever replica runs it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

import orjson
from redis.asyncio import Redis

from backend_stream import scripts
from backend_stream.chunk_writer import ChunkWriter
from contracts import ChatMessage

CANCEL_CHANNEL = "bs:cancel"
DEFAULT_LEASE_MS = 10_000
DEFAULT_HISTORY_TTL_S = 30 * 86_400


class GenState(StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class ClaimOutcome(StrEnum):
    NEW = "new"  # this request starts the generation
    RETRY = "retry"  # a retryable failure before: run again, same ids, user message kept
    EXISTING = "existing"  # attach to it (running) or answer from its record (done / failed)


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

    @classmethod
    def from_slug(cls, slug: str) -> GenKey | None:
        user_id, sep, request_id = slug.partition("/")
        return cls(user_id, request_id) if sep and user_id and request_id else None


def room_key(room_id: str) -> str:
    return f"bs:room:{room_id}:messages"


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
    """What the claim found or made; history and prompt are loaded unless ``EXISTING``."""

    outcome: ClaimOutcome
    meta: dict[str, str]
    history: list[HistoryEntry]
    system_prompt: str | None


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
    ) -> None:
        self.redis = redis
        self._buffer_ttl_s = buffer_ttl_s
        self._idem_ttl_s = idempotency_ttl_s
        self._history_cap = history_cap
        self._history_ttl_s = history_ttl_s
        self.lease_ms = lease_ms
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
        res = await self._claim(
            keys=[key.meta, index_key(key.request_id), room_key(room_id), character, key.lease],
            args=[
                self._idem_ttl_s,
                key.user_id,
                history_messages,
                self._history_cap,
                orjson.dumps(user_message.wire()),
                self.lease_ms,
                self._history_ttl_s,
                *flat,
            ],
        )
        outcome, meta_flat, history, prompt = res
        meta = dict(zip(meta_flat[::2], meta_flat[1::2], strict=True))
        return Claim(
            ClaimOutcome(outcome), meta, [_history_entry(m) for m in history], prompt or None
        )

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
        room_id: str,
        assistant: ChatMessage,
    ) -> bool:
        """Terminal ``end`` entry, the record marked done, the assistant message stored.

        False (nothing written) when a later attempt has taken the record over.
        """
        return await self._end(
            key, attempt, chunks, "end", end_json, room_id=room_id, assistant=assistant
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
    ) -> bool:
        """Terminal ``error`` entry and the record marked failed; no assistant message.

        A retryable failure lets the next request with the same key run again (``claim``).
        """
        return await self._end(
            key,
            attempt,
            chunks,
            "error",
            error_json,
            retryable=retryable,
            retry_after_s=retry_after_s,
        )

    async def refresh_leases(self, keys: list[GenKey]) -> None:
        """Keep this replica's generations alive in the eyes of the others (one pipeline)."""
        if not keys:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.pexpire(key.lease, self.lease_ms)
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
        room_id: str = "",
        assistant: ChatMessage | None = None,
        retryable: bool = False,
        retry_after_s: float | None = None,
    ) -> bool:
        res = await self._finish(
            keys=[key.meta, key.buffer(attempt), room_key(room_id), key.lease],
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
            ],
        )
        return bool(res)


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()
