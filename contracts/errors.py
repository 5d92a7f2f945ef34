"""Error codes of the wire contract (CONTRACT.md, "Error codes") and their HTTP mapping."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Every code a client or the bridge may see; nothing else goes on a wire."""

    INVALID_PAYLOAD = "INVALID_PAYLOAD"
    EMPTY_MESSAGE = "EMPTY_MESSAGE"
    MESSAGE_TOO_LONG = "MESSAGE_TOO_LONG"
    UNAUTHORIZED = "UNAUTHORIZED"
    FORBIDDEN = "FORBIDDEN"
    NOT_FOUND = "NOT_FOUND"
    RATE_LIMITED = "RATE_LIMITED"
    BACKEND_UNAVAILABLE = "BACKEND_UNAVAILABLE"
    BACKEND_FAILED = "BACKEND_FAILED"
    MODEL_TIMEOUT = "MODEL_TIMEOUT"
    MODEL_ERROR = "MODEL_ERROR"
    STREAM_TIMEOUT = "STREAM_TIMEOUT"
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"
    BUDGET_EXCEEDED = "BUDGET_EXCEEDED"
    ROOM_BUSY = "ROOM_BUSY"


# HTTP status the backend answers with when a request fails before its stream starts
# (CONTRACT.md section 2: 400/413/422 bad input, 401, 403, 404, 429, 503).
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_PAYLOAD: 422,
    ErrorCode.EMPTY_MESSAGE: 400,
    ErrorCode.MESSAGE_TOO_LONG: 413,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.BACKEND_UNAVAILABLE: 503,
    ErrorCode.BACKEND_FAILED: 502,
    ErrorCode.MODEL_TIMEOUT: 504,
    ErrorCode.MODEL_ERROR: 502,
    ErrorCode.STREAM_TIMEOUT: 504,
    ErrorCode.CANCELLED: 409,
    ErrorCode.INTERNAL: 500,
    ErrorCode.BUDGET_EXCEEDED: 429,
    ErrorCode.ROOM_BUSY: 429,
}

# Codes after which the same request may succeed if tried again.
RETRYABLE: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.RATE_LIMITED,
        ErrorCode.BACKEND_UNAVAILABLE,
        ErrorCode.BACKEND_FAILED,
        ErrorCode.MODEL_TIMEOUT,
        ErrorCode.MODEL_ERROR,
        ErrorCode.STREAM_TIMEOUT,
        ErrorCode.INTERNAL,
        ErrorCode.ROOM_BUSY,
    }
)

# Codes whose refusals carry ``retryAfterMs`` (socket) / ``Retry-After`` (HTTP).
RETRY_AFTER: frozenset[ErrorCode] = frozenset(
    {ErrorCode.RATE_LIMITED, ErrorCode.BUDGET_EXCEEDED, ErrorCode.ROOM_BUSY}
)


class ContractError(Exception):
    """A request that breaks the contract; carries the code to answer with.

    ``message`` is safe to show and to log: it never contains message content.
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE
