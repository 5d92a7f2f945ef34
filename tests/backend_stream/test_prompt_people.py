"""In a shared room the model is told who said what (issue 11)."""

from __future__ import annotations

from backend_stream.prompt import build_prompt
from backend_stream.store import HistoryEntry


def test_other_peoples_messages_are_labelled_with_their_author() -> None:
    history = [
        HistoryEntry("user", "hi all", "p1", "bob"),
        HistoryEntry("user", "what is 2+2", "r1", "alice"),
        HistoryEntry("assistant", "4", "r1", None),
        HistoryEntry("user", "this attempt", "r2", "alice"),  # the request itself: left out
    ]
    request = build_prompt(
        system_prompt="be brief", history=history, user_content="and 3+3?",
        request_id="r2", max_output_tokens=10, user_id="alice",
    )  # fmt: skip
    assert [(m.role, m.content) for m in request.messages] == [
        ("system", "be brief"),
        ("user", "bob: hi all"),
        ("user", "what is 2+2"),
        ("assistant", "4"),
        ("user", "and 3+3?"),
    ]
