"""Builders of the bridge -> client payloads (CONTRACT.md section 1) as plain dicts.

The relay builds these itself, once per event, so they are not re-validated with pydantic on
the hot path; tests/bridge/test_payloads.py validates every builder against the contract
models, which is what keeps the two in step.
"""

from __future__ import annotations

from typing import Any

from contracts import (
    RETRYABLE,
    BackendLatency,
    CompleteResponse,
    ContractError,
    ErrorCode,
    Path,
    StreamEnd,
    utc_now_iso,
)

Payload = dict[str, Any]

_RETRYABLE = frozenset(code.value for code in RETRYABLE)


def accepted(
    request_id: str, room_id: str, message_id: str | None, path: Path, task_id: str | None = None
) -> Payload:
    # The ack's path is "stream", "complete" or "batch": a fallback is still the stream path to
    # the sender.
    ack_path = path if path in (Path.COMPLETE, Path.BATCH) else Path.STREAM
    return {
        "ok": True,
        "stage": "accepted",
        "requestId": request_id,
        "roomId": room_id,
        "messageId": message_id,
        "path": ack_path.value,
        "taskId": task_id,
    }


def rejected(
    request_id: str | None, code: ErrorCode, message: str, retry_after_ms: int | None = None
) -> Payload:
    payload: Payload = {
        "ok": False,
        "stage": "rejected",
        "requestId": request_id,
        "code": code.value,
        "message": message,
    }
    if retry_after_ms is not None:
        payload["retryAfterMs"] = retry_after_ms
    return payload


def error_ack(code: ErrorCode, message: str) -> Payload:
    return {"ok": False, "code": code.value, "message": message}


def rejected_from(exc: ContractError, request_id: str | None = None) -> Payload:
    return rejected(request_id, exc.code, exc.message)


def new_message(
    *,
    room_id: str,
    message_id: str,
    request_id: str,
    role: str,
    content: str,
    user_id: str | None,
    character_id: str | None,
) -> Payload:
    return {
        "roomId": room_id,
        "message": {
            "id": message_id,
            "requestId": request_id,
            "role": role,
            "content": content,
            "userId": user_id,
            "characterId": character_id,
            "createdAt": utc_now_iso(),
        },
    }


def start(request_id: str, room_id: str, message_id: str, queue_position: int = 0) -> Payload:
    payload: Payload = {"requestId": request_id, "roomId": room_id, "messageId": message_id}
    if queue_position > 0:
        payload["queuePosition"] = queue_position
    return payload


def chunk(request_id: str, room_id: str, message_id: str, seq: int, text: str) -> Payload:
    return {
        "requestId": request_id,
        "roomId": room_id,
        "messageId": message_id,
        "seq": seq,
        "chunk": text,
    }


def latency(
    *,
    accepted_ms: float | None,
    first_chunk_ms: float | None,
    total_ms: float | None,
    backend: BackendLatency,
) -> Payload:
    return {
        "acceptedMs": accepted_ms,
        "firstChunkMs": first_chunk_ms,
        "totalMs": total_ms,
        "backend": backend.wire(),
    }


def end(
    request_id: str,
    room_id: str,
    body: StreamEnd | CompleteResponse,
    timing: Payload,
) -> Payload:
    return {
        "requestId": request_id,
        "roomId": room_id,
        "messageId": body.message_id,
        "content": body.content,
        "finishReason": body.finish_reason.value,
        "usage": body.usage.wire(),
        "latency": timing,
    }


def error(
    request_id: str,
    room_id: str,
    message_id: str | None,
    code: ErrorCode,
    message: str,
    *,
    retryable: bool | None = None,
    retry_after_ms: int | None = None,
) -> Payload:
    """``ai_message_error``; ``retryable`` is the backend's word when it reported the failure
    (None: the code's default)."""
    payload: Payload = {
        "requestId": request_id,
        "roomId": room_id,
        "messageId": message_id,
        "code": code.value,
        "message": message,
        "retryable": code.value in _RETRYABLE if retryable is None else retryable,
    }
    if retry_after_ms is not None:
        payload["retryAfterMs"] = retry_after_ms
    return payload


def message_ack(
    request_id: str,
    room_id: str,
    message_id: str | None,
    *,
    ok: bool,
    path: Path,
    code: ErrorCode | None = None,
) -> Payload:
    return {
        "requestId": request_id,
        "roomId": room_id,
        "messageId": message_id,
        "stage": "done",
        "ok": ok,
        "path": path.value,
        "code": code.value if code is not None else None,
    }


def task_done(
    task_id: str, room_id: str, message_id: str | None, *, ok: bool, code: ErrorCode | None
) -> Payload:
    """``task_done``: a batch answer ended (to the sender's sockets, in place of message_ack)."""
    payload: Payload = {"taskId": task_id, "roomId": room_id, "messageId": message_id, "ok": ok}
    if code is not None:
        payload["code"] = code.value
    return payload


def session_expired() -> Payload:
    return {
        "code": ErrorCode.UNAUTHORIZED.value,
        "message": "token expired: reconnect with a fresh token",
    }


def join_ack(
    room_id: str, in_flight: list[str], members: list[str], pending_tasks: list[str] | None = None
) -> Payload:
    return {
        "ok": True, "roomId": room_id, "inFlight": in_flight, "members": members,
        "pendingTasks": pending_tasks or [],
    }  # fmt: skip


def members_ack(room_id: str, members: list[str]) -> Payload:
    return {"ok": True, "roomId": room_id, "members": members}


def room_event(room_id: str, kind: str, user_id: str) -> Payload:
    return {"roomId": room_id, "type": str(kind), "userId": user_id, "at": utc_now_iso()}
