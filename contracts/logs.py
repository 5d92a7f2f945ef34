"""One log format for both services: JSON lines, the libraries' records included, no storms.

structlog renders the services' own events; the standard library's records (python-socketio,
python-engineio, uvicorn, httpx, redis) go through one root handler whose formatter is
structlog's ``ProcessorFormatter``, so they come out as the same JSON lines, once each (the
libraries get no handlers of their own: uvicorn runs with ``log_config=None`` and python-socketio
with a logger object, bridge/compat.py).

A failure that repeats (Redis away: one "Cannot publish to redis" per chunk) is logged at most
``THROTTLE_BURST`` times per ``THROTTLE_INTERVAL_S`` per (logger, message): the first records of a
window go out (examples, with their request ids), the others are counted, and the first record
after the window carries ``repeated``, the count of those it stood for.
Only WARNING and above are throttled; per-request INFO lines are never dropped.

It lives in ``contracts`` because both services use it (they share nothing else); it writes
only ids, codes, counts and timings that the callers pass: message content and tokens are never
handed to a logger, and the libraries' INFO records (python-engineio's carry packet payloads) are
kept below the level that prints.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, MutableMapping
from typing import Any, TextIO

import structlog

THROTTLE_INTERVAL_S = 10.0
THROTTLE_BURST = 5
THROTTLE_MAX_KEYS = 1024  # distinct (logger, message) pairs tracked; then the table starts over
# The libraries' loggers that print only from WARNING: their INFO lines are per packet or per
# request (engineio's include the packet's data, which is message content).
QUIET_LIBRARIES = ("socketio", "engineio", "httpx", "httpcore", "uvicorn.access", "redis")
THROTTLED_LEVELS = frozenset({"warning", "error", "critical", "exception"})


class Throttle:
    """Admits ``burst`` events per key per interval and counts the rest (bounded table)."""

    def __init__(
        self,
        interval_s: float = THROTTLE_INTERVAL_S,
        *,
        burst: int = THROTTLE_BURST,
        max_keys: int = THROTTLE_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self._burst = burst
        self._max_keys = max_keys
        self._clock = clock
        # key -> [window start, admitted in it, dropped in it]
        self._windows: dict[Hashable, list[float]] = {}

    def admit(self, key: Hashable) -> int | None:
        """None: drop this one (counted). Else it goes out, and the int is how many were
        dropped in the key's previous window (0 when none)."""
        now = self._clock()
        window = self._windows.get(key)
        if window is not None and now - window[0] < self.interval_s:
            if window[1] < self._burst:
                window[1] += 1
                return 0
            window[2] += 1
            return None
        if window is None and len(self._windows) >= self._max_keys:
            self._windows.clear()
        self._windows[key] = [now, 1, 0]
        return int(window[2]) if window is not None else 0


def _throttle_structlog(throttle: Throttle) -> structlog.types.Processor:
    def processor(_: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
        if method in THROTTLED_LEVELS:
            repeated = throttle.admit(("structlog", str(event_dict.get("event"))))
            if repeated is None:
                raise structlog.DropEvent
            if repeated:
                event_dict["repeated"] = repeated
        return event_dict

    return processor


class _ThrottleFilter(logging.Filter):
    def __init__(self, throttle: Throttle) -> None:
        super().__init__()
        self._throttle = throttle

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        # keyed by the message template, so "retrying in 1 secs" and "in 2 secs" are one
        repeated = self._throttle.admit((record.name, str(record.msg)))
        if repeated is None:
            return False
        record.repeated = repeated
        return True


def _add_repeated(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> Any:
    record = event_dict.get("_record")
    repeated = getattr(record, "repeated", 0)
    if repeated:
        event_dict["repeated"] = repeated
    return event_dict


def configure(
    level: str,
    stream: TextIO,
    *,
    throttle_interval_s: float = THROTTLE_INTERVAL_S,
    throttle_burst: int = THROTTLE_BURST,
) -> Throttle:
    """JSON lines on ``stream`` at ``level`` for structlog and every standard-library logger."""
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    throttle = Throttle(throttle_interval_s, burst=throttle_burst)
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _throttle_structlog(throttle),
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.addFilter(_ThrottleFilter(throttle))
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                _add_repeated,
                timestamper,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        # uvicorn's own handlers (when something configured them) would print a second copy
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.propagate = True
    return throttle
