"""Prompt assembly: character system prompt + the room's last N messages + the user message.

In a room people share, a history message another user wrote (a person-to-person message, or
their own question to the AI) reaches the model as ``"<userId>: <text>"``, so it knows who said
what; the asking user's own messages, and the question itself, go as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

from backend_stream.providers.base import ModelRequest, PromptMessage
from backend_stream.store import HistoryEntry


def build_prompt(
    *,
    system_prompt: str,
    history: Sequence[HistoryEntry],
    user_content: str,
    request_id: str,
    max_output_tokens: int,
    user_id: str | None = None,
) -> ModelRequest:
    """The model request; history excludes this request's own messages (a retried attempt's)."""
    messages = [PromptMessage("system", system_prompt)]
    messages += [
        PromptMessage(m.role, _said(m, user_id)) for m in history if m.request_id != request_id
    ]
    messages.append(PromptMessage("user", user_content))
    return ModelRequest(
        messages=tuple(messages), max_output_tokens=max_output_tokens, request_id=request_id
    )


def _said(message: HistoryEntry, asking: str | None) -> str:
    if message.role == "user" and message.user_id and message.user_id != asking:
        return f"{message.user_id}: {message.content}"
    return message.content
