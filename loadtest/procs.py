"""Service processes the benchmark scripts start on loopback ports, and their clean stop."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping

import httpx

from contracts.redis_server import stop_process

__all__ = ["spawn_service", "stop_process", "wait_ready"]

POLL_S = 0.1


def spawn_service(module: str, port: int, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """``python -m <module> --host 127.0.0.1 --port <port>`` (``env`` over ours), muted."""
    argv = [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(
        argv, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def wait_ready(
    url: str, proc: subprocess.Popen[bytes], timeout_s: float, *, path: str = "/healthz"
) -> None:
    """Until ``GET url+path`` answers 200; raise if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}{path}", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(POLL_S)
    raise TimeoutError(f"{url}{path} not ready within {timeout_s:g}s")
