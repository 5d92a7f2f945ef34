"""Bridge overhead benchmark: ``python -m loadtest.bench_bridge [--levels 100,500,1000]``.

It starts what it needs (embedded Redis, the backend with the scripted model, one bridge
process) and, for each concurrency level N, in the same run against the same backend:

1. *direct*: N workers, each streaming ``POST /chat/messages/stream`` back to back for
   ``--phase-s`` seconds (read with httpx); TTFT = request sent -> first ``chunk`` event;
2. *bridged*: N Socket.IO clients (one user and one room each), each sending ``send_message``
   back to back for ``--phase-s``; TTFT = event sent -> first ``ai_message_chunk``; the bridge
   process's CPU time over the phase / chunks relayed gives CPU per 1,000 chunks;

so N streams are in flight at any moment, their starts spread over one stream's duration (a
steady load, not N requests in the same millisecond). It reports p50/p95 of both and their
difference: the bridge's added TTFT. Then it opens ``--idle`` idle sockets (connected, joined)
and reports the bridge's RSS delta per socket.

``--idle-levels 100,5000`` (issue 8: cost that does not grow with the number of users) instead
runs one bridged phase of ``--idle-active`` streams beside each number of idle sockets
(connected, each joined to a room of its own) and prints the bridge's CPU per 1,000 relayed
chunks at each, its ratio to the first level, and the RSS per idle socket at each level.

The bridged clients are a minimal Engine.IO v4 / Socket.IO v4 websocket client (below), so the
client side stays cheap next to the 1,000 connections it drives. Figures are only meaningful on
a quiet machine: the client, the bridge and the backend share its cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import psutil
import websockets

from contracts.redis_server import EmbeddedRedis, free_port
from loadtest.procs import spawn_service, stop_process, wait_ready
from loadtest.tokens import mint_token

SECRET = "bench-jwt-secret-0123456789abcdef-0123456789"
BACKEND_TOKEN = "bench-backend-token"
START_TIMEOUT_S = 60.0
STREAM_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0


@dataclass
class Phase:
    name: str
    n: int
    ttft_ms: list[float]
    chunks: int
    failures: int
    wall_s: float
    cpu_s: float | None = None

    def pct(self, q: float) -> float:
        if not self.ttft_ms:
            return float("nan")
        ordered = sorted(self.ttft_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---- processes ---------------------------------------------------------------------------


# ---- direct SSE --------------------------------------------------------------------------


async def _direct_one(client: httpx.AsyncClient, content: str) -> tuple[float | None, int]:
    body = {
        "requestId": uuid.uuid4().hex,
        "roomId": f"bench-{uuid.uuid4().hex[:8]}",
        "userId": f"bench-{uuid.uuid4().hex[:8]}",
        "content": content,
    }
    sent = time.perf_counter()
    ttft: float | None = None
    chunks = 0
    async with client.stream("POST", "/chat/messages/stream", json=body) as response:
        if response.status_code != 200:
            return None, 0
        event = ""
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event == "chunk":
                chunks += 1
                if ttft is None:
                    ttft = (time.perf_counter() - sent) * 1000.0
            elif line.startswith("data:") and event in ("end", "error"):
                break
    return ttft, chunks


async def _worker(
    index: int, n: int, spread_s: float, deadline: float, one: Any, phase: Phase
) -> None:
    await asyncio.sleep(spread_s * index / n)
    while time.perf_counter() < deadline:
        try:
            ttft, chunks = await asyncio.wait_for(one(), STREAM_TIMEOUT_S)
        except Exception:
            phase.failures += 1
            continue
        if ttft is None:
            phase.failures += 1
        else:
            phase.ttft_ms.append(ttft)
            phase.chunks += chunks


async def _drive(name: str, n: int, args: argparse.Namespace, make_one: Any) -> Phase:
    phase = Phase(name, n, [], 0, 0, 0.0)
    started = time.perf_counter()
    deadline = started + args.phase_s
    await asyncio.gather(
        *(_worker(i, n, args.spread_s, deadline, make_one(i), phase) for i in range(n))
    )
    phase.wall_s = time.perf_counter() - started
    return phase


async def run_direct(backend_url: str, n: int, args: argparse.Namespace) -> Phase:
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    headers = {"Authorization": f"Bearer {BACKEND_TOKEN}"}
    timeout = httpx.Timeout(STREAM_TIMEOUT_S, connect=30.0, pool=60.0)
    async with httpx.AsyncClient(
        base_url=backend_url, headers=headers, limits=limits, timeout=timeout
    ) as client:
        return await _drive("direct", n, args, lambda i: lambda: _direct_one(client, args.content))


# ---- a minimal Socket.IO v4 client over a websocket ----------------------------------------


class SioSocket:
    """Engine.IO v4 websocket transport + Socket.IO v4 namespace ``/``: just what we need."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self._ack_id = 0

    @classmethod
    async def connect(cls, base_url: str, user: str) -> SioSocket:
        url = base_url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
        ws = await websockets.connect(url, max_size=None, open_timeout=60, ping_interval=None)
        sock = cls(ws)
        opened = await ws.recv()
        assert str(opened).startswith("0"), opened
        await ws.send("40" + json.dumps({"token": mint_token(SECRET, user)}))
        while True:
            frame = str(await sock.recv())
            if frame.startswith("40"):
                return sock
            if frame.startswith("44"):
                raise RuntimeError(f"refused: {frame}")

    async def recv(self) -> str:
        while True:
            frame = str(await self.ws.recv())
            if frame == "2":  # Engine.IO ping
                await self.ws.send("3")
                continue
            return frame

    async def call(self, event: str, payload: dict[str, Any]) -> None:
        self._ack_id += 1
        await self.ws.send(f"42{self._ack_id}" + json.dumps([event, payload]))

    async def close(self) -> None:
        await self.ws.close()


