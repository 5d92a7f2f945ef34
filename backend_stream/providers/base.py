"""The one streaming interface every model provider implements."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from contracts import FinishReason, Usage


@dataclass(frozen=True, slots=True)
class PromptMessage:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True, slots=True)
class ModelRequest:
    """What a provider gets: the assembled prompt, the output budget, and ids for its logs."""

    messages: tuple[PromptMessage, ...]
    max_output_tokens: int
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class Delta:
    """One piece of a model's stream: text, and/or (usually last) usage and finish reason."""

    text: str = ""
    usage: Usage | None = None
    finish_reason: FinishReason | None = None


class Provider(Protocol):
    """A model behind a streaming call.

    ``open_stream`` returns once the model has accepted the request (HTTP status received), so a
    refusal (429, 5xx) surfaces before the backend's SSE stream starts; the iterator then yields
    deltas. Both raise only ``ProviderError`` subclasses.
    """

    name: str

    async def open_stream(self, request: ModelRequest) -> AsyncGenerator[Delta, None]: ...

    async def aclose(self) -> None: ...
