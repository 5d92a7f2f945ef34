"""Batched chunk writes: order kept per stream, one pipeline for what queued up meanwhile."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from backend_stream.chunk_writer import ChunkWriter
from contracts.redis_server import EmbeddedRedis


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def test_chunks_queued_together_share_one_batch_in_order(redis: Redis) -> None:
    writer = ChunkWriter(redis)
    writer.start()
    streams = [f"test:cw:{uuid.uuid4().hex}" for _ in range(20)]
    futures = [
        writer.write(stream, f"{seq + 1}-0", f"{i}:{seq}", 60 if seq == 0 else None)
        for seq in range(10)
        for i, stream in enumerate(streams)
    ]
    await asyncio.wait_for(asyncio.gather(*futures), 10)
    batches = writer.batches
    await writer.aclose()
    assert batches <= 2, "200 chunks queued in one tick must not cost 200 round trips"
    for i, stream in enumerate(streams):
        entries: Any = await redis.xrange(stream)
        assert [f["d"] for _, f in entries] == [f"{i}:{seq}" for seq in range(10)]
        assert 0 < await redis.ttl(stream) <= 60


async def test_a_failed_batch_fails_the_futures_waiting_on_it(redis: Redis) -> None:
    writer = ChunkWriter(redis)
    writer.start()
    stream = f"test:cw:{uuid.uuid4().hex}"
    await writer.write(stream, "5-0", "later")
    refused = writer.write(stream, "2-0", "smaller id: Redis refuses it")
    with pytest.raises(Exception, match="smaller"):
        await asyncio.wait_for(refused, 5)
    await writer.aclose()


async def test_a_connection_redis_closed_is_replaced_and_the_batch_still_written() -> None:
    """A Redis restart: the writer's held connection is dead; the next batch goes out anyway
    (before the fix it failed, and with it the generation: issue 7's fallback after restart)."""
    with EmbeddedRedis() as server:
        client = Redis.from_url(server.url, decode_responses=True)
        writer = ChunkWriter(client)
        writer.start()
        try:
            await asyncio.wait_for(writer.write("s", "1-0", "before"), 5)
            server.stop()
            server.start()
            await asyncio.wait_for(writer.write("s", "2-0", "after"), 5)
            entries: Any = await client.xrange("s")
            assert [f["d"] for _, f in entries] == ["after"]  # the new server started empty
            # a resend of an entry that did land is taken as written, not as a failure
            await asyncio.wait_for(
                writer._execute([("XADD", "s", "2-0", "d", "x")], resend=True), 5
            )
            assert await client.xlen("s") == 1
        finally:
            await writer.aclose()
            await client.aclose()
