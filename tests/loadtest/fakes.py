"""In-process stand-ins that speak the wire like the bridge and the backend, with knobs for faults.

They exist to test the load tester itself (its client, classification and arithmetic) without
depending on the real services; the real-stack tests live in ``test_real_stack.py``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import jwt
import orjson
import socketio
from aiohttp import web

from contracts.redis_server import free_port

SECRET = "loadtest-test-secret-0123456789abcdef"


@dataclass
class Script:
    """What the fake does with every ``send_message``; ``fault`` picks one misbehaviour."""

    ttft_s: float = 0.05
    gap_s: float = 0.01
    chunks: tuple[str, ...] = ("Hel", "lo ", "wor", "ld")
    fault: str | None = None  # dup | gap | reorder | mismatch | error | reject | stall | cut
    path: str = "stream"  # stream | complete
    no_ack: bool = False
    no_done: bool = False
    every: int = 1  # apply the fault to every n-th request only
    counter: itertools.count[int] = field(default_factory=itertools.count)


class FakeBridge:
    """python-socketio server with the bridge's events, on a loopback port."""

    def __init__(self, script: Script, *, ping_interval_s: float = 25.0) -> None:
        self.script = script
        self.sio = socketio.AsyncServer(
            async_mode="aiohttp", ping_interval=ping_interval_s, ping_timeout=ping_interval_s
        )
        self.app = web.Application()
        self.sio.attach(self.app)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tasks: set[asyncio.Task[None]] = set()
        self.connects = 0
        self.release = asyncio.Event()
        self.sio.on("connect", self._connect)
        self.sio.on("send_message", self._send_message)

    async def _connect(self, sid: str, environ: dict[str, Any], auth: Any) -> None:
        token = auth.get("token") if isinstance(auth, dict) else None
        try:
            claims = jwt.decode(str(token), SECRET, algorithms=["HS256"])
        except jwt.PyJWTError:
            raise socketio.exceptions.ConnectionRefusedError(
                "unauthorized", {"code": "UNAUTHORIZED", "message": "bad token"}
            ) from None
        self.connects += 1
        await self.sio.save_session(sid, {"user": claims["sub"]})

    async def _send_message(self, sid: str, data: dict[str, Any]) -> Any:
        script = self.script
        number = next(script.counter)
        fault = script.fault if number % script.every == 0 else None
        rid, room = data["requestId"], data["roomId"]
        if fault == "reject":
            return {
                "ok": False,
                "stage": "rejected",
                "requestId": rid,
                "code": "RATE_LIMITED",
                "message": "slow down",
            }
        if script.no_ack:  # python-socketio acks every handler's return: hold it until released
            try:
                await asyncio.wait_for(self.release.wait(), 30.0)
            except TimeoutError:
                pass
            return None
        await self.sio.enter_room(sid, room)
        task = asyncio.create_task(self._stream(sid, rid, room, fault))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        path = "complete" if script.path == "complete" else "stream"
        msg_id = None if path == "complete" else f"m-{rid}"
        return {
            "ok": True,
            "stage": "accepted",
            "requestId": rid,
            "roomId": room,
            "messageId": msg_id,
            "path": path,
        }

    async def _stream(self, sid: str, rid: str, room: str, fault: str | None) -> None:
        script, mid = self.script, f"m-{rid}"
        base = {"requestId": rid, "roomId": room, "messageId": mid}
        await asyncio.sleep(script.ttft_s)
        if script.path == "complete":
            message = {
                "id": mid,
                "requestId": rid,
                "role": "assistant",
                "content": "".join(script.chunks),
                "createdAt": "2024-01-01T00:00:00Z",
            }
            await self.sio.emit("new_message", {"roomId": room, "message": message}, to=sid)
            await self._done(sid, base, ok=True, path="complete")
            return
        await self.sio.emit("ai_message_start", base, to=sid)
        seqs = list(range(len(script.chunks)))
        if fault == "dup":
            seqs.insert(2, 1)
        elif fault == "gap":
            seqs.remove(2)
        elif fault == "reorder":
            seqs[1], seqs[2] = seqs[2], seqs[1]
        for i, seq in enumerate(seqs):
            if i:
                await asyncio.sleep(script.gap_s)
            if fault == "stall" and i == 2:
                await asyncio.sleep(3600)
            if fault == "cut" and i == 2:
                await self.sio.disconnect(sid)
                return
            await self.sio.emit(
                "ai_message_chunk", {**base, "seq": seq, "chunk": script.chunks[seq]}, to=sid
            )
        if fault == "error":
            await self.sio.emit(
                "ai_message_error",
                {**base, "code": "MODEL_ERROR", "message": "boom", "retryable": True},
                to=sid,
            )
            await self._done(sid, base, ok=False, path="stream", code="MODEL_ERROR")
            return
        content = "".join(script.chunks) + ("!" if fault == "mismatch" else "")
        await self.sio.emit(
            "ai_message_end", {**base, "content": content, "finishReason": "stop"}, to=sid
        )
        if not script.no_done:
            await self._done(sid, base, ok=True, path="stream")

    async def _done(
        self, sid: str, base: dict[str, Any], *, ok: bool, path: str, code: str | None = None
    ) -> None:
        ack = {**base, "stage": "done", "ok": ok, "path": path}
        if code:
            ack["code"] = code
        await self.sio.emit("message_ack", ack, to=sid)


class FakeBackend:
    """The backend's ``POST /chat/messages/stream`` as SSE, with the same script."""

    def __init__(self, script: Script, *, token: str = "dev-backend-token") -> None:
        self.script = script
        self.token = token
        self.app = web.Application()
        self.app.router.add_post("/chat/messages/stream", self._stream)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"code": "UNAUTHORIZED", "message": "no"}, status=401)
        body = await request.json()
        script = self.script
        fault = script.fault if next(script.counter) % script.every == 0 else None
        if fault == "reject":
            return web.json_response({"code": "RATE_LIMITED", "message": "slow"}, status=429)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(script.ttft_s)

        async def send(event: str, data: dict[str, Any]) -> None:
            await resp.write(f"event: {event}\ndata: {orjson.dumps(data).decode()}\n\n".encode())

        await send("start", {"requestId": body["requestId"], "messageId": "m1"})
        for seq, chunk in enumerate(script.chunks):
            if seq:
                await asyncio.sleep(script.gap_s)
            if fault == "cut" and seq == 2:
                assert request.transport is not None
                request.transport.close()
                return resp
            await send("chunk", {"seq": seq, "chunk": chunk})
        if fault == "error":
            await send("error", {"code": "MODEL_ERROR", "message": "boom", "retryable": True})
        else:
            await send("end", {"content": "".join(script.chunks), "finishReason": "stop"})
        return resp


@asynccontextmanager
async def serving(app: web.Application, port: int) -> AsyncIterator[None]:
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield
    finally:
        await runner.cleanup()
