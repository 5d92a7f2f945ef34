"""structlog JSON lines; request ids ride in contextvars so every line of a request carries them.

Never log message content or the service token: only ids, codes, counts and timings.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(level: str) -> None:
    """JSON to stdout at ``level``, for structlog and the standard library (uvicorn) alike."""
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    logging.basicConfig(stream=sys.stdout, level=numeric, format="%(message)s", force=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )


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
