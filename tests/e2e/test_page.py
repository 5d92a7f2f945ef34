"""The try-it page (GET /) in a real headless Chromium (playwright-core, Debian's chromium) against
the real stack: Redis, the backend with the scripted model, the bridge serving the page.

Skipped only when Chromium is absent and not on CI (``CI=true`` turns that into a failure).
Screenshots: /tmp/page.png and /tmp/page-unauthorized.png (``PAGE_SCREENSHOT`` moves them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from contracts.redis_server import EmbeddedRedis
from tests.bridge.harness import FAST_ENV, token
from tests.e2e.node import HERE, NODE_MODULES
from tests.support.procs import ServerProcess

pytestmark = pytest.mark.e2e

REPO = HERE.parent.parent
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
SCREENSHOT = os.environ.get("PAGE_SCREENSHOT", "/tmp/page.png")
BAD = str(Path(SCREENSHOT).with_name(Path(SCREENSHOT).stem + "-unauthorized.png"))
BACKEND_TOKEN = "page-backend-token"


def _chromium() -> str:
    path = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"chromium not found at {CHROMIUM} (required on CI)")
        pytest.skip(f"chromium not found at {CHROMIUM}")
    return path


@pytest.fixture(scope="module")
def stack(node_modules: None) -> Iterator[dict[str, str]]:
    """A private Redis (this test flips flags), the backend at a visible pace, one bridge."""
    assert (NODE_MODULES / "playwright-core").exists(), "run npm ci in tests/e2e"
    with EmbeddedRedis() as redis:
        backend_env = {
            "REDIS_URL": redis.url,
            "BACKEND_TOKEN": BACKEND_TOKEN,
            "PROVIDER": "scripted",
            "SCRIPTED_TTFT_MS": "150",
            "SCRIPTED_TOKENS_PER_S": "40",
            "SCRIPTED_REPLY_TOKENS": "14",
            "SCRIPTED_DIRECTIVES": "1",
        }
        with ServerProcess.python_module("backend_stream", env=backend_env) as backend:
            bridge_env = {
                **FAST_ENV,
                "BACKEND_URL": backend.url,
                "BACKEND_TOKEN": BACKEND_TOKEN,
                "REDIS_URL": redis.url,
                "BRIDGE_FIRST_CHUNK_TIMEOUT_S": "5",
                "BRIDGE_IDLE_TIMEOUT_S": "5",
            }
            with ServerProcess.python_module("bridge", env=bridge_env) as bridge:
                yield {"url": bridge.url, "redisUrl": redis.url}


def _run_page(spec: dict[str, Any], timeout_s: float = 120.0) -> list[dict[str, Any]]:
    node = shutil.which("node")
    assert node is not None, "node is required for the e2e tests"
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(spec, fh)
    try:
        proc = subprocess.run(
            [node, str(HERE / "page.mjs"), fh.name],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=HERE,
        )
    finally:
        Path(fh.name).unlink(missing_ok=True)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, (
        f"page.mjs failed ({proc.returncode}): {records[-4:]}\n{proc.stderr}"
    )
    return records


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
    chromium = _chromium()
    user = f"page-{uuid.uuid4().hex[:8]}"
    english, korean = "hello there", "안녕하세요, 오늘 날씨 어때요?"
    flip = [sys.executable, "-m", "bridge", "flags", "set", f"deny_users={user}"]
    records = _run_page(
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
                    "env": {"REDIS_URL": stack["redisUrl"], **FAST_ENV},
                    "cwd": str(REPO),
                    "sleepMs": 800,
                },
                {"do": "send", "label": "complete", "text": "streaming is off for me now"},
                {"do": "screenshot", "path": SCREENSHOT},
                {"do": "openWithToken", "label": "bad", "token": "not-a-jwt", "screenshot": BAD},
                {"do": "openWithToken", "label": "expired", "token": token(user, ttl_s=-10)},
            ],
        }  # fmt: skip
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
