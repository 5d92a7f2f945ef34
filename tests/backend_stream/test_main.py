"""``python -m backend_stream`` without REDIS_URL runs on its own embedded Redis."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import psutil

from tests.support.procs import ServerProcess

CANARY = "canary-content-5f1c9e"


def test_launcher_starts_embedded_redis_and_stops_it_on_exit() -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    proc = ServerProcess.python_module("backend_stream", env={"SCRIPTED_TTFT_MS": "0"})
    proc.env = {
        **env, "SCRIPTED_TTFT_MS": "0", "LOG_LEVEL": "INFO", "BACKEND_INSECURE_DEV_TOKEN": "1",
    }  # fmt: skip
    proc.env.pop("BACKEND_TOKEN", None)
    proc.start()
    try:
        assert proc.proc is not None
        children = psutil.Process(proc.proc.pid).children(recursive=True)
        redis_children = [c for c in children if "redis-server" in c.name()]
        assert len(redis_children) == 1
        assert httpx.get(f"{proc.url}/readyz", timeout=5).status_code == 200
        reply = httpx.post(
            f"{proc.url}/chat/messages",
            headers={"Authorization": "Bearer dev-backend-token"},
            json={"requestId": "r1", "roomId": "room1", "userId": "u1", "content": CANARY},
            timeout=30,
        )
        assert reply.status_code == 200
    finally:
        proc.stop()
    assert not redis_children[0].is_running() or redis_children[0].status() == "zombie"
    assert "backend_token_default" in proc.output()
    assert CANARY not in proc.output()  # message content never logged


def test_launcher_refuses_to_start_without_a_service_token() -> None:
    """Issue 7: without BACKEND_TOKEN the backend accepted the well-known dev token."""
    env = {k: v for k, v in os.environ.items() if k not in ("BACKEND_TOKEN", "REDIS_URL")}
    done = subprocess.run(
        [sys.executable, "-m", "backend_stream", "--port", "1"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "BACKEND_TOKEN" in done.stderr and "BACKEND_INSECURE_DEV_TOKEN" in done.stderr


def test_the_backend_keeps_idle_connections_longer_than_the_bridge_reuses_them() -> None:
    """The server side of a keep-alive connection must outlive the client side, or the bridge
    may send a request on a connection the backend is closing (it fails and falls back)."""
    from backend_stream import __main__ as backend_main
    from bridge import upstream

    assert backend_main.KEEP_ALIVE_S > upstream.KEEPALIVE_EXPIRY_S
