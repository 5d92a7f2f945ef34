"""Writes flushed chunks to their Redis Streams in batches: one pipeline per batch, one writer.

Every generation of the process hands its chunks here instead of awaiting its own XADD: while
one batch is on the wire the next one gathers, so under load many chunks share one round trip
and the per-command cost of the client is paid once per batch (issue 2's benchmark: the client
library, not Redis, was the hot path). With one stream idle a chunk still goes out at once.

Order per stream is kept (one FIFO, one writer). A generation awaits ``flushed`` for its last
chunk before it writes its terminal entry on another connection, so the terminal entry is
never ahead of a chunk.

The writer keeps one connection of the pool for itself and sends each batch as packed commands
on it (``send_packed_command`` / ``read_response``, redis-py's connection API) instead of a
``Pipeline``: a pipeline per batch also takes a pool connection, runs redis-py's retry,
observability and per-command bookkeeping, which cost ~40 % of the writer's CPU (py-spy, 100
streams; README "Benchmark"). Error handling is the pipeline's: every reply is read before the
first error is raised, so the connection stays in step; a socket error or timeout disconnects
it, and the next batch reconnects. A connection Redis closed (a restart, a failover: the
held connection is the one that notices last) is reconnected and the batch sent once more at
once, so the generation goes on (issue 7); an entry of it that did land is then refused as
not newer than the stream's top, which the resend takes as written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from contracts.aio import cancel_and_wait

log = structlog.get_logger("backend_stream.chunk_writer")

STOP_TIMEOUT_S = 2.0
# Redis's refusal of an explicit XADD id that is not above the stream's top entry.
ALREADY_WRITTEN = "equal or smaller than the target stream top item"


@dataclass(frozen=True, slots=True)
class _Write:
    stream: str
    entry_id: str
    chunk: str
    expire_s: int | None  # set on a stream's first entry


class ChunkWriter:
    """One background task sending what was queued since its last batch, as one pipeline."""

    def __init__(self, redis: Redis, on_batch: Callable[[], None] | None = None) -> None:
        self._redis = redis
        self._on_batch = on_batch
        self._pending: list[_Write] = []
        self._done: asyncio.Future[None] | None = None  # completes with the pending batch
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conn: AbstractConnection | None = None
        self.batches = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def aclose(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task], STOP_TIMEOUT_S)
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await self._redis.connection_pool.release(conn)

    def write(
        self, stream: str, entry_id: str, chunk: str, expire_s: int | None = None
    ) -> asyncio.Future[None]:
        """Queue one XADD; the future completes when its batch is in Redis (or failed)."""
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
        self._pending.append(_Write(stream, entry_id, chunk, expire_s))
        self._wakeup.set()
        return self._done

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch, self._pending = self._pending, []
            done, self._done = self._done, None
            if batch and done is not None:
                await self._send(batch, done)

    async def _send(self, batch: list[_Write], done: asyncio.Future[None]) -> None:
        commands: list[tuple[str | int, ...]] = []
        for w in batch:
            commands.append(("XADD", w.stream, w.entry_id, "t", "c", "d", w.chunk))
            if w.expire_s is not None:
                commands.append(("EXPIRE", w.stream, w.expire_s))
        try:
            try:
                await self._execute(commands)
            except (RedisConnectionError, ConnectionError):
                await self._execute(commands, resend=True)
        except (RedisError, OSError) as exc:
            log.warning("chunk_write_failed", error=type(exc).__name__, chunks=len(batch))
            done.set_exception(exc)
            done.exception()  # retrieved here: only the generations that wait on it care
            return
        self.batches += 1
        if self._on_batch is not None:
            self._on_batch()
        done.set_result(None)

    async def _execute(self, commands: list[tuple[str | int, ...]], resend: bool = False) -> None:
        if self._conn is None:
            pool = self._redis.connection_pool
            self._conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        conn = self._conn
        await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        first_error: ResponseError | None = None
        for _ in commands:
            try:
                await conn.read_response()
            except ResponseError as exc:  # read the other replies: the connection stays in step
                if not (resend and ALREADY_WRITTEN in str(exc)):
                    first_error = first_error or exc
        if first_error is not None:
            raise first_error
