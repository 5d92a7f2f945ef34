"""Process-level behaviour: Redis outages are answered, not crashed on."""

from __future__ import annotations

import httpx

from contracts.redis_server import EmbeddedRedis
from tests.backend_stream.conftest import AUTH, body, start_backend


def test_redis_down_makes_readyz_503_and_requests_503_while_healthz_stays_up() -> None:
    redis = EmbeddedRedis().start()
    proc = start_backend(redis.url, REDIS_TIMEOUT_S="1")
    try:
        assert httpx.get(f"{proc.url}/readyz", timeout=5).status_code == 200
        redis.stop()
        ready = httpx.get(f"{proc.url}/readyz", timeout=10)
        posted = httpx.post(
            f"{proc.url}/chat/messages/stream", json=body(), headers=AUTH, timeout=10
        )
        health = httpx.get(f"{proc.url}/healthz", timeout=5)
    finally:
        proc.stop()
        redis.stop()
    assert ready.status_code == 503
    assert (posted.status_code, posted.json()["code"]) == (503, "BACKEND_UNAVAILABLE")
    assert health.status_code == 200