async def _bridged_one(socket: SioSocket, room: str, content: str) -> tuple[float | None, int]:
    sent = time.perf_counter()
    await socket.call("send_message", {"roomId": room, "content": content})
    ttft: float | None = None
    chunks = 0
    while True:
        frame = await socket.recv()
        if frame.startswith('42["ai_message_chunk"'):
            chunks += 1
            if ttft is None:
                ttft = (time.perf_counter() - sent) * 1000.0
        elif frame.startswith('42["message_ack"'):
            return ttft, chunks
        elif frame.startswith("43") and '"ok":false' in frame:
            return ttft, chunks  # rejected


async def _connect_all(bridge_url: str, n: int) -> list[SioSocket]:
    sem = asyncio.Semaphore(100)

    async def one() -> SioSocket:
        async with sem:
            return await SioSocket.connect(bridge_url, f"bench-{uuid.uuid4().hex[:12]}")

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def run_bridged(bridge_url: str, bridge_pid: int, n: int, args: argparse.Namespace) -> Phase:
    sockets = await _connect_all(bridge_url, n)
    rooms = [f"bench-{uuid.uuid4().hex[:10]}" for _ in range(n)]
    proc = psutil.Process(bridge_pid)
    cpu_before = sum(proc.cpu_times()[:2])

    def make_one(i: int) -> Any:
        return lambda: _bridged_one(sockets[i], rooms[i], args.content)

    phase = await _drive("bridged", n, args, make_one)
    phase.cpu_s = sum(proc.cpu_times()[:2]) - cpu_before
    await asyncio.gather(*(s.close() for s in sockets), return_exceptions=True)
    return phase


async def idle_memory(bridge_url: str, bridge_pid: int, n: int) -> float:
    proc = psutil.Process(bridge_pid)
    await asyncio.sleep(1.0)
    before = proc.memory_info().rss
    sockets = await _connect_all(bridge_url, n)
    for s in sockets:
        await s.call("join_room", {"roomId": f"idle-{uuid.uuid4().hex[:10]}"})
    await asyncio.sleep(2.0)
    after = proc.memory_info().rss
    await asyncio.gather(*(s.close() for s in sockets), return_exceptions=True)
    return (after - before) / n


async def _open_idle(bridge_url: str, n: int) -> list[SioSocket]:
    sockets = await _connect_all(bridge_url, n)
    for s in sockets:
        await s.call("join_room", {"roomId": f"idle-{uuid.uuid4().hex[:10]}"})
    return sockets


async def idle_cost(args: argparse.Namespace, bridge_url: str, pid: int) -> None:
    """CPU per relayed chunk beside each number of idle sockets (``--idle-levels``)."""
    warm = argparse.Namespace(**{**vars(args), "phase_s": 1.0})
    await run_bridged(bridge_url, pid, 5, warm)
    proc = psutil.Process(pid)
    print(f"{'idle sockets':>12} {'CPU s/1k chunks':>16} {'vs first':>9} {'KiB/idle socket':>16}")
    rows: list[dict[str, float]] = []
    for n in args.idle_levels:
        await asyncio.sleep(1.0)
        before = proc.memory_info().rss
        idle = await _open_idle(bridge_url, n)
        await asyncio.sleep(2.0)
        per_socket = (proc.memory_info().rss - before) / n
        phase = await run_bridged(bridge_url, pid, args.idle_active, args)
        per_k = (phase.cpu_s or 0.0) / max(phase.chunks, 1) * 1000.0
        first = rows[0]["cpuSecondsPer1kChunks"] if rows else per_k
        rows.append({
            "idle": n, "cpuSecondsPer1kChunks": per_k, "ratio": per_k / first,
            "bytesPerIdleSocket": per_socket, "chunks": phase.chunks,
            "failures": phase.failures, "streamP95Ms": phase.pct(0.95),
        })  # fmt: skip
        print(
            f"{n:>12} {per_k:>16.3f} {per_k / first:>9.3f} {per_socket / 1024:>16.1f}"
            f"   ({phase.chunks} chunks, {phase.failures} failed, TTFT p95 "
            f"{phase.pct(0.95):.0f} ms)",
            flush=True,
        )
        await asyncio.gather(*(s.close() for s in idle), return_exceptions=True)
    print("RESULT " + json.dumps({"idleLevels": rows}))


# ---- main --------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, backend_url: str, bridge_url: str, pid: int) -> None:
    warm = argparse.Namespace(**{**vars(args), "phase_s": 1.0})
    await run_direct(backend_url, 5, warm)  # warm both paths up
    await run_bridged(bridge_url, pid, 5, warm)
    print(
        f"{'N':>6} {'direct p50':>11} {'p95':>8} {'bridged p50':>12} {'p95':>8} "
        f"{'added p50':>10} {'added p95':>10} {'CPU s/1k chunks':>16} {'fail':>5}"
    )
    rows = []
    for n in args.levels:
        direct = await run_direct(backend_url, n, args)
        bridged = await run_bridged(bridge_url, pid, n, args)
        per_k = (bridged.cpu_s or 0.0) / max(bridged.chunks, 1) * 1000.0
        row = {
            "n": n,
            "directP50Ms": direct.pct(0.50), "directP95Ms": direct.pct(0.95),
            "bridgedP50Ms": bridged.pct(0.50), "bridgedP95Ms": bridged.pct(0.95),
            "addedP50Ms": bridged.pct(0.50) - direct.pct(0.50),
            "addedP95Ms": bridged.pct(0.95) - direct.pct(0.95),
            "cpuSecondsPer1kChunks": per_k, "chunksRelayed": bridged.chunks,
            "failures": direct.failures + bridged.failures,
            "streams": len(bridged.ttft_ms),
        }  # fmt: skip
        rows.append(row)
        print(
            f"{n:>6} {row['directP50Ms']:>11.1f} {row['directP95Ms']:>8.1f} "
            f"{row['bridgedP50Ms']:>12.1f} {row['bridgedP95Ms']:>8.1f} "
            f"{row['addedP50Ms']:>10.1f} {row['addedP95Ms']:>10.1f} {per_k:>16.3f} "
            f"{row['failures']:>5}",
            flush=True,
        )
    per_socket = await idle_memory(bridge_url, pid, args.idle)
    print(f"memory per idle connection: {per_socket / 1024:.1f} KiB ({args.idle} sockets)")
    print("RESULT " + json.dumps({"levels": rows, "idleBytesPerSocket": per_socket}))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loadtest.bench_bridge", description=__doc__)
    parser.add_argument("--levels", default="100,500,1000")
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument(
        "--idle-levels", default="", help="e.g. 100,5000: CPU per chunk beside N idle sockets"
    )
    parser.add_argument("--idle-active", type=int, default=100, help="streams in that phase")
    parser.add_argument("--ttft-ms", default="100")
    parser.add_argument("--tokens", default="20")
    parser.add_argument("--tps", default="50")
    parser.add_argument("--phase-s", type=float, default=10.0, help="seconds per phase")
    parser.add_argument(
        "--spread-s", type=float, default=0.6, help="worker starts spread over (~one stream)"
    )
    parser.add_argument("--content", default="benchmark")
    args = parser.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",") if x]
    args.idle_levels = [int(x) for x in args.idle_levels.split(",") if x]
    with EmbeddedRedis() as redis:
        backend_port, bridge_port = free_port(), free_port()
        backend = spawn_service(
            "backend_stream",
            backend_port,
            {
                "REDIS_URL": redis.url, "BACKEND_TOKEN": BACKEND_TOKEN, "PROVIDER": "scripted",
                "SCRIPTED_TTFT_MS": args.ttft_ms, "SCRIPTED_REPLY_TOKENS": args.tokens,
                "SCRIPTED_TOKENS_PER_S": args.tps, "LOG_LEVEL": "WARNING",
            },
        )  # fmt: skip
        backend_url = f"http://127.0.0.1:{backend_port}"
        bridge: subprocess.Popen[bytes] | None = None
        try:
            wait_ready(backend_url, backend, START_TIMEOUT_S)
            bridge = spawn_service(
                "bridge",
                bridge_port,
                {
                    "REDIS_URL": redis.url, "BACKEND_URL": backend_url,
                    "BACKEND_TOKEN": BACKEND_TOKEN, "JWT_SECRET": SECRET,
                    "BRIDGE_RATE_LIMIT": "0", "BRIDGE_LOG_LEVEL": "WARNING",
                },
            )  # fmt: skip
            bridge_url = f"http://127.0.0.1:{bridge_port}"
            wait_ready(bridge_url, bridge, START_TIMEOUT_S)
            if args.idle_levels:
                asyncio.run(idle_cost(args, bridge_url, bridge.pid))
            else:
                asyncio.run(bench(args, backend_url, bridge_url, bridge.pid))
        finally:
            if bridge is not None:
                stop_process(bridge, STOP_TIMEOUT_S)
            stop_process(backend, STOP_TIMEOUT_S)
    return 0


if __name__ == "__main__":
    sys.exit(main())
