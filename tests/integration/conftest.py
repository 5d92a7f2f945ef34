"""Bridge + backend + Redis together: the real backend and two bridge replicas as processes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.bridge.harness import FAST_ENV
from tests.support.backend import fast_backend_env
from tests.support.procs import ServerProcess

BACKEND_TOKEN = "integration-backend-token"


@pytest.fixture(scope="module")
def backend(redis_url: str) -> Iterator[ServerProcess]:
    env = fast_backend_env(redis_url, BACKEND_TOKEN)
    with ServerProcess.python_module("backend_stream", env=env) as proc:
        yield proc


def bridge_env(redis_url: str, backend: ServerProcess) -> dict[str, str]:
    env = {
        **FAST_ENV,
        "BACKEND_URL": backend.url,
        "BACKEND_TOKEN": BACKEND_TOKEN,
        "REDIS_URL": redis_url,
        "BRIDGE_FIRST_CHUNK_TIMEOUT_S": "5",
        "BRIDGE_IDLE_TIMEOUT_S": "5",
        "BRIDGE_CHANNEL": "integration",
    }
    # replicas obey flag changes on the default refresh period, not the tests' fast one
    del env["BRIDGE_FLAGS_REFRESH_S"]
    return env


@pytest.fixture(scope="module")
def replicas(redis_url: str, backend: ServerProcess) -> Iterator[tuple[str, str]]:
    env = bridge_env(redis_url, backend)
    with (
        ServerProcess.python_module("bridge", env=env) as one,
        ServerProcess.python_module("bridge", env=env) as two,
    ):
        yield one.url, two.url
