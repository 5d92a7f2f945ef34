"""Real backend processes on loopback ports, sharing the session's real Redis."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.support.procs import ServerProcess

TOKEN = "test-backend-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_CONTENT_CHARS = 200

# Small and fast, so the suite stays quick; directives let each test pick a pace or a fault.
FAST_ENV = {
    "BACKEND_TOKEN": TOKEN,
    "PROVIDER": "scripted",
    "SCRIPTED_TTFT_MS": "40",
    "SCRIPTED_TOKENS_PER_S": "100",
    "SCRIPTED_REPLY_TOKENS": "12",
    "SCRIPTED_DIRECTIVES": "1",
    "SSE_PING_INTERVAL_S": "0.2",
    "MAX_CONTENT_CHARS": str(MAX_CONTENT_CHARS),
    "MODEL_FIRST_TOKEN_TIMEOUT_S": "2",
    "MODEL_IDLE_TIMEOUT_S": "1",
    "MODEL_TOTAL_TIMEOUT_S": "20",
    "LOG_LEVEL": "WARNING",
}


@dataclass
class Backend:
    proc: ServerProcess

    @property
    def url(self) -> str:
        return self.proc.url

    def client(self, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=AUTH, timeout=30.0, **kw)

    def model_calls(self) -> float:
        return metric(self.url, r'backend_model_calls_total\{provider="scripted"\}')


def metric(base_url: str, pattern: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=5).text
    match = re.search(rf"^{pattern} ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def start_backend(redis_url: str, **env: str) -> ServerProcess:
    proc = ServerProcess.python_module(
        "backend_stream", env={**FAST_ENV, "REDIS_URL": redis_url, **env}
    )
    return proc.start()


@pytest.fixture(scope="session")
def backend(redis_url: str) -> Iterator[Backend]:
    proc = start_backend(redis_url)
    yield Backend(proc)
    proc.stop()


@pytest.fixture(scope="session")
def backend_b(redis_url: str) -> Iterator[Backend]:
    """A second replica on the same Redis."""
    proc = start_backend(redis_url)
    yield Backend(proc)
    proc.stop()


def ids() -> dict[str, str]:
    """Fresh requestId / roomId / userId so tests never see each other's state."""
    tag = uuid.uuid4().hex[:10]
    return {"requestId": f"r-{tag}", "roomId": f"room-{tag}", "userId": f"user-{tag}"}


def body(content: str = "hello there", **extra: str) -> dict[str, str]:
    return {**ids(), "content": content, **extra}


def parse_frames(raw: bytes) -> list[dict[str, str]]:
    """Split an SSE byte stream into frames; a comment frame is {"comment": text}."""
    frames = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        frame: dict[str, str] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                frame["comment"] = line[1:].strip()
            else:
                name, _, value = line.partition(": ")
                frame[name] = value
        frames.append(frame)
    return frames
