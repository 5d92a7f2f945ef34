"""Everything the backend keeps in Redis, one round trip per operation on the hot path.

Keys (ids use a safe alphabet without ``/``, so ``/`` joins them unambiguously):
- ``bs:gen:{userId}/{requestId}``  hash: the idempotency record and the generation's state
  (``running`` -> ``done`` | ``failed``), its ids, and at the end its content/usage/latency/error.
- ``bs:buf:{userId}/{requestId}/{attempt}``  stream: chunk ``seq`` n has entry id ``n+1-0``, the
  terminal entry (end/error) follows the last chunk. Explicit ids make "after seq N" an XREAD from
  ``N+1-0``, and a second writer impossible (Redis refuses a smaller id).
- ``bs:req:{requestId}``  set of userIds: resolves resume/cancel calls that carry no userId.
- ``bs:room:{roomId}:messages``  list of ChatMessage JSON, oldest first, capped (LTRIM).
- ``bs:character:{characterId}``  hash, optional ``systemPrompt`` set by operators.
- channel ``bs:cancel``: ``{userId}/{requestId}`` to stop a generation on whichever replica runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

import orjson
from redis.asyncio import Redis

from contracts import ChatMessage

CANCEL_CHANNEL = "bs:cancel"

CLAIM_SCRIPT = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  redis.call('HSET', KEYS[1], unpack(ARGV, 3))
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  redis.call('SADD', KEYS[2], ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[1])
  return {'new'}
end
if state == 'failed' and redis.call('HGET', KEYS[1], 'retryable') == '1' then
  redis.call('HINCRBY', KEYS[1], 'attempt', 1)
  redis.call('HSET', KEYS[1], 'state', 'running')
  redis.call('HDEL', KEYS[1], 'error', 'retryable', 'retryAfter', 'cancel')
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  local out = redis.call('HGETALL', KEYS[1])
  table.insert(out, 1, 'retry')
  return out
end
local out = redis.call('HGETALL', KEYS[1])
table.insert(out, 1, 'existing')
return out
"""

CANCEL_SCRIPT = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return false end
if state == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
  redis.call('PUBLISH', ARGV[1], ARGV[2])
  return 'cancelling'
end
return 'done'
"""


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
class Prepared:
    system_prompt: str | None
    history: list[ChatMessage]
    cancel_requested: bool


class GenerationStore:
    """Typed operations over the keys above; every call is one round trip."""

    def __init__(
        self,
        redis: Redis,
        *,
        buffer_ttl_s: int,
        idempotency_ttl_s: int,
        history_cap: int,
    ) -> None:
        self.redis = redis
        self._buffer_ttl_s = buffer_ttl_s
        self._idem_ttl_s = idempotency_ttl_s
        self._history_cap = history_cap
        self._claim = redis.register_script(CLAIM_SCRIPT)
        self._cancel = redis.register_script(CANCEL_SCRIPT)

    async def claim(
        self, key: GenKey, fields: dict[str, str]
    ) -> tuple[ClaimOutcome, dict[str, str]]:
        """Atomically create the record, or return the existing one (reset when retryable)."""
        flat = [x for pair in fields.items() for x in pair]
        res = await self._claim(
            keys=[key.meta, index_key(key.request_id)],
            args=[self._idem_ttl_s, key.user_id, *flat],
        )
        outcome = ClaimOutcome(res[0])
        if outcome is ClaimOutcome.NEW:
            return outcome, dict(fields)
        return outcome, dict(zip(res[1::2], res[2::2], strict=True))

    async def get_meta(self, key: GenKey) -> dict[str, str]:
        return cast(dict[str, str], await self.redis.hgetall(key.meta))

    async def users_for_request(self, request_id: str) -> list[str]:
        return sorted(cast(set[str], await self.redis.smembers(index_key(request_id))))

    async def prepare(
        self,
        key: GenKey,
        *,
        room_id: str,
        character_id: str | None,
        history_messages: int,
        user_message: ChatMessage | None,
    ) -> Prepared:
        """Load the character and the room's last messages, and store the user message."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hget(key.meta, "cancel")
            if character_id:
                pipe.hget(character_key(character_id), "systemPrompt")
            if history_messages > 0:
                pipe.lrange(room_key(room_id), -history_messages, -1)
            if user_message is not None:
                self._push_message(pipe, room_id, user_message)
                pipe.hset(key.meta, "userStored", "1")
            res: list[Any] = await pipe.execute()
        cancel = res.pop(0) == "1"
        prompt = res.pop(0) if character_id else None
        raw = res.pop(0) if history_messages > 0 else []
        return Prepared(prompt, [ChatMessage.model_validate_json(m) for m in raw], cancel)

    async def append_chunk(self, key: GenKey, attempt: int, seq: int, chunk: str) -> None:
        buf = key.buffer(attempt)
        if seq == 0:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(buf, {"t": "c", "d": chunk}, id=entry_id(seq))
                pipe.expire(buf, self._buffer_ttl_s)
                await pipe.execute()
        else:
            await self.redis.xadd(buf, {"t": "c", "d": chunk}, id=entry_id(seq))

    async def finish(
        self,
        key: GenKey,
        attempt: int,
        *,
        chunks: int,
        end_json: str,
        room_id: str,
        assistant: ChatMessage,
    ) -> None:
        """Terminal ``end`` entry, the record marked done, the assistant message stored."""
        async with self.redis.pipeline(transaction=True) as pipe:
            self._terminal(pipe, key, attempt, chunks, "end", end_json)
            pipe.hset(key.meta, mapping={"state": GenState.DONE, "end": end_json})
            pipe.expire(key.meta, self._idem_ttl_s)
            self._push_message(pipe, room_id, assistant)
            await pipe.execute()

    async def fail(
        self,
        key: GenKey,
        attempt: int,
        *,
        chunks: int,
        error_json: str,
        retryable: bool,
        retry_after_s: float | None,
    ) -> None:
        """Terminal ``error`` entry and the record marked failed; no assistant message.

        A retryable failure lets the next request with the same key run again (``claim``).
        """
        fields = {
            "state": GenState.FAILED,
            "error": error_json,
            "retryable": "1" if retryable else "0",
            "retryAfter": "" if retry_after_s is None else f"{retry_after_s:g}",
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            self._terminal(pipe, key, attempt, chunks, "error", error_json, fields["retryAfter"])
            pipe.hset(key.meta, mapping=cast(dict[Any, Any], fields))
            pipe.expire(key.meta, self._idem_ttl_s)
            await pipe.execute()

    async def request_cancel(self, key: GenKey) -> str | None:
        """``cancelling`` (signalled to every replica), ``done``, or None when unknown."""
        res = await self._cancel(keys=[key.meta], args=[CANCEL_CHANNEL, key.slug])
        return str(res) if res else None

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

    def _terminal(
        self,
        pipe: Any,
        key: GenKey,
        attempt: int,
        chunks: int,
        kind: str,
        data: str,
        retry_after: str = "",
    ) -> None:
        buf = key.buffer(attempt)
        entry = {"t": kind, "d": data, **({"ra": retry_after} if retry_after else {})}
        pipe.xadd(buf, entry, id=entry_id(chunks))
        pipe.expire(buf, self._buffer_ttl_s)

    def _push_message(self, pipe: Any, room_id: str, message: ChatMessage) -> None:
        pipe.rpush(room_key(room_id), orjson.dumps(message.wire()))
        pipe.ltrim(room_key(room_id), -self._history_cap, -1)


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()
