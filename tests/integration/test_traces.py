"""One trace per request across both processes, received by a real OTLP/HTTP endpoint.

The receiver is a small aiohttp server on loopback; ``opentelemetry-proto`` parses what the
services' OTLP exporters post to ``/v1/traces``, as a collector would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from contracts.redis_server import free_port
from tests.bridge.harness import connected, new_id
from tests.integration.conftest import BACKEND_TOKEN, bridge_env
from tests.support.backend import fast_backend_env
from tests.support.procs import ServerProcess

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    events: tuple[str, ...]
    attributes: dict[str, object]
    start_ns: int
    end_ns: int
    error: bool


@dataclass
class Receiver:
    port: int
    spans: list[Span] = field(default_factory=list)
    posts: int = 0

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]

    async def request_span(self, request_id: str, wait_s: float = 15.0) -> Span:
        """The bridge's ``send_message`` span of ``request_id``."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            for s in self.spans:
                if s.name == "send_message" and s.attributes.get("chat.request_id") == request_id:
                    return s
            await asyncio.sleep(0.1)
        raise AssertionError(f"no send_message span of {request_id} received")

    async def wait_for(self, trace_id: str, names: set[str], wait_s: float = 15.0) -> list[Span]:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            found = self.trace(trace_id)
            if names <= {s.name for s in found}:
                return found
            await asyncio.sleep(0.1)
        got = sorted((s.service, s.name) for s in self.trace(trace_id))
        raise AssertionError(f"spans {sorted(names)} not all received; got {got}")


def _value(v: object) -> object:
    kind = v.WhichOneof("value")  # type: ignore[attr-defined]
    return getattr(v, kind) if kind else None


async def _receive(receiver: Receiver, request: web.Request) -> web.Response:
    body = ExportTraceServiceRequest()
    body.ParseFromString(await request.read())
    receiver.posts += 1
    for resource_spans in body.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        service = str(resource.get("service.name"))
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                receiver.spans.append(
                    Span(
                        service=service,
                        name=s.name,
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex(),
                        events=tuple(e.name for e in s.events),
                        attributes={a.key: _value(a.value) for a in s.attributes},
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        error=s.status.code == 2,
                    )
                )
    return web.Response(
        body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
    )


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver(port=free_port())

    async def handle(request: web.Request) -> web.Response:
        return await _receive(found, request)

    app = web.Application()
    app.router.add_post("/v1/traces", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", found.port)
    await site.start()
    try:
        yield found
    finally:
        await runner.cleanup()


def _otel_env(receiver: Receiver) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


@pytest.fixture
def traced(redis_url: str, receiver: Receiver) -> Iterator[tuple[str, Receiver]]:
    env = {**fast_backend_env(redis_url, BACKEND_TOKEN), **_otel_env(receiver)}
    with ServerProcess.python_module("backend_stream", env=env) as backend:
        bridge_vars = {**bridge_env(redis_url, backend), **_otel_env(receiver)}
        with ServerProcess.python_module("bridge", env=bridge_vars) as bridge:
            yield bridge.url, receiver


def _by_name(spans: list[Span]) -> dict[str, Span]:
    return {s.name: s for s in spans}


async def _send(url: str, content: str) -> tuple[str, int]:
    """Send one message and wait for its end; (requestId, chunks the sender received)."""
    user, room, rid = new_id("user"), new_id("room"), new_id("req")
    async with connected(url, user) as client:
        assert (await client.call("join_room", {"roomId": room}))["ok"] is True
        payload = {"roomId": room, "content": content, "requestId": rid}
        assert (await client.call("send_message", payload))["ok"] is True
        await client.wait_for("message_ack", wait_s=20)
    return rid, len(client.named("ai_message_chunk"))


async def test_one_message_is_one_trace_across_bridge_backend_and_model(
    traced: tuple[str, Receiver],
) -> None:
    url, receiver = traced
    rid, chunks = await _send(url, "[[tps=100]] [[tokens=30]] hello traces")
    assert chunks >= 5
    root = await receiver.request_span(rid)  # the trace, found by the bridge's request id
    names = {"send_message", "stream", "POST /chat/messages/stream", "generation", "model.call"}
    spans = _by_name(await receiver.wait_for(root.trace_id, names))

    assert root.service == "chat-bridge" and root.parent_id == ""
    assert {"accepted", "first_chunk"} <= set(root.events)
    assert root.attributes["chat.result_path"] == "stream" and root.attributes["chat.ok"] is True
    stream = spans["stream"]
    assert stream.service == "chat-bridge" and stream.parent_id == root.span_id
    request = spans["POST /chat/messages/stream"]
    assert request.service == "chat-backend"
    assert request.parent_id == stream.span_id  # the backend continued the bridge's traceparent
    gen = spans["generation"]
    assert gen.service == "chat-backend" and gen.parent_id == request.span_id
    assert list(gen.events) == [
        "settings_loaded", "prompt_built", "first_token", "first_chunk", "done",
    ]  # fmt: skip
    model = spans["model.call"]
    assert model.parent_id == gen.span_id and model.attributes["gen_ai.system"] == "scripted"
    assert int(str(model.attributes["gen_ai.usage.output_tokens"])) > 0
    # nested in time as in structure (one clock per process, converted to epoch time)
    assert root.start_ns <= stream.start_ns <= request.start_ns <= gen.start_ns
    assert model.end_ns <= gen.end_ns
    assert not any(s.error for s in spans.values())
    # per request, never per chunk: a reply of many chunks is these five spans and no more
    await asyncio.sleep(0.5)
    assert len(receiver.trace(root.trace_id)) == len(names)
    assert len(root.events) == 2 and len(gen.events) == 5


async def test_the_fallback_is_a_child_span_with_the_backends_complete_request_below_it(
    traced: tuple[str, Receiver],
) -> None:
    url, receiver = traced
    rid, _ = await _send(url, "[[fail_after=3]] break the stream")
    root = await receiver.request_span(rid)
    spans = await receiver.wait_for(root.trace_id, {"stream", "fallback", "POST /chat/messages"})
    named = _by_name(spans)
    assert named["stream"].error  # the stream broke: its span says so
    assert named["fallback"].parent_id == root.span_id
    assert named["POST /chat/messages"].parent_id == named["fallback"].span_id
    assert root.attributes["chat.result_path"] == "fallback"
    # every backend span of this request belongs to this one trace
    backend_spans = [s for s in receiver.spans if s.attributes.get("chat.request_id") == rid]
    assert {s.trace_id for s in backend_spans} == {root.trace_id}
