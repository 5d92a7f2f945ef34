"""Prompt assembly: character system prompt + the room's last N messages + the user message."""

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
) -> ModelRequest:
    """The model request; history excludes this request's own messages (a retried attempt's)."""
    messages = [PromptMessage("system", system_prompt)]
    messages += [PromptMessage(m.role, m.content) for m in history if m.request_id != request_id]
    messages.append(PromptMessage("user", user_content))
    return ModelRequest(
        messages=tuple(messages), max_output_tokens=max_output_tokens, request_id=request_id
    )
