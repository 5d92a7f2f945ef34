"""Measure what a Socket.IO client costs per connection and per event (the numbers behind
``loadtest.sio_client``'s choice), and what a pydantic parse of a chunk costs.

``python -m loadtest.clientbench sio --impl lean|socketio --clients N`` starts a python-socketio
server in a child process (loopback), connects N clients in this process, measures this process's
CPU while the connections sit idle and while the server broadcasts ``ai_message_chunk`` events to
all of them, and prints one JSON line. ``python -m loadtest.clientbench parse`` times the per-chunk
payload check. Only this process's CPU is reported (the server runs in its own process).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
import timeit
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson
import psutil

from contracts import AiMessageChunk
from contracts.redis_server import free_port
from loadtest.sio_client import SioConnection, websocket_url

CHUNK = {
    "requestId": "lt-abc-b1",
    "roomId": "lt-abc-r1",
    "messageId": "m-1",
    "seq": 7,
    "chunk": " token",
}


async def _serve(port: int) -> None:
    import socketio  # only the server side of the bench needs it here
    from aiohttp import web

    sio = socketio.AsyncServer(async_mode="aiohttp")
    app = web.Application()
    sio.attach(app)

    async def broadcast(seconds: float, rate: float) -> None:
        deadline = time.monotonic() + seconds
        seq = 0
        while time.monotonic() < deadline:
            await sio.emit("ai_message_chunk", {**CHUNK, "seq": seq})
            seq += 1
            await asyncio.sleep(1.0 / rate)

    async def bench_start(sid: str, data: dict[str, float]) -> str:
        await broadcast(data["seconds"], data["rate"])
        return "done"

    sio.on("bench_start", bench_start)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.sleep(3600)


class _Counter:
    events = 0

    def on_event(self, name: str, data: Any, now: float) -> None:
        self.events += 1


async def _connect_lean(url: str, count: int, counter: _Counter) -> tuple[list[Any], Any]:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    conns: list[SioConnection] = []
    gate = asyncio.Semaphore(50)

    async def one() -> None:
        async with gate:
            conn = SioConnection(counter.on_event, lambda c, t: None)
            await conn.connect(session, websocket_url(url), {"token": "x"}, 30.0)
            conns.append(conn)

    await asyncio.gather(*(one() for _ in range(count)))
    return conns, session


async def _connect_socketio(url: str, count: int, counter: _Counter) -> tuple[list[Any], Any]:
    import socketio

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    clients: list[Any] = []
    gate = asyncio.Semaphore(50)

    def on_chunk(data: Any) -> None:
        counter.events += 1

    async def one() -> None:
        async with gate:
            client = socketio.AsyncClient(
                reconnection=False, http_session=session, handle_sigint=False
            )
            client.on("ai_message_chunk", on_chunk)
            await client.connect(
                url, auth={"token": "x"}, transports=["websocket"], wait_timeout=30
            )
            clients.append(client)

    await asyncio.gather(*(one() for _ in range(count)))
    return clients, session


async def _measure(impl: str, count: int, idle_s: float, stream_s: float, rate: float) -> None:
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest.clientbench", "serve", "--port", str(port)
    )
    url = f"http://127.0.0.1:{port}"
    proc = psutil.Process()
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        counter = _Counter()
        rss0, started = proc.memory_info().rss, time.perf_counter()
        connect = _connect_lean if impl == "lean" else _connect_socketio
        clients, session = await connect(url, count, counter)
        connect_s = time.perf_counter() - started
        rss_per_conn_kb = (proc.memory_info().rss - rss0) / count / 1024
        cpu0 = time.process_time()
        await asyncio.sleep(idle_s)
        idle_cpu = (time.process_time() - cpu0) / idle_s
        cpu0, events0 = time.process_time(), counter.events
        if impl == "lean":
            done = asyncio.get_running_loop().create_future()
            await clients[0].emit(
                "bench_start",
                {"seconds": stream_s, "rate": rate},
                lambda data, now: done.set_result(data),
            )
            await asyncio.wait_for(done, stream_s + 60)
        else:
            await clients[0].call(
                "bench_start", {"seconds": stream_s, "rate": rate}, timeout=stream_s + 60
            )
        await asyncio.sleep(1.0)
        cpu_s, events = time.process_time() - cpu0, counter.events - events0
        result = {
            "impl": impl,
            "clients": count,
            "connectS": round(connect_s, 2),
            "rssPerConnKiB": round(rss_per_conn_kb, 1),
            "idleCpuPct": round(100 * idle_cpu, 1),
            "events": events,
            "eventsPerS": round(events / (stream_s + 1.0)),
            "cpuS": round(cpu_s, 2),
            "cpuUsPerEvent": round(1e6 * cpu_s / max(events, 1), 1),
            "tasks": len(asyncio.all_tasks()),
        }
        print(orjson.dumps(result).decode(), flush=True)
        for client in clients:
            await (client.close() if impl == "lean" else client.disconnect())
        await session.close()
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), 10)


def _parse_cost() -> None:
    n = 20000
    pydantic_s = timeit.timeit(lambda: AiMessageChunk.model_validate(CHUNK), number=n) / n

    def by_hand() -> None:
        seq, chunk = CHUNK.get("seq"), CHUNK.get("chunk")
        assert type(seq) is int and isinstance(chunk, str)

    hand_s = timeit.timeit(by_hand, number=n) / n
    print(
        orjson.dumps(
            {
                "pydanticUsPerChunk": round(pydantic_s * 1e6, 2),
                "byHandUsPerChunk": round(hand_s * 1e6, 2),
            }
        ).decode()
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.clientbench")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--port", type=int, required=True)
    sio = sub.add_parser("sio")
    sio.add_argument("--impl", choices=["lean", "socketio"], default="lean")
    sio.add_argument("--clients", type=int, default=500)
    sio.add_argument("--idle", type=float, default=5.0)
    sio.add_argument("--seconds", type=float, default=10.0)
    sio.add_argument("--rate", type=float, default=5.0, help="broadcasts per second")
    sio.add_argument("--uvloop", action="store_true", help="run this process on uvloop")
    sub.add_parser("parse")
    args = parser.parse_args(argv)
    if args.command == "serve":
        asyncio.run(_serve(args.port))
    elif args.command == "sio":
        measure = _measure(args.impl, args.clients, args.idle, args.seconds, args.rate)
        if args.uvloop:
            import uvloop

            uvloop.run(measure)
        else:
            asyncio.run(measure)
    else:
        _parse_cost()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
