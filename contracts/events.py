"""Client <-> bridge wire (CONTRACT.md section 1): Socket.IO event payloads and acks."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field

from contracts.backend import BackendLatency, ChatMessage, FinishReason, Usage
from contracts.base import Id, NonNegativeInt, Seq, Text, WireModel
from contracts.errors import ErrorCode


class ClientEvent(StrEnum):
    JOIN_ROOM = "join_room"
    LEAVE_ROOM = "leave_room"
    SEND_MESSAGE = "send_message"
    CANCEL_MESSAGE = "cancel_message"
    CLIENT_TIMING = "client_timing"
    ADD_MEMBER = "add_member"
    REMOVE_MEMBER = "remove_member"
    POST_MESSAGE = "post_message"


class ServerEvent(StrEnum):
    NEW_MESSAGE = "new_message"
    AI_MESSAGE_START = "ai_message_start"
    AI_MESSAGE_CHUNK = "ai_message_chunk"
    AI_MESSAGE_END = "ai_message_end"
    AI_MESSAGE_ERROR = "ai_message_error"
    MESSAGE_ACK = "message_ack"
    SESSION_EXPIRED = "session_expired"
    ROOM_EVENT = "room_event"
    TASK_DONE = "task_done"


class Path(StrEnum):
    """How a generation reached the room."""

    STREAM = "stream"
    FALLBACK = "fallback"
    COMPLETE = "complete"
    BATCH = "batch"


# ---- client -> bridge ---------------------------------------------------------------------


class JoinRoom(WireModel):
    room_id: Id
    character_id: Id | None = None


class LeaveRoom(WireModel):
    room_id: Id


class Mode(StrEnum):
    """``send_message``'s ``mode``: streamed to the room, or a background job (CONTRACT.md)."""

    STREAM = "stream"
    BATCH = "batch"


class SendMessage(WireModel):
    room_id: Id
    content: Text
    character_id: Id | None = None
    request_id: Id | None = None
    mode: Mode = Mode.STREAM  # an unknown mode is INVALID_PAYLOAD


class CancelMessage(WireModel):
    request_id: Id


class PostMessage(WireModel):
    """``post_message``: a message to the people in the room, no AI."""

    room_id: Id
    content: Text
    request_id: Id | None = None


class ChangeMember(WireModel):
    """``add_member`` / ``remove_member`` (the room's owner only)."""

    room_id: Id
    user_id: Id


# A page's own P0 timings of one of its requests, ms from its send click (never trusted for
# anything but a metric: bounded so that a client cannot skew a histogram by more than a sample).
TimingMs = Annotated[float, Field(ge=0, le=600_000, allow_inf_nan=False)]


class ClientTiming(WireModel):
    request_id: Id
    sent_at: Annotated[float, Field(ge=0, allow_inf_nan=False)]  # epoch ms of the send click
    start_ms: TimingMs | None = None
    first_chunk_ms: TimingMs | None = None
    end_ms: TimingMs | None = None


# ---- acks ---------------------------------------------------------------------------------


class OkAck(WireModel):
    ok: Literal[True] = True


class ErrorAck(WireModel):
    ok: Literal[False] = False
    code: ErrorCode
    message: str


class JoinRoomAck(WireModel):
    ok: Literal[True] = True
    room_id: Id
    in_flight: list[Id] = Field(default_factory=list)
    members: list[Id] = Field(default_factory=list)  # users online in the room, every replica
    pending_tasks: list[Id] = Field(default_factory=list)  # the caller's unfinished batch tasks


class PostAck(WireModel):
    ok: Literal[True] = True
    request_id: Id
    room_id: Id
    message_id: Id


class MembersAck(WireModel):
    """The ack of ``add_member`` / ``remove_member``: the members the owner added, after it."""

    ok: Literal[True] = True
    room_id: Id
    members: list[Id]


class SendAccepted(WireModel):
    ok: Literal[True] = True
    stage: Literal["accepted"] = "accepted"
    request_id: Id
    room_id: Id
    message_id: Id | None
    path: Literal[Path.STREAM, Path.COMPLETE, Path.BATCH]
    task_id: Id | None = None  # batch: the task's id (= requestId)


class SendRejected(WireModel):
    ok: Literal[False] = False
    stage: Literal["rejected"] = "rejected"
    request_id: Id | None = None
    code: ErrorCode
    message: str
    retry_after_ms: NonNegativeInt | None = None  # with RATE_LIMITED, BUDGET_EXCEEDED, ROOM_BUSY


class ConnectErrorData(WireModel):
    """``data`` of a refused connection's ``connect_error``."""

    code: ErrorCode
    message: str


# ---- bridge -> client ---------------------------------------------------------------------


class NewMessage(WireModel):
    room_id: Id
    message: ChatMessage


class AiMessageStart(WireModel):
    request_id: Id
    room_id: Id
    message_id: Id
    queue_position: NonNegativeInt | None = None  # > 0: waits for the room (else absent)


class AiMessageChunk(WireModel):
    request_id: Id
    room_id: Id
    message_id: Id
    seq: Seq
    chunk: Text


class Latency(WireModel):
    """Bridge timings in ms from the receipt of ``send_message``, plus the backend's stages."""

    accepted_ms: float | None = None
    first_chunk_ms: float | None = None
    total_ms: float | None = None
    backend: BackendLatency = Field(default_factory=BackendLatency)


class AiMessageEnd(WireModel):
    request_id: Id
    room_id: Id
    message_id: Id
    content: Text
    finish_reason: FinishReason
    usage: Usage = Field(default_factory=Usage)
    latency: Latency = Field(default_factory=Latency)


class AiMessageError(WireModel):
    request_id: Id
    room_id: Id
    message_id: Id | None = None
    code: ErrorCode
    message: str
    retryable: bool  # the backend's word when the backend reported it, else the code's default
    retry_after_ms: NonNegativeInt | None = None


class SessionExpired(WireModel):
    """``session_expired``: the token's ``exp`` passed; the socket is disconnected next."""

    code: Literal[ErrorCode.UNAUTHORIZED] = ErrorCode.UNAUTHORIZED
    message: str


class RoomEventType(StrEnum):
    JOINED = "joined"
    LEFT = "left"
    MEMBER_ADDED = "member_added"
    MEMBER_REMOVED = "member_removed"


class RoomEvent(WireModel):
    """``room_event``: presence and membership, to the room."""

    room_id: Id
    type: RoomEventType
    user_id: Id
    at: str  # ISO 8601, UTC


class TaskDone(WireModel):
    """``task_done``: a batch answer ended (to the sender's sockets, in place of message_ack)."""

    task_id: Id
    room_id: Id
    message_id: Id | None
    ok: bool
    code: ErrorCode | None = None


class MessageAck(WireModel):
    request_id: Id
    room_id: Id
    message_id: Id | None
    stage: Literal["done"] = "done"
    ok: bool
    path: Path
    code: ErrorCode | None = None
