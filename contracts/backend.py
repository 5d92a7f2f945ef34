"""Bridge <-> backend wire (CONTRACT.md section 2): request bodies, SSE event data, JSON replies."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field

from contracts.base import Id, NonNegativeInt, Seq, Text, WireModel
from contracts.errors import ErrorCode


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


class SseEvent(StrEnum):
    """Names of the SSE events of ``/chat/messages/stream``."""

    START = "start"
    CHUNK = "chunk"
    END = "end"
    ERROR = "error"


class Role(StrEnum):
    USER = "user"
    ASSISTANT = "assistant"


class Usage(WireModel):
    prompt_tokens: NonNegativeInt = 0
    completion_tokens: NonNegativeInt = 0
    total_tokens: NonNegativeInt = 0


class BackendLatency(WireModel):
    """Backend stage timings in ms from the backend's receipt of the request.

    A stage that did not happen (or whose request attached to an existing generation) is null.
    """

    settings_loaded_ms: float | None = None
    prompt_built_ms: float | None = None
    model_first_token_ms: float | None = None
    first_chunk_ms: float | None = None
    model_done_ms: float | None = None
    total_ms: float | None = None


class ChatRequest(WireModel):
    """Body of ``POST /chat/messages/stream`` and ``POST /chat/messages``."""

    request_id: Id
    room_id: Id
    user_id: Id
    content: Text
    character_id: Id | None = None


class PostRequest(WireModel):
    """Body of ``POST /chat/rooms/{roomId}/messages``: a person-to-person message."""

    request_id: Id
    user_id: Id
    content: Text


class StreamStart(WireModel):
    """``event: start``; ``queuePosition`` (> 0, else absent): the generation waits for its
    room, that many generations ahead of it (CONTRACT.md "Rooms and members")."""

    request_id: Id
    room_id: Id
    message_id: Id
    user_message_id: Id
    queue_position: NonNegativeInt | None = None


class StreamChunk(WireModel):
    """``event: chunk`` (the SSE ``id`` equals ``seq``)."""

    seq: Seq
    chunk: Text


class StreamEnd(WireModel):
    """``event: end``."""

    message_id: Id
    content: Text
    finish_reason: FinishReason
    usage: Usage = Field(default_factory=Usage)
    latency: BackendLatency = Field(default_factory=BackendLatency)


class StreamError(WireModel):
    """``event: error``: ends a stream that failed after it started."""

    code: ErrorCode
    message: str
    retryable: bool = False


class ErrorBody(WireModel):
    """JSON body of every HTTP error of the backend.

    ``retryable`` is the backend's word on whether the same request may succeed later; absent,
    the code's default (``contracts.RETRYABLE``) applies.
    """

    code: ErrorCode
    message: str
    retryable: bool | None = None


class CompleteResponse(WireModel):
    """Reply of ``POST /chat/messages``; ``userMessageId`` is the stored user message's id."""

    request_id: Id
    room_id: Id
    message_id: Id
    user_message_id: Id
    content: Text
    finish_reason: FinishReason
    usage: Usage = Field(default_factory=Usage)
    latency: BackendLatency = Field(default_factory=BackendLatency)


class CancelResponse(WireModel):
    """Reply of ``POST /chat/messages/{requestId}/cancel``."""

    ok: bool
    request_id: Id
    status: Literal["cancelling", "done"]


class ChatMessage(WireModel):
    """A stored message, in history and in ``new_message``."""

    id: Id
    request_id: Id
    role: Role
    content: Text
    user_id: Id | None = None
    character_id: Id | None = None
    created_at: str


class HistoryResponse(WireModel):
    """Reply of ``GET /chat/rooms/{roomId}/messages``: oldest first."""

    room_id: Id
    messages: list[ChatMessage]


# ---- batch (CONTRACT.md section 2 "Batch") ----------------------------------------------------


class TaskState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class TaskAccepted(WireModel):
    """Reply (202) of ``POST /chat/tasks`` (body: ``ChatRequest``; ``taskId`` = requestId)."""

    task_id: Id
    status: TaskState
    # the stored user message (stored once, at acceptance): the bridge sends it to the room at once
    user_message: ChatMessage | None = None


class TaskStatus(WireModel):
    """Reply of ``GET /chat/tasks/{taskId}?userId=U`` (and the bridge's ``GET /tasks/{id}``)."""

    task_id: Id
    status: TaskState
    room_id: Id
    message_id: Id | None = None
    content: Text | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    code: ErrorCode | None = None


class TaskOutcome(WireModel):
    """What the backend publishes (Redis channel ``bs:tasks:done``) when a task ends, for the
    bridge replica holding the sender's sockets: ``task_done`` plus the assistant message."""

    task_id: Id
    user_id: Id
    room_id: Id
    status: Literal[TaskState.DONE, TaskState.FAILED]
    message_id: Id | None = None
    code: ErrorCode | None = None
    message: ChatMessage | None = None  # the stored assistant message (done)


# ---- usage and budgets (CONTRACT.md section 2 "Usage") -----------------------------------------


class Budget(WireModel):
    tokens: NonNegativeInt | None = None
    cost_usd: float | None = None


class UsageResponse(WireModel):
    """Reply of ``GET /chat/usage/{userId}?day=YYYY-MM-DD`` (and the bridge's ``GET /me/usage``)."""

    user_id: Id
    day: str
    prompt_tokens: NonNegativeInt
    completion_tokens: NonNegativeInt
    cost_usd: float
    budget: Budget
    remaining: Budget
