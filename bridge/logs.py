"""structlog JSON lines on stderr; request fields come from contextvars bound by the handlers.

Every line of a request carries ``requestId, roomId, userId, characterId, path`` (bound with
``structlog.contextvars``); message content and tokens are never passed to a logger. The format,
the libraries' records and the throttling of repeated failures are contracts/logs.py's.
"""

from __future__ import annotations

import sys

from contracts import logs


def configure(level: str = "INFO") -> None:
    logs.configure(level, sys.stderr)
