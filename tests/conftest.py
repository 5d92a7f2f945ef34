"""Fixtures every suite shares: one real Redis server for the whole session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from contracts.redis_server import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """A real ``redis-server`` on a private loopback port, started by the embedded helper."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url
