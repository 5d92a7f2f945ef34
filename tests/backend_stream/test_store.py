"""The Redis claim is atomic: concurrent requests for one key start exactly one generation."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from backend_stream.chunk_writer import ChunkWriter
from backend_stream.store import Claim, ClaimOutcome, GenerationStore, GenKey, entry_id
from contracts import ChatMessage, Role


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[GenerationStore]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield GenerationStore(client, buffer_ttl_s=60, idempotency_ttl_s=60, history_cap=3)
    await client.aclose()


async def test_fifty_concurrent_claims_make_one_new_generation(store: GenerationStore) -> None:
    key = GenKey("u-claim", f"r-{uuid.uuid4().hex}")

    room = f"room-{uuid.uuid4().hex}"

    async def claim(i: int) -> Claim:
        fields = {"state": "running", "attempt": "1", "messageId": f"m{i}"}
        user = ChatMessage(
            id=f"u{i}", request_id=key.request_id, role=Role.USER, content="hi", created_at="t"
        )
        return await store.claim(
            key, fields, room_id=room, user_message=user, history_messages=5, character_id=None
        )

    results = await asyncio.gather(*(claim(i) for i in range(50)))
    outcomes = [c.outcome for c in results]
    assert outcomes.count(ClaimOutcome.NEW) == 1
    winner = next(c.meta for c in results if c.outcome is ClaimOutcome.NEW)["messageId"]
    assert {c.meta["messageId"] for c in results} == {winner}
    assert await store.users_for_request(key.request_id) == ["u-claim"]
    stored = await store.history(room, 10)
    assert len(stored) == 1, "the user message is stored once, with the winning claim"


async def test_ids_with_separators_never_collide(store: GenerationStore) -> None:
    tag = uuid.uuid4().hex
    one = GenKey(f"a:{tag}", "b")
    other = GenKey("a", f"{tag}:b")
    assert one.meta != other.meta
    assert GenKey.from_slug(one.slug) == one


async def test_buffer_entries_after_a_seq_are_read_without_gaps(store: GenerationStore) -> None:
    key = GenKey("u-buf", f"r-{uuid.uuid4().hex}")
    writer = ChunkWriter(store.redis)
    writer.start()
    written = [store.append_chunk(writer, key, 1, seq, f"c{seq}") for seq in range(6)]
    await asyncio.wait_for(written[-1], 5)
    await writer.aclose()
    assert all(f.done() for f in written)
    entries = await store.read_buffer(key, 1, entry_id(3), block_ms=None)
    assert [fields["d"] for _, fields in entries] == ["c4", "c5"]
    assert 0 < await store.redis.ttl(key.buffer(1)) <= 60
