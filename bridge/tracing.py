"""One trace per ``send_message`` (OpenTelemetry; contracts/tracing.py says when it is on).

The request's span (``send_message``, from the receipt of the event to its terminal event) has
a child per backend call: ``stream`` (open and read the stream), one ``resume`` per resume, and
``fallback`` / ``complete`` (``POST /chat/messages``). Each child's context is the
``traceparent`` of its call, so the backend's spans hang below the call that caused them.
``accepted`` and ``first_chunk`` are events of the request span, added at its end with their
real times: nothing here runs per chunk. With tracing off every request still sends a fresh
``traceparent`` (one id per request across both services' logs), and no span is made.
"""

from __future__ import annotations

import secrets

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, set_span_in_context
from opentelemetry.util.types import AttributeValue

from contracts.tracing import MonotonicClock, format_traceparent, make_provider, shutdown


def random_traceparent() -> str:
    """A fresh W3C trace context for one request (bridge -> backend -> model)."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


class CallSpan:
    """One backend call of a request; ``traceparent`` is the header that call sends."""

    __slots__ = ("_span", "traceparent")

    def __init__(self, span: Span | None, traceparent: str) -> None:
        self._span = span
        self.traceparent = traceparent

    def end(self, error: BaseException | None = None) -> None:
        span, self._span = self._span, None
        if span is None:
            return
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.end()


class RequestTrace:
    """The trace of one request; a no-op (but for its ``traceparent``) with tracing off."""

    __slots__ = ("_clock", "_span", "_tracer", "traceparent")

    def __init__(
        self, tracer: Tracer | None, span: Span | None, clock: MonotonicClock | None
    ) -> None:
        self._tracer = tracer
        self._span = span
        self._clock = clock
        self.traceparent = (
            random_traceparent() if span is None else format_traceparent(span.get_span_context())
        )

    @classmethod
    def off(cls) -> RequestTrace:
        return cls(None, None, None)

    def call(self, name: str) -> CallSpan:
        if self._tracer is None or self._span is None:
            return CallSpan(None, self.traceparent)
        span = self._tracer.start_span(
            name, context=set_span_in_context(self._span), kind=SpanKind.CLIENT
        )
        return CallSpan(span, format_traceparent(span.get_span_context()))

    def end(
        self,
        *,
        ok: bool,
        attributes: dict[str, AttributeValue],
        events: dict[str, float | None],
    ) -> None:
        """End the request span; ``events`` maps names to ``time.monotonic()`` readings."""
        span, self._span = self._span, None
        if span is None or self._clock is None:
            return
        for name, at in events.items():
            if at is not None:
                span.add_event(name, timestamp=self._clock.ns(at))
        span.set_attributes(attributes)
        if not ok:
            span.set_status(Status(StatusCode.ERROR, str(attributes.get("chat.code", "failed"))))
        span.end()


class Tracing:
    """The bridge's tracer (or none); ``request`` starts a request's trace."""

    def __init__(self, provider: TracerProvider | None) -> None:
        self._provider = provider
        self._tracer = None if provider is None else provider.get_tracer("bridge")
        self._clock = MonotonicClock()

    @classmethod
    def create(cls, *, enabled: bool, service_name: str) -> Tracing:
        return cls(make_provider(service_name) if enabled else None)

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def request(
        self, name: str, received_at: float, attributes: dict[str, AttributeValue]
    ) -> RequestTrace:
        if self._tracer is None:
            return RequestTrace.off()
        span = self._tracer.start_span(
            name,
            kind=SpanKind.SERVER,
            attributes=attributes,
            start_time=self._clock.ns(received_at),
        )
        return RequestTrace(self._tracer, span, self._clock)

    def shutdown(self) -> None:
        if self._provider is not None:
            shutdown(self._provider)
