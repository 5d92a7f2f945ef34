"""The try-it page as a room for several people (issue 11): two headless Chromium pages, two
users, one room, on a real stack (Redis, backend with the scripted model, the bridge serving the
page). Alice owns the room and adds Bob with the page's form; each page shows who is online and
who joined or left, whose message is whose, Alice's post reaches Bob, and the AI's answer to
Bob streams on both pages to the exact text the scripted model says. Skipped only when Chromium
is absent and not on CI, like tests/e2e/test_page.py. ``SHARED_ROOM_SCREENSHOT=/tmp/room``
saves both pages as PNGs once the answer is in, for a person to look at.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from backend_stream.providers.scripted import reply_tokens_for
from tests.bridge.harness import token
from tests.e2e import pages
from tests.e2e.pages import page_stack, run_script

pytestmark = pytest.mark.e2e

BACKEND_TOKEN = "shared-room-backend-token"
REPLY_TOKENS = 24


@pytest.fixture(scope="module")
def stack(node_modules: None) -> Iterator[str]:
    env = {"SCRIPTED_TTFT_MS": "50", "SCRIPTED_TOKENS_PER_S": "60",
           "SCRIPTED_REPLY_TOKENS": str(REPLY_TOKENS)}  # fmt: skip
    with page_stack(BACKEND_TOKEN, env) as (url, _):
        yield url


def _turn(view: dict[str, Any], text: str) -> dict[str, Any]:
    (turn,) = [t for t in view["turns"] if t["userText"] == text]
    return turn


def test_two_people_in_one_room_see_each_other_and_the_ai_stream(stack: str) -> None:
    tag = uuid.uuid4().hex[:8]
    alice, bob, room = f"alice-{tag}", f"bob-{tag}", f"room-{tag}"
    ask, post = "what should we do this weekend?", f"hi {bob}, ask the AI something"
    records = run_script(
        "shared_room.mjs",
        {
            "url": stack, "chromium": pages.chromium(), "room": room, "ask": ask, "post": post,
            "alice": {"user": alice, "token": token(alice)},
            "bob": {"user": bob, "token": token(bob)},
            "screenshot": os.environ.get("SHARED_ROOM_SCREENSHOT", ""),
        },
        timeout_s=120,
    )  # fmt: skip
    steps = {r["step"]: r for r in records}
    assert "failed" not in steps, steps.get("failed")

    assert steps["alice_open"]["alice"]["members"] == [alice]

    a, b = steps["bob_open"]["alice"], steps["bob_open"]["bob"]
    assert a["members"] == b["members"] == sorted([alice, bob])
    assert a["onlineCount"] == b["onlineCount"] == "2"
    assert [(n["kind"], n["user"]) for n in a["notices"]] == [
        ("member_added", bob), ("joined", bob),
    ]  # fmt: skip
    assert [n["kind"] for n in b["notices"]] == []  # not told of his own join

    a, b = steps["posted"]["alice"], steps["posted"]["bob"]
    mine, theirs = _turn(a, post), _turn(b, post)
    assert (mine["who"], mine["kind"], mine["state"], mine["other"]) == (
        "You",
        "post",
        "posted",
        False,
    )
    assert (theirs["who"], theirs["user"], theirs["other"]) == (alice, alice, True)
    assert theirs["replyHidden"] and mine["replyHidden"]  # a person's message: no AI answer

    expected = "".join(reply_tokens_for(ask, REPLY_TOKENS))
    a, b = steps["answered"]["alice"], steps["answered"]["bob"]
    asked, watched = _turn(b, ask), _turn(a, ask)
    assert (asked["who"], asked["other"]) == ("You", False)
    assert (watched["who"], watched["user"], watched["other"]) == (bob, bob, True)
    for turn in (asked, watched):
        assert turn["state"] == "done" and turn["reply"] == expected
        assert turn["chunkRenders"] > 1  # streamed in chunks, not only the end's content
        # The text grew on screen, each step a prefix of the answer.
        assert len(turn["replies"]) >= 3 and turn["replies"][-1] == expected, turn["replies"]
        assert all(expected.startswith(t) for t in turn["replies"])

    a = steps["bob_left"]["alice"]
    assert a["members"] == [alice] and a["onlineCount"] == "1"
    assert (a["notices"][-1]["kind"], a["notices"][-1]["user"]) == ("left", bob)
    assert steps["bob_left"]["errors"] == []
