"""Spawn the embedded stack (``python -m bridge stack``) so one command gives a full benchmark.

The stack prints ``READY {"bridgeUrl", "backendUrl", "redisUrl", "jwtSecret", "backendToken"}``
once it is up; the scripted model's knobs reach it as environment (SCRIPTED_TTFT_MS, ...).
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

from contracts.redis_server import free_port

__all__ = ["DEFAULT_STACK_START_TIMEOUT_S", "EmbeddedStack", "StackInfo", "StackStartError"]

DEFAULT_STACK_START_TIMEOUT_S = 60.0
READY_PREFIX = "READY "
GROUP_SWEEP_TIMEOUT_S = 5.0


class StackStartError(RuntimeError):
    """The stack exited or did not print READY in time; the message has its output's tail."""


@dataclass(frozen=True, kw_only=True)
class StackInfo:
    bridge_url: str
    backend_url: str
    redis_url: str
    jwt_secret: str
    backend_token: str


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
        # A free port by default: the stack's own default (8080) may be taken on a shared machine.
        self.port = port if port is not None else free_port()
        self.argv = [
            python,
            "-m",
            "bridge",
            "stack",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
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
                    backend_token=data["backendToken"],
                )
        return None

    async def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the stack, then whatever is left of its process group, SIGKILL after a wait.

        The stack was started in a session of its own, so its process group is exactly the stack
        and its children (backend, Redis). The group is swept even when the stack itself exits
        at once: a stack killed by SIGTERM before its cleanup ran leaves its children behind.
        """
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout_s)
            except TimeoutError:
                _signal_group(proc.pid, signal.SIGKILL)
                await asyncio.wait_for(proc.wait(), 5.0)
        await _sweep_group(proc.pid, GROUP_SWEEP_TIMEOUT_S)

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


def _signal_group(pgid: int, sig: signal.Signals | int) -> bool:
    """Signal a process group; ``False`` when no process is left in it."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


async def _sweep_group(pgid: int, timeout_s: float) -> None:
    if not _signal_group(pgid, signal.SIGTERM):
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        if not _signal_group(pgid, 0):
            return
    _signal_group(pgid, signal.SIGKILL)
