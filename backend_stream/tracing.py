"""The backend's part of a request's trace (OpenTelemetry; contracts/tracing.py says when).

- A server span per ``/chat/...`` request (``TraceMiddleware``), the child of the caller's W3C
  ``traceparent`` (the bridge's call span), current for the handler and for the generation task
  the request starts (asyncio tasks copy the context they are created in).
- A ``generation`` span below the request that started it, from the request's receipt to the
  terminal event, with the seed's P0 stages as events (``settings_loaded``: room, history and
  character loaded; ``prompt_built``; ``first_token``; ``first_chunk``; ``done``), and a
  ``model.call`` span below it for the provider's stream.

Both are recorded when the generation ends, with the stage times the runner keeps anyway: no
span or attribute work per token or per chunk.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contracts.tracing import MonotonicClock, make_provider, shutdown

TRACED_PREFIX = "/chat/"
_PROPAGATOR = TraceContextTextMapPropagator()


class Tracing:
    """The backend's tracer, or none (then every method is a cheap no-op)."""

    def __init__(self, provider: TracerProvider | None) -> None:
        self._provider = provider
        self.tracer: Tracer | None = None if provider is None else provider.get_tracer("backend")
        self.clock = MonotonicClock()

    @classmethod
    def create(cls, *, enabled: bool, service_name: str) -> Tracing:
        return cls(make_provider(service_name) if enabled else None)

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    def wrap(self, app: ASGIApp) -> ASGIApp:
        return app if self.tracer is None else TraceMiddleware(app, self.tracer)

    def current(self) -> Context | None:
        """The context a generation is created in (its request's span), when tracing."""
        return None if self.tracer is None else otel_context.get_current()

    def record_generation(
        self,
        parent: Context | None,
        *,
        stages: dict[str, float | None],
        model: tuple[float | None, float | None],
        end: float,
        attributes: dict[str, AttributeValue],
        model_attributes: dict[str, AttributeValue],
        error: str | None,
    ) -> None:
        """The ``generation`` span and its ``model.call`` child, from ``time.monotonic()``
        readings: ``stages`` (``received`` is the start), ``model`` (call start, call end)."""
        tracer = self.tracer
        if tracer is None or parent is None:
            return
        ns = self.clock.ns
        start = stages.get("received") or end
        span = tracer.start_span(
            "generation", context=parent, attributes=attributes, start_time=ns(start)
        )
        for name, at in stages.items():
            if at is not None and name != "received":
                span.add_event(name, timestamp=ns(at))
        called, returned = model
        if called is not None:
            call = tracer.start_span(
                "model.call",
                context=set_span_in_context(span),
                kind=SpanKind.CLIENT,
                attributes=model_attributes,
                start_time=ns(called),
            )
            first_token = stages.get("first_token")
            if first_token is not None:
                call.add_event("first_token", timestamp=ns(first_token))
            if error is not None and returned is None:
                call.set_status(Status(StatusCode.ERROR, error))
            call.end(end_time=ns(returned if returned is not None else end))
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=ns(end))

    def shutdown(self) -> None:
        if self._provider is not None:
            shutdown(self._provider)


class TraceMiddleware:
    """A server span per ``/chat/...`` request, continuing the caller's ``traceparent``."""

    def __init__(self, app: ASGIApp, tracer: Tracer) -> None:
        self._app = app
        self._tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(TRACED_PREFIX):
            await self._app(scope, receive, send)
            return
        carrier = {
            key.decode("latin-1"): value.decode("latin-1")
            for key, value in scope["headers"]
            if key == b"traceparent" or key == b"tracestate"
        }
        parent = _PROPAGATOR.extract(carrier)
        method = scope["method"]
        span = self._tracer.start_span(
            f"{method} {scope['path']}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method},
        )
        token = otel_context.attach(set_span_in_context(span, parent))
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self._app(scope, receive, send_status)
        finally:
            otel_context.detach(token)
            route: Any = scope.get("route")
            template = getattr(route, "path", None)
            if isinstance(template, str):
                span.update_name(f"{method} {template}")
                span.set_attribute("http.route", template)
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            span.end()
