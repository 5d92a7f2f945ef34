"""``python -m bridge client``: a small terminal client to try the bridge.

Connects with a JWT (``--token``) or, against a bridge in insecure dev mode, a bare ``--user``;
joins ``--room``; every line typed on stdin is sent as a message; streamed chunks print as they
arrive. ``/cancel`` cancels the last message; ``/quit`` (or EOF) leaves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from typing import Any

import socketio

CONNECT_TIMEOUT_S = 10.0
ACK_TIMEOUT_S = 30.0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bridge client")
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--token")
    parser.add_argument("--user")
    parser.add_argument("--room", default="demo")
    parser.add_argument("--message", help="send one message, print the reply, exit")
    args = parser.parse_args(argv)
    if not args.token and not args.user:
        parser.error("give --token (or --user against a bridge in insecure dev mode)")
    auth = {"token": args.token} if args.token else {"userId": args.user}
    return asyncio.run(_session(args.url, auth, args.room, args.message))


async def _session(url: str, auth: dict[str, str], room: str, once: str | None) -> int:
    client = socketio.AsyncClient(reconnection=False)
    done = asyncio.Event()

    def on_chunk(data: dict[str, Any]) -> None:
        print(data.get("chunk", ""), end="", flush=True)

    def on_end(data: dict[str, Any]) -> None:
        print(f"\n[end: {data.get('finishReason')}, {json.dumps(data.get('latency'))}]")

    def on_error(data: dict[str, Any]) -> None:
        print(f"\n[error: {data.get('code')} {data.get('message')}]")

    def on_new(data: dict[str, Any]) -> None:
        message = data.get("message", {})
        print(f"[{message.get('role')}] {message.get('content')}")

    def on_done(data: dict[str, Any]) -> None:
        print(f"[done: ok={data.get('ok')} path={data.get('path')}]")
        done.set()

    for event, handler in (
        ("ai_message_chunk", on_chunk),
        ("ai_message_end", on_end),
        ("ai_message_error", on_error),
        ("new_message", on_new),
        ("message_ack", on_done),
    ):
        client.on(event, handler)
    try:
        await client.connect(url, auth=auth, wait_timeout=CONNECT_TIMEOUT_S)
    except socketio.exceptions.ConnectionError as exc:
        print(f"connect failed: {exc}", file=sys.stderr)
        return 1
    try:
        print(await client.call("join_room", {"roomId": room}, timeout=ACK_TIMEOUT_S))
        if once is not None:
            await _send(client, room, once)
            await asyncio.wait_for(done.wait(), ACK_TIMEOUT_S * 4)
            return 0
        await _repl(client, room)
    finally:
        await client.disconnect()
    return 0


async def _send(client: socketio.AsyncClient, room: str, content: str) -> str:
    request_id = uuid.uuid4().hex
    payload = {"roomId": room, "content": content, "requestId": request_id}
    print(await client.call("send_message", payload, timeout=ACK_TIMEOUT_S))
    return request_id


async def _repl(client: socketio.AsyncClient, room: str) -> None:
    last: str | None = None
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line or line.strip() == "/quit":
            return
        if line.strip() == "/cancel" and last is not None:
            print(await client.call("cancel_message", {"requestId": last}, timeout=ACK_TIMEOUT_S))
        elif line.strip():
            last = await _send(client, room, line.rstrip("\n"))
