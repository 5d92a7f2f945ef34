"""``python -m bridge stack``: everything on embedded defaults, READY line, clean stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest

from contracts.redis_server import free_port
from tests.bridge.harness import Client, new_id

READY_TIMEOUT_S = 60.0


@pytest.fixture
def stack() -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    port = free_port()
    env = {**os.environ, "SCRIPTED_TTFT_MS": "20", "SCRIPTED_TOKENS_PER_S": "400"}
    env.pop("REDIS_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "stack", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        info = _read_ready(proc)
        yield proc, info
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _read_ready(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"stack exited before READY ({proc.poll()})")
        if line.startswith("READY "):
            info: dict[str, Any] = json.loads(line[len("READY ") :])
            return info
    raise AssertionError("no READY line")


async def test_stack_serves_a_stream_and_stops_everything_on_sigterm(
    stack: tuple[subprocess.Popen[str], dict[str, Any]],
) -> None:
    proc, info = stack
    assert set(info) >= {
        "bridgeUrl",
        "backendUrl",
        "redisUrl",
        "jwtSecret",
        "backendToken",
        "token",
        "pageUrl",
    }
    assert info["pageUrl"] == f"{info['bridgeUrl']}/?token={info['token']}"
    assert len(info["backendToken"]) >= 24 and info["backendToken"] != "dev-backend-token"
    async with httpx.AsyncClient() as http:
        history = f"{info['backendUrl']}/chat/rooms/demo/messages"
        dev = await http.get(history, headers={"Authorization": "Bearer dev-backend-token"})
        assert dev.status_code == 401  # issue 7: a random service token per stack
        ours = await http.get(history, headers={"Authorization": f"Bearer {info['backendToken']}"})
        assert ours.status_code == 200
        assert (await http.get(f"{info['bridgeUrl']}/healthz")).status_code == 200
        assert (await http.get(f"{info['bridgeUrl']}/readyz")).json()["ready"] is True
        assert "bridge_connected_sockets" in (await http.get(f"{info['bridgeUrl']}/metrics")).text
        page = await http.get(info["pageUrl"])
        assert page.status_code == 200 and "socket.io.min.js" in page.text
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "backend and redis run as children"
    client = Client()
    await client.connect(info["bridgeUrl"], auth={"token": info["token"]})
    try:
        ack = await client.call("send_message", {"roomId": new_id("room"), "content": "hi"})
        assert ack["ok"] is True
        await client.wait_for("message_ack")
    finally:
        await client.close()
    assert client.named("message_ack")[0]["ok"] is True
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, alive


def test_stack_in_its_own_group_stops_its_children_even_on_a_repeated_sigterm() -> None:
    """Regression (issue 3): ``python -m bridge stack`` left its backend child and embedded Redis
    running after SIGTERM when a second SIGTERM (a supervisor repeating it) arrived while the
    stack was stopping its children: ``SystemExit`` cut the cleanup short. The stack runs in
    its own process group, as a supervisor starts it, and only the stack itself is signalled."""
    port = free_port()
    env = {**os.environ, "SCRIPTED_TTFT_MS": "20", "LOG_LEVEL": "INFO"}
    env.pop("REDIS_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "stack", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    children: list[psutil.Process] = []
    try:
        _read_ready(proc)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 2, children  # backend and Redis
        proc.send_signal(signal.SIGTERM)
        assert proc.stderr is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        for line in proc.stderr:  # the backend says so once the stack has asked it to stop
            if "Shutting down" in line or time.monotonic() > deadline:
                break
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, alive
    finally:
        for child in children:
            if child.is_running():
                child.kill()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="dev.sh installs prometheus")
def test_stack_with_prometheus_scrapes_both_services_and_loads_the_alarms() -> None:
    """``bash dev.sh up --prometheus``: the same Prometheus as the observability tests."""
    port = free_port()
    env = {**os.environ, "SCRIPTED_TTFT_MS": "20"}
    env.pop("REDIS_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "stack", "--port", str(port), "--prometheus"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    children: list[psutil.Process] = []
    try:
        info = _read_ready(proc)
        children = psutil.Process(proc.pid).children(recursive=True)
        url = info["prometheusUrl"]
        jobs: dict[str, str] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sorted(jobs.values()) != ["up", "up"]:
            reply = httpx.get(f"{url}/api/v1/targets", timeout=5).json()
            jobs = {t["labels"]["job"]: t["health"] for t in reply["data"]["activeTargets"]}
            time.sleep(0.5)
        assert jobs == {"chat-bridge": "up", "chat-backend": "up"}
        groups = httpx.get(f"{url}/api/v1/rules", timeout=5).json()["data"]["groups"]
        assert {g["name"] for g in groups} >= {"chat-bridge.gates", "chat-bridge.rollback"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, alive  # prometheus, backend and Redis stopped with the stack
    finally:
        for child in children:
            if child.is_running():
                child.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
