"""Run a real server as a child process on a loopback port and wait until it answers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from contracts.redis_server import free_port

__all__ = ["ServerProcess", "free_port"]


class ServerProcess:
    """``python -m <module> --host 127.0.0.1 --port N`` (or any argv) with its output in a file."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        ready_url: str | None = None,
        name: str = "server",
    ) -> None:
        self.argv = list(argv)
        self.env = {**os.environ, **(env or {})}
        self.ready_url = ready_url
        self.name = name
        self.log_path = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def python_module(
        cls,
        module: str,
        *args: str,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        ready_path: str = "/healthz",
    ) -> ServerProcess:
        port = port or free_port()
        argv = [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port), *args]
        server = cls(argv, env=env, ready_url=f"http://127.0.0.1:{port}{ready_path}", name=module)
        server.port = port
        return server

    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> ServerProcess:
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if self.ready_url:
            self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.output()[-3000:]}")
            try:
                assert self.ready_url is not None
                if httpx.get(self.ready_url, timeout=1.0).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not ready in {timeout_s}s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)

    def kill(self) -> None:
        """Die at once, like a crashed pod."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
