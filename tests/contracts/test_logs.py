"""contracts/logs.py: one JSON format for structlog and the standard library, repeats throttled."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator

import pytest
import structlog

from contracts.logs import Throttle, configure


def test_throttle_admits_one_per_interval_and_reports_what_it_dropped() -> None:
    now = [0.0]
    throttle = Throttle(10.0, burst=2, clock=lambda: now[0])
    assert throttle.admit("a") == 0
    assert throttle.admit("a") == 0, "a burst of two goes out"
    assert [throttle.admit("a") for _ in range(5)] == [None] * 5
    assert throttle.admit("b") == 0, "keys are independent"
    now[0] = 10.0
    assert throttle.admit("a") == 5
    assert throttle.admit("a") == 0
    assert throttle.admit("a") is None
    now[0] = 25.0
    assert throttle.admit("a") == 1


def test_throttle_table_is_bounded() -> None:
    throttle = Throttle(10.0, burst=1, max_keys=3, clock=lambda: 0.0)
    for i in range(10):
        assert throttle.admit(i) == 0
    assert len(throttle._windows) <= 3


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    yield out
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)


def _lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_library_records_come_out_as_json_once_each_and_repeats_are_counted(
    stream: io.StringIO,
) -> None:
    configure("INFO", stream, throttle_interval_s=0.2, throttle_burst=1)
    sio = logging.getLogger("socketio.server")
    for i in range(100):
        sio.error("Cannot publish to redis... retrying %s", i)
    logging.getLogger("uvicorn.error").warning("uvicorn speaks")
    time.sleep(0.25)
    sio.error("Cannot publish to redis... retrying %s", 100)
    lines = _lines(stream)  # every line parses: no plain-text copies
    publishes = [ln for ln in lines if ln["logger"] == "socketio.server"]
    assert [p["event"] for p in publishes] == [
        "Cannot publish to redis... retrying 0",
        "Cannot publish to redis... retrying 100",
    ]
    assert publishes[1]["repeated"] == 99 and "repeated" not in publishes[0]
    assert publishes[0]["level"] == "error" and "timestamp" in publishes[0]
    assert [ln["event"] for ln in lines if ln["logger"] == "uvicorn.error"] == ["uvicorn speaks"]


def test_structlog_warnings_are_throttled_info_lines_never(stream: io.StringIO) -> None:
    configure("INFO", stream, throttle_interval_s=60, throttle_burst=3)
    log = structlog.get_logger("t")
    for _ in range(50):
        log.warning("chunk_write_failed", error="ConnectionError")
        log.info("generation_end", chunks=3)
    lines = _lines(stream)
    assert [ln["event"] for ln in lines].count("chunk_write_failed") == 3
    assert [ln["event"] for ln in lines].count("generation_end") == 50


def test_library_info_records_that_carry_payloads_do_not_print(stream: io.StringIO) -> None:
    configure("DEBUG", stream)
    logging.getLogger("engineio.server").info("abc: Sending packet MESSAGE data 2[secret]")
    logging.getLogger("httpx").info("HTTP Request: POST http://x/chat/messages/stream")
    logging.getLogger("backend_stream.x").debug("kept")
    assert [ln["event"] for ln in _lines(stream)] == ["kept"]
