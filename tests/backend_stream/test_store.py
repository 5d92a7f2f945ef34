"""The Redis claim is atomic: concurrent requests for one key start exactly one generation."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from backend_stream.store import ClaimOutcome, GenerationStore, GenKey, entry_id


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[GenerationStore]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield GenerationStore(client, buffer_ttl_s=60, idempotency_ttl_s=60, history_cap=3)
    await client.aclose()


async def test_fifty_concurrent_claims_make_one_new_generation(store: GenerationStore) -> None:
    key = GenKey("u-claim", f"r-{uuid.uuid4().hex}")

    async def claim(i: int) -> tuple[ClaimOutcome, dict[str, str]]:
        fields = {"state": "running", "attempt": "1", "messageId": f"m{i}"}
        return await store.claim(key, fields)

    results = await asyncio.gather(*(claim(i) for i in range(50)))
    outcomes = [o for o, _ in results]
    assert outcomes.count(ClaimOutcome.NEW) == 1
    winner = next(meta for o, meta in results if o is ClaimOutcome.NEW)["messageId"]
    assert {meta["messageId"] for _, meta in results} == {winner}
    assert await store.users_for_request(key.request_id) == ["u-claim"]


async def test_ids_with_separators_never_collide(store: GenerationStore) -> None:
    tag = uuid.uuid4().hex
    one = GenKey(f"a:{tag}", "b")
    other = GenKey("a", f"{tag}:b")
    assert one.meta != other.meta
    assert GenKey.from_slug(one.slug) == one


async def test_buffer_entries_after_a_seq_are_read_without_gaps(store: GenerationStore) -> None:
    key = GenKey("u-buf", f"r-{uuid.uuid4().hex}")
    for seq in range(6):
        await store.append_chunk(key, 1, seq, f"c{seq}")
    entries = await store.read_buffer(key, 1, entry_id(3), block_ms=None)
    assert [fields["d"] for _, fields in entries] == ["c4", "c5"]
    assert 0 < await store.redis.ttl(key.buffer(1)) <= 60
