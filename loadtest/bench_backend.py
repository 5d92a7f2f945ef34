"""Backend overhead benchmark (issue 2): TTFT seen by an SSE client minus the scripted TTFT.

Starts its own embedded Redis and one backend process, then for each concurrency level keeps
that many SSE streams open: N closed-loop workers whose starts are spread over one stream's
length (steady arrivals, not one burst), each opening its next stream when the last one ends,
for ``--duration-s``. Only streams opened after that ramp count. ``--burst`` instead opens all
N at the same instant (a thundering herd: the overhead then includes queueing behind the other
N-1 starts, ~1-2 ms of CPU each on a small machine).

Columns: p50/p95/max overhead; Redis commands per chunk (``xadd/chk``, ``cmds/chk``: INFO
commandstats deltas, all commands including the per-generation claim script and terminal
script); ``rtt/chk``: pipelines that carried chunks per chunk (from the backend's /metrics; chunks
of concurrent generations share a pipeline, so it drops below 1 under load; each generation
adds two fixed round trips: the claim script and the terminal script); server CPU %;
``cpu ms/req`` and ``cpu us/chk``: the backend process's CPU time (psutil, user + system) over the
level divided by the generations it ran and by the chunks it flushed (the same CPU, split two
ways: run two ``--tokens`` values to separate the per-request and per-chunk parts).

Client: ``--client raw`` (default) is a minimal asyncio HTTP/1.1 reader that only looks for
``event: chunk`` in the bytes; ``--client httpx`` uses httpx + httpx-sse. Do not trust httpx
figures past ~50 streams on a 2-core machine: its pure-Python parsing (h11, one HTTP chunk per
SSE event) saturates the client's core and the "overhead" becomes the client's own queueing.

    .venv/bin/python -m loadtest.bench_backend --streams 1,100,500
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

import httpx
import httpx_sse
import orjson
import psutil
import redis

from contracts.redis_server import EmbeddedRedis, free_port
from loadtest.procs import spawn_service, stop_process, wait_ready

TOKEN = "bench-token"
DEFAULT_STREAMS = "1,100,500"
DEFAULT_TTFT_MS = 200.0
DEFAULT_TOKENS = 20
DEFAULT_TOKENS_PER_S = 50.0
DEFAULT_DURATION_S = 10.0
CHUNK_MARK = b"\nevent: chunk\n"
READY_TIMEOUT_S = 30.0
STREAM_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0


@dataclass
class Level:
    streams: int
    overheads_ms: list[float] = field(default_factory=list)
    chunks: int = 0
    errors: int = 0
    commands: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    server_cpu_s: float = 0.0
    chunk_batches: float = 0.0
    server_chunks: float = 0.0  # every chunk of the level, the ramp's too
    server_generations: float = 0.0  # every generation of the level, the ramp's too


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))]


def start_backend(redis_url: str, port: int, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    env = {
        "REDIS_URL": redis_url,
        "BACKEND_TOKEN": TOKEN,
        "PROVIDER": "scripted",
        "SCRIPTED_TTFT_MS": str(args.ttft_ms),
        "SCRIPTED_TOKENS_PER_S": str(args.tps),
        "SCRIPTED_REPLY_TOKENS": str(args.tokens),
        "LOG_LEVEL": "WARNING",
    }
    proc = spawn_service("backend_stream", port, env)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, READY_TIMEOUT_S, path="/readyz")
    except BaseException:
        proc.kill()
        raise
    return proc


def server_counters(base_url: str) -> dict[str, float]:
    """Chunks, chunk batches and generations (all finish reasons) from /metrics."""
    found: dict[str, float] = {}
    for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        name, _, value = line.rpartition(" ")
        name = name.split("{", 1)[0]
        if name in {"backend_chunks_total", "backend_chunk_batches_total"}:
            found[name] = float(value)
        elif name == "backend_generations_total":
            found[name] = found.get(name, 0.0) + float(value)
    return found


def command_counts(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def one_stream(client: httpx.AsyncClient, ttft_ms: float, level: Level) -> None:
    payload = _payload()
    began = time.perf_counter()
    first = True
    try:
        async with httpx_sse.aconnect_sse(
            client, "POST", "/chat/messages/stream", json=payload
        ) as source:
            async for event in source.aiter_sse():
                if event.event == "chunk":
                    if first:
                        level.overheads_ms.append((time.perf_counter() - began) * 1000 - ttft_ms)
                        first = False
                    level.chunks += 1
                elif event.event == "error":
                    level.errors += 1
    except httpx.HTTPError:
        level.errors += 1


async def one_raw_stream(base_url: str, ttft_ms: float, level: Level) -> None:
    """Connection: close per stream, so the end of the response is the end of the socket."""
    url = httpx.URL(base_url)
    host, port = url.host, url.port or 80
    body = orjson.dumps(_payload())
    head = (
        f"POST /chat/messages/stream HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    began = time.perf_counter()
    writer = None
    try:
        async with asyncio.timeout(STREAM_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(head + body)
            buf = bytearray()
            seen_first = False
            while data := await reader.read(65536):
                buf += data
                if not seen_first and CHUNK_MARK in buf:
                    level.overheads_ms.append((time.perf_counter() - began) * 1000 - ttft_ms)
                    seen_first = True
        if not buf.startswith(b"HTTP/1.1 200") or b"event: end\n" not in buf:
            level.errors += 1
        level.chunks += buf.count(CHUNK_MARK)
    except (OSError, TimeoutError):
        level.errors += 1
    finally:
        if writer is not None:
            writer.close()


def _payload() -> dict[str, str]:
    return {
        "requestId": f"bench-{uuid.uuid4().hex}",
        "roomId": f"room-{uuid.uuid4().hex[:8]}",
        "userId": f"user-{uuid.uuid4().hex[:8]}",
        "content": "benchmark message",
    }


async def open_one(client: httpx.AsyncClient, level: Level, args: argparse.Namespace) -> None:
    if args.client == "raw":
        await one_raw_stream(str(client.base_url), args.ttft_ms, level)
    else:
        await one_stream(client, args.ttft_ms, level)


async def worker(
    client: httpx.AsyncClient, index: int, level: Level, args: argparse.Namespace
) -> None:
    cycle_s = args.ttft_ms / 1000 + (args.tokens / args.tps if args.tps > 0 else 0.0)
    began = time.perf_counter()
    await asyncio.sleep(cycle_s * index / level.streams)
    measured_from = began + cycle_s  # all N streams are open from here on
    scratch = Level(level.streams)
    while time.perf_counter() - began < args.duration_s:
        counting = time.perf_counter() >= measured_from
        await open_one(client, level if counting else scratch, args)


async def run_level(base_url: str, streams: int, args: argparse.Namespace) -> Level:
    level = Level(streams)
    limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=streams + 10)
    async with httpx.AsyncClient(
        base_url=base_url,
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=STREAM_TIMEOUT_S,
        limits=limits,
    ) as client:
        began = time.perf_counter()
        if args.burst:
            await asyncio.gather(*(open_one(client, level, args) for _ in range(streams)))
        else:
            await asyncio.gather(*(worker(client, i, level, args) for i in range(streams)))
        level.wall_s = time.perf_counter() - began
    return level


def report(level: Level, before: dict[str, int], after: dict[str, int]) -> str:
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    delta = {k: v for k, v in delta.items() if v > 0 and k not in {"info", "config|resetstat"}}
    chunks = max(level.server_chunks, 1)
    xadd = delta.get("xadd", 0)
    total = sum(delta.values())
    return (
        f"{level.streams:>7} {len(level.overheads_ms):>5} {level.errors:>6} "
        f"{percentile(level.overheads_ms, 50):>9.2f} {percentile(level.overheads_ms, 95):>9.2f} "
        f"{max(level.overheads_ms, default=float('nan')):>9.2f} {level.chunks:>7} "
        f"{xadd / chunks:>10.2f} {total / chunks:>10.2f} {level.chunk_batches / chunks:>9.2f} "
        f"{level.wall_s:>7.2f} "
        f"{100 * level.server_cpu_s / max(level.wall_s, 1e-9):>5.0f} "
        f"{1000 * level.server_cpu_s / max(level.server_generations, 1):>10.2f} "
        f"{1e6 * level.server_cpu_s / chunks:>9.0f}"
    )


async def bench(args: argparse.Namespace) -> None:
    with EmbeddedRedis() as redis_server:
        port = free_port()
        proc = start_backend(redis_server.url, port, args)
        stats = redis.Redis(host=redis_server.host, port=redis_server.port, decode_responses=True)
        server = psutil.Process(proc.pid)
        try:
            base_url = f"http://127.0.0.1:{port}"
            warm = argparse.Namespace(**{**vars(args), "burst": True})
            await run_level(base_url, 1, warm)  # warm-up: imports, connections, scripts
            mode = "burst" if args.burst else f"steady, {args.duration_s:g} s per level"
            mode += f", {args.client} client"
            print(
                f"{mode}; scripted TTFT {args.ttft_ms:g} ms, {args.tokens} tokens at "
                f"{args.tps:g}/s; overhead = client TTFT - scripted TTFT"
            )
            print(
                f"{'streams':>7} {'ok':>5} {'errors':>6} {'p50 ms':>9} {'p95 ms':>9} {'max ms':>9} "
                f"{'chunks':>7} {'xadd/chk':>10} {'cmds/chk':>10} {'rtt/chk':>9} {'wall s':>7} "
                f"{'cpu%':>5} {'cpu ms/req':>10} {'cpu us/chk':>9}",
                flush=True,
            )
            for streams in args.streams:
                before = command_counts(stats)
                cpu_before = sum(server.cpu_times()[:2])
                counters_before = server_counters(base_url)
                level = await run_level(base_url, streams, args)
                level.server_cpu_s = sum(server.cpu_times()[:2]) - cpu_before
                counters = server_counters(base_url)
                for name, attr in (
                    ("chunk_batches", "chunk_batches"),
                    ("chunks", "server_chunks"),
                    ("generations", "server_generations"),
                ):
                    metric = f"backend_{name}_total"
                    delta = counters.get(metric, 0) - counters_before.get(metric, 0)
                    setattr(level, attr, delta)
                print(report(level, before, command_counts(stats)), flush=True)
        finally:
            stats.close()
            stop_process(proc, STOP_TIMEOUT_S)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default=DEFAULT_STREAMS, help="comma-separated levels")
    parser.add_argument("--ttft-ms", type=float, default=DEFAULT_TTFT_MS)
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    parser.add_argument("--tps", type=float, default=DEFAULT_TOKENS_PER_S)
    parser.add_argument("--duration-s", type=float, default=DEFAULT_DURATION_S)
    parser.add_argument("--client", choices=["raw", "httpx"], default="raw")
    parser.add_argument("--burst", action="store_true", help="open all N streams at once")
    args = parser.parse_args(argv)
    args.streams = [int(x) for x in str(args.streams).split(",") if x.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    asyncio.run(bench(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
