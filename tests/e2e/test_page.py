"""The try-it page (GET /) in a real headless Chromium (playwright-core, Debian's chromium) against
the real stack: Redis, the backend with the scripted model, the bridge serving the page.

Skipped only when Chromium is absent and not on CI (``CI=true`` turns that into a failure).
Screenshots: /tmp/page.png and /tmp/page-unauthorized.png (``PAGE_SCREENSHOT`` moves them).
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.bridge.harness import FAST_ENV, token
from tests.e2e import pages
from tests.e2e.node import HERE
from tests.e2e.pages import page_stack, run_script

pytestmark = pytest.mark.e2e

REPO = HERE.parent.parent
SCREENSHOT = os.environ.get("PAGE_SCREENSHOT", "/tmp/page.png")
BAD = str(Path(SCREENSHOT).with_name(Path(SCREENSHOT).stem + "-unauthorized.png"))
BACKEND_TOKEN = "page-backend-token"


@pytest.fixture(scope="module")
def stack(node_modules: None) -> Iterator[dict[str, str]]:
    """A private Redis (this test flips flags), the backend at a visible pace, one bridge."""
    pace = {"SCRIPTED_TTFT_MS": "150", "SCRIPTED_TOKENS_PER_S": "40", "SCRIPTED_REPLY_TOKENS": "14"}
    with page_stack(BACKEND_TOKEN, pace) as (url, redis_url):
        yield {"url": url, "redisUrl": redis_url}


def _turn(records: list[dict[str, Any]], label: str) -> dict[str, Any]:
    (turn,) = [r for r in records if r["kind"] == "turn" and r["label"] == label]
    return turn


def _check_streamed(turn: dict[str, Any], sent: str) -> None:
    assert turn["state"] == "done", turn
    assert turn["path"] == "stream" and turn["meta"].startswith("path stream"), turn["meta"]
    assert turn["userText"] == sent and not turn["userPending"]
    end, chunks = turn["end"], turn["chunks"]
    assert end is not None and end["finishReason"] == "stop"
    assert turn["wire"][0] == "new_message" and turn["wire"][-1] == "message_ack"
    assert [c["seq"] for c in chunks] == list(range(len(chunks))) and len(chunks) >= 2
    # The page showed the reply growing chunk by chunk, then exactly the end content.
    assert turn["replyText"] == end["content"] == "".join(c["chunk"] for c in chunks)
    assert turn["chunkRenders"] == len(chunks)
    growing = [s["text"] for s in turn["snapshots"] if s["state"] == "streaming" and s["text"]]
    assert len(growing) >= 2, turn["snapshots"]
    assert all(
        b.startswith(a) and len(b) > len(a) for a, b in zip(growing, growing[1:], strict=False)
    )
    assert all(end["content"].startswith(text) for text in growing)
    assert turn["ttftMs"] is not None and 0 < turn["ttftMs"] <= turn["totalMs"]
    assert "TTFT" in turn["meta"] and "total" in turn["meta"]


def test_page_in_chromium_streams_completes_cancels_and_refuses(stack: dict[str, str]) -> None:
    chromium = pages.chromium()
    user = f"page-{uuid.uuid4().hex[:8]}"
    english, korean = "hello there", "안녕하세요, 오늘 날씨 어때요?"
    flip = [sys.executable, "-m", "bridge", "flags", "set", f"deny_users={user}"]
    records = run_script(
        "page.mjs",
        {
            "url": stack["url"],
            "token": token(user),
            "chromium": chromium,
            "steps": [
                {"do": "send", "label": "en", "text": english, "via": "enter"},
                {"do": "send", "label": "ko", "text": korean, "via": "button"},
                {"do": "sendAndCancel", "label": "cancel", "text": "[[tps=8]] [[tokens=60]] go"},
                {
                    "do": "exec",
                    "argv": flip,
                    "env": {"BRIDGE_URL": stack["url"], **FAST_ENV},
                    "cwd": str(REPO),
                    "sleepMs": 800,
                },
                {"do": "send", "label": "complete", "text": "streaming is off for me now"},
                {"do": "screenshot", "path": SCREENSHOT},
                {"do": "openWithToken", "label": "bad", "token": "not-a-jwt", "screenshot": BAD},
                {"do": "openWithToken", "label": "expired", "token": token(user, ttl_s=-10)},
            ],
        },  # fmt: skip
    )
    _check_streamed(_turn(records, "en"), english)
    ko = _turn(records, "ko")
    _check_streamed(ko, korean)
    assert any("\uac00" <= ch <= "\ud7a3" for ch in ko["replyText"]), ko["replyText"]

    cancelled = _turn(records, "cancel")
    assert next(r for r in records if r["kind"] == "cancel")["enabled"] is True
    assert cancelled["state"] == "cancelled" and cancelled["end"]["finishReason"] == "cancelled"
    assert cancelled["replyText"] == cancelled["end"]["content"]
    assert "finish cancelled" in cancelled["meta"]

    complete = _turn(records, "complete")
    assert complete["state"] == "done" and complete["path"] == "complete", complete
    assert not any(name.startswith("ai_message_") for name in complete["wire"])
    assert complete["wire"] == ["new_message", "new_message", "message_ack"]
    assert complete["assistant"]["message"]["role"] == "assistant"
    assert complete["replyText"] == complete["assistant"]["message"]["content"] != ""
    assert complete["meta"].startswith("path complete")

    for label in ("bad", "expired"):
        (status,) = [r for r in records if r["kind"] == "status" and r.get("label") == label]
        assert status["code"] == "UNAUTHORIZED", status
        assert "UNAUTHORIZED" in status["text"] and status["sendEnabled"] is False
    (page_errors,) = [r for r in records if r["kind"] == "pageErrors"]
    assert page_errors["errors"] == []
    assert Path(SCREENSHOT).stat().st_size > 10_000
