"""The service's error tree; every leaf knows its contract code, mapped once at the boundary.

```
BackendStreamError
├── ProviderError              # the model failed; raised by providers, mapped from SDK errors
│   ├── ModelTimeout (+TimeoutError)
│   ├── ModelRateLimited       # with retry_after_s (any error may carry one)
│   └── ModelFailed            # 5xx, malformed stream, refused request
├── GenerationTimeout (+TimeoutError)  # idle between tokens / total budget exceeded
├── RoomWaitTimeout            # waited ROOM_QUEUE_WAIT_S for the room's lock (ROOM_BUSY)
├── BudgetExceeded             # the prompt does not fit the day's budget (before the model)
└── Superseded                 # our lease lapsed and another replica runs the request now
```
Request errors (bad input, auth, not found) are ``contracts.ContractError``: they carry their code.
"""

from __future__ import annotations

from contracts import ContractError, ErrorCode


class BackendStreamError(Exception):
    """Base of the errors this service raises; ``code`` is what goes on the wire."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s  # the error event's Retry-After, where there is one


class ProviderError(BackendStreamError):
    code = ErrorCode.MODEL_ERROR


class ModelTimeout(ProviderError, TimeoutError):
    code = ErrorCode.MODEL_TIMEOUT


class ModelRateLimited(ProviderError):
    code = ErrorCode.RATE_LIMITED


class ModelFailed(ProviderError):
    code = ErrorCode.MODEL_ERROR


class GenerationTimeout(BackendStreamError, TimeoutError):
    code = ErrorCode.STREAM_TIMEOUT


class RoomWaitTimeout(BackendStreamError):
    code = ErrorCode.ROOM_BUSY


class BudgetExceeded(BackendStreamError):
    """The prompt needs more than the user's or the service's budget leaves (usage.py)."""

    code = ErrorCode.BUDGET_EXCEEDED


class Superseded(BackendStreamError):
    code = ErrorCode.BACKEND_FAILED


class RequestRejected(ContractError):
    """A request answered with an HTTP error before any stream starts.

    ``status`` overrides ``contracts.HTTP_STATUS`` where the contract names a different one
    (413 for an oversized body, 409 for an ambiguous requestId). ``retryable`` is the word of
    whoever failed (a generation's error event); None: the code's default.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        status: int | None = None,
        retry_after_s: float | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(code, message)
        self.status = status
        self.retry_after_s = retry_after_s
        self.retryable_word = retryable
