"""The try-it page renders chunks once per animation frame and reports its own timings (issue 9).

A real stack (Redis, the backend with the scripted model flushing every token as its own chunk,
the bridge serving the page) and headless Chromium (playwright-core, Debian's chromium). One page
sends a message whose reply is a burst of chunks, far more per second than frames; two more pages
of the same user in the same room only watch, one of them with its animation frames held back
past the end of the reply (so the end's flush of pending text is what renders it). The DOM
writes are counted by a MutationObserver the test installs, not only by the page's own
``window.__renderStats``, and the text is checked against the scripted model's reply computed
here. Skipped only when Chromium is absent and not on CI, like tests/e2e/test_page.py.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from backend_stream.providers.scripted import reply_tokens_for
from tests.bridge.harness import token
from tests.e2e import pages
from tests.e2e.pages import page_stack, run_script

pytestmark = pytest.mark.e2e

BACKEND_TOKEN = "page-render-backend-token"
BURST_TOKENS = 300
# 1,000 tokens/s with FLUSH_WINDOW_MS=0: one chunk per token, ~17 chunks per 60 Hz frame.
BURST = f"[[ttft_ms=50]] [[tps=1000]] [[tokens={BURST_TOKENS}]] burst please"
JANK_MS = 5000  # longer than the whole reply (~0.3 s of chunks)


@pytest.fixture(scope="module")
def stack(node_modules: None) -> Iterator[str]:
    # no coalescing: every token is a chunk
    with page_stack(BACKEND_TOKEN, {"FLUSH_WINDOW_MS": "0"}) as (url, _):
        yield url


def _check_rendered(tab: dict[str, Any], expected: str) -> None:
    """A burst rendered in fewer DOM writes than chunks, each write a prefix, the last exact."""
    assert tab["state"] == "done" and tab["errors"] == [], tab
    chunks, end = tab["chunks"], tab["end"]
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert "".join(c["chunk"] for c in chunks) == expected == end["content"]
    # What the browser's DOM went through: one text per write of chunk text, then the end's
    # (authoritative) content written over it.
    *streamed, final = tab["writes"]
    assert final == expected == tab["replyText"]
    assert streamed and streamed[-1] == expected, "the chunks alone must render the exact reply"
    assert all(expected.startswith(text) for text in streamed)
    assert all(len(a) < len(b) for a, b in zip(streamed, streamed[1:], strict=False))
    # The page's hook counts what the DOM saw: one flush per write, at most one per frame.
    stats = tab["stats"]
    assert tab["frameRenders"] == len(streamed) == stats["flushes"], stats
    assert tab["chunkRenders"] == len(chunks) == stats["chunks"], stats
    assert stats["frames"] <= stats["flushes"] <= stats["frames"] + 1, stats  # +1: the end's
    # The point: a burst costs frames, not chunks (a flush per chunk would make these equal).
    assert len(streamed) < len(chunks) and stats["frames"] < stats["chunks"], stats
    assert len(chunks) >= BURST_TOKENS // 2, len(chunks)


def test_page_renders_a_chunk_burst_per_frame_and_reports_its_timings(stack: str) -> None:
    chromium = pages.chromium()
    user = f"render-{uuid.uuid4().hex[:8]}"
    before_ms = time.time() * 1000
    records = run_script(
        "page_render.mjs",
        {
            "url": stack,
            "token": token(user),
            "room": f"room-{user}",
            "chromium": chromium,
            "text": BURST,
            "jankMs": JANK_MS,
        },
    )
    after_ms = time.time() * 1000
    expected = "".join(reply_tokens_for(BURST, BURST_TOKENS))
    (sent,) = [r for r in records if r["kind"] == "sent"]
    tabs = {r["name"]: r for r in records if r["kind"] == "tab"}
    sender, watcher, janky = tabs["sender"], tabs["watcher"], tabs["janky"]
    assert sender["requestId"] == watcher["requestId"] == janky["requestId"] == sent["requestId"]
    for tab in (sender, watcher, janky):
        _check_rendered(tab, expected)
    # No frame came during the reply: the end flushed every chunk in one write, before its content.
    assert janky["stats"] == {"frames": 0, "flushes": 1, "chunks": len(janky["chunks"])}
    assert janky["writes"] == [expected, expected]

    # client_timing: once, on the sender's socket only, with the page's own numbers.
    for tab in (watcher, janky):
        assert tab["clientTimings"] == [] and tab["lastClientTiming"] is None
    (timing,) = sender["clientTimings"]
    assert timing == sender["lastClientTiming"]
    assert timing["requestId"] == sent["requestId"]
    assert before_ms - 5 <= sent["clickedAt"] <= timing["sentAt"] + 5 <= after_ms + 5, timing
    assert 0 <= timing["startMs"] <= timing["firstChunkMs"] <= timing["endMs"], timing
    # The same clock as the TTFT and total the page shows (data-ttft-ms, data-total-ms).
    assert timing["firstChunkMs"] == sender["ttftMs"] and timing["endMs"] == sender["totalMs"]
    # ... and the bridge took it as one sample of bridge_client_ttft_seconds.
    metrics = httpx.get(f"{stack}/metrics", timeout=5).text
    count = re.search(r"^bridge_client_ttft_seconds_count (\S+)$", metrics, re.M)
    assert count is not None and float(count.group(1)) == 1.0, metrics[-2000:]
