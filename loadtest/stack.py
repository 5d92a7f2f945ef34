"""Spawn the embedded stack (``python -m bridge stack``) so one command gives a full benchmark.

The stack prints ``READY {"bridgeUrl", "backendUrl", "redisUrl", "jwtSecret"}`` once it is up; the
scripted model's knobs reach it as environment (SCRIPTED_TTFT_MS, SCRIPTED_TOKENS_PER_S, ...).
Its output goes to a file, not a pipe, so a chatty stack can never block on a full pipe while the
load test is busy.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import orjson

__all__ = ["DEFAULT_STACK_START_TIMEOUT_S", "EmbeddedStack", "StackInfo", "StackStartError"]

DEFAULT_STACK_START_TIMEOUT_S = 60.0
READY_PREFIX = "READY "


class StackStartError(RuntimeError):
    """The stack exited or did not print READY in time; the message has its output's tail."""


@dataclass(frozen=True, kw_only=True)
class StackInfo:
    bridge_url: str
    backend_url: str
    redis_url: str
    jwt_secret: str


class EmbeddedStack:
    """``async with EmbeddedStack(env=...) as info:`` starts the stack and always tears it down."""

    def __init__(
        self,
        *,
        env: Mapping[str, str],
        port: int | None = None,
        start_timeout_s: float = DEFAULT_STACK_START_TIMEOUT_S,
        python: str = sys.executable,
    ) -> None:
        self.argv = [python, "-m", "bridge", "stack"]
        if port is not None:
            self.argv += ["--port", str(port)]
        self.env = {**os.environ, **env}
        self.start_timeout_s = start_timeout_s
        fd, name = tempfile.mkstemp(prefix="loadtest-stack-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)
        self.proc: asyncio.subprocess.Process | None = None

    def output_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    async def start(self) -> StackInfo:
        with self.log_path.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            info = self._ready_line()
            if info is not None:
                return info
            if self.proc.returncode is not None:
                raise StackStartError(
                    f"stack exited with {self.proc.returncode}:\n{self.output_tail()}"
                )
            await asyncio.sleep(0.1)
        raise StackStartError(f"no READY line in {self.start_timeout_s:g}s:\n{self.output_tail()}")

    def _ready_line(self) -> StackInfo | None:
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith(READY_PREFIX):
                data = orjson.loads(line[len(READY_PREFIX) :])
                return StackInfo(
                    bridge_url=data["bridgeUrl"],
                    backend_url=data["backendUrl"],
                    redis_url=data.get("redisUrl", ""),
                    jwt_secret=data["jwtSecret"],
                )
        return None

    async def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the stack's process group (its children too), SIGKILL after ``timeout_s``."""
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            _signal_group(proc.pid, signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), 5.0)

    async def __aenter__(self) -> StackInfo:
        try:
            return await self.start()
        except BaseException:
            await self.stop()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
