from __future__ import annotations

import socket

from contracts.redis_server import EmbeddedRedis, find_redis_server


def _ping(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(16)


def test_embedded_redis_starts_answers_and_stops() -> None:
    assert find_redis_server()
    server = EmbeddedRedis().start()
    try:
        assert _ping(server.port) == b"+PONG\r\n"
        assert server.url.startswith("redis://127.0.0.1:")
    finally:
        server.stop()
    try:
        _ping(server.port)
    except OSError:
        pass
    else:
        raise AssertionError("redis still answering after stop()")
