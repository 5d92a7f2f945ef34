"""The real system for the e2e tests: backend (scripted model) and bridge as child processes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.bridge.harness import FAST_ENV
from tests.e2e.node import ensure_node_modules
from tests.support.backend import fast_backend_env
from tests.support.procs import ServerProcess

BACKEND_TOKEN = "e2e-backend-token"


@pytest.fixture(scope="session")
def node_modules() -> None:
    ensure_node_modules()


@pytest.fixture(scope="module")
def backend(redis_url: str) -> Iterator[ServerProcess]:
    env = fast_backend_env(redis_url, BACKEND_TOKEN)
    with ServerProcess.python_module("backend_stream", env=env) as proc:
        yield proc


def bridge_env(redis_url: str, backend: ServerProcess) -> dict[str, str]:
    return {
        **FAST_ENV,
        "BACKEND_URL": backend.url,
        "BACKEND_TOKEN": BACKEND_TOKEN,
        "REDIS_URL": redis_url,
        "BRIDGE_FIRST_CHUNK_TIMEOUT_S": "5",
        "BRIDGE_IDLE_TIMEOUT_S": "5",
        "CHAT_STREAMING_DENY_USERS": "old-timer",
    }


@pytest.fixture(scope="module")
def bridge_url(redis_url: str, backend: ServerProcess, node_modules: None) -> Iterator[str]:
    with ServerProcess.python_module("bridge", env=bridge_env(redis_url, backend)) as proc:
        yield proc.url


@pytest.fixture(scope="module")
def second_bridge_url(redis_url: str, backend: ServerProcess, node_modules: None) -> Iterator[str]:
    """Another bridge replica on the same backend and Redis."""
    with ServerProcess.python_module("bridge", env=bridge_env(redis_url, backend)) as proc:
        yield proc.url
