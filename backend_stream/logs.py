"""structlog JSON lines; request ids ride in contextvars so every line of a request carries them.

Never log message content or the service token: only ids, codes, counts and timings.
"""

from __future__ import annotations

import sys

import structlog

from contracts import logs


def configure_logging(level: str) -> None:
    """JSON lines on stdout at ``level``, for structlog and the standard library (uvicorn,
    redis) alike, repeated failures throttled (contracts/logs.py)."""
    logs.configure(level, sys.stdout)


def bind_request(
    *,
    path: str,
    request_id: str,
    room_id: str | None = None,
    user_id: str | None = None,
    character_id: str | None = None,
) -> None:
    """Replace the log context of the current request (and of tasks it starts)."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(
        requestId=request_id,
        roomId=room_id,
        userId=user_id,
        characterId=character_id,
        path=path,
    )
