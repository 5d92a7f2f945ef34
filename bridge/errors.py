"""The bridge's one exception tree; httpx / httpx-sse errors are translated in one place.

```
BridgeError
├── UpstreamError                      .code: the ErrorCode a client may see
│   ├── UpstreamConnectError (+ConnectionError)   cannot reach the backend / connection lost
│   │   └── UpstreamDisconnected                  a stream broke after it was open
│   ├── UpstreamTimeout      (+TimeoutError)
│   ├── UpstreamProtocolError                     wrong content-type, malformed SSE or JSON
│   └── UpstreamHttpError                         a non-2xx reply with the backend's {code, message}
└── PayloadError (+ValueError)                    a client payload that breaks the contract
```
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import aiohttp
import httpx
import httpx_sse
from redis.exceptions import RedisError

from contracts import ContractError, ErrorCode


class BridgeError(Exception):
    """Root of every error the bridge raises on purpose."""


class UpstreamError(BridgeError):
    """The backend could not be used; ``code`` is what the room is told.

    ``retryable`` is the backend's own word when the backend reported the failure (an ``error``
    event, an error body), else None and the code's default applies (CONTRACT.md section 1,
    ``ai_message_error``). ``retry_after_ms`` comes from the backend's ``Retry-After``.
    """

    code: ErrorCode = ErrorCode.BACKEND_FAILED
    retryable: bool | None = None
    retry_after_ms: int | None = None

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class UpstreamConnectError(UpstreamError, ConnectionError):
    code = ErrorCode.BACKEND_UNAVAILABLE


class UpstreamDisconnected(UpstreamConnectError):
    """An open stream ended without its terminal event (a cut, a reset, an EOF)."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    code = ErrorCode.STREAM_TIMEOUT


class UpstreamProtocolError(UpstreamError):
    code = ErrorCode.BACKEND_FAILED


class UpstreamHttpError(UpstreamError):
    """A non-2xx reply; ``status`` and the backend's own code are kept."""

    def __init__(
        self,
        status: int,
        code: ErrorCode,
        message: str,
        *,
        retryable: bool | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.retryable = retryable
        self.retry_after_ms = retry_after_ms

    @property
    def refused(self) -> bool:
        """The backend refused this request (bad input, forbidden, rate limited, gone).

        Trying the other endpoint would be refused the same way, so the bridge rejects the
        message instead of falling back. 401 is the bridge's own misconfiguration: not refused.
        """
        return 400 <= self.status < 500 and self.status != 401


class PayloadError(BridgeError, ValueError):
    """A client payload that breaks the contract; ``code`` is the answer."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @classmethod
    def from_contract(cls, exc: ContractError) -> PayloadError:
        return cls(exc.code, exc.message)


STATUS_CODES: dict[int, ErrorCode] = {
    400: ErrorCode.INVALID_PAYLOAD,
    401: ErrorCode.BACKEND_UNAVAILABLE,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    409: ErrorCode.CANCELLED,
    413: ErrorCode.MESSAGE_TOO_LONG,
    422: ErrorCode.INVALID_PAYLOAD,
    429: ErrorCode.RATE_LIMITED,
    503: ErrorCode.BACKEND_UNAVAILABLE,
    504: ErrorCode.MODEL_TIMEOUT,
}


def code_for_status(status: int) -> ErrorCode:
    return STATUS_CODES.get(status, ErrorCode.BACKEND_FAILED)


MAX_RETRY_AFTER_S = 86_400 * 2


def retry_after_ms(header: str | None) -> int | None:
    """``Retry-After`` in ms: delta-seconds, or None when absent, an HTTP date or malformed."""
    if header is None:
        return None
    value = header.strip()
    if not value.isdigit() or len(value) > 9:
        return None
    return min(int(value), MAX_RETRY_AFTER_S) * 1000


@contextmanager
def translating(what: str) -> Iterator[None]:
    """Map httpx / httpx-sse / aiohttp / asyncio errors raised inside into the tree, most
    specific first.

    ``httpx_sse.SSEError`` is a ``TransportError``, so it is caught before the transport errors.
    Messages name the operation only: a URL or a body never reaches a log line or a client.
    """
    try:
        yield
    except UpstreamError:
        raise
    except httpx_sse.SSEError:
        raise UpstreamProtocolError(f"{what}: not an event stream") from None
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout):
        raise UpstreamConnectError(f"{what}: backend unreachable") from None
    except httpx.TimeoutException:
        raise UpstreamTimeout(f"{what}: backend timed out") from None
    except TimeoutError:
        raise UpstreamTimeout(f"{what}: timed out") from None
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.CloseError):
        raise UpstreamDisconnected(f"{what}: connection lost") from None
    except httpx.HTTPError:
        raise UpstreamConnectError(f"{what}: transport error") from None
    except aiohttp.ClientError:  # what httpx-aiohttp's transport does not map to httpx's tree
        raise UpstreamDisconnected(f"{what}: connection lost") from None
    except (ValueError, KeyError, TypeError):
        raise UpstreamProtocolError(f"{what}: malformed reply") from None


class UpstreamFailed(UpstreamError):
    """The stream's own ``event: error``: the generation failed after it started."""

    retryable: bool

    def __init__(self, code: ErrorCode, message: str, *, retryable: bool) -> None:
        super().__init__(message, code=code)
        self.retryable = retryable


class SeqGap(UpstreamProtocolError):
    """A chunk arrived with a ``seq`` beyond the next expected one: resume from the last seen."""


class StoreError(BridgeError):
    """Redis (rooms, rate limits, flags) could not be used."""


@asynccontextmanager
async def store_errors(what: str) -> AsyncIterator[None]:
    """Redis failing inside the block (down, its pool exhausted) raises ``StoreError``."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise StoreError(f"{what}: redis unavailable ({type(exc).__name__})") from None
