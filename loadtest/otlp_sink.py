"""``python -m loadtest.otlp_sink --port P``: an OTLP/HTTP trace receiver that counts and drops.

For benchmarks with tracing on (loadtest/bench_tracing.sh): the services export to it as to a
collector; it parses each ``ExportTraceServiceRequest`` (so a malformed export is an error, not
a silent 200), counts spans per service, and prints the counts as one JSON line at SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections import Counter
from collections.abc import Sequence

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

MAX_BODY_BYTES = 16 * 1024 * 1024


def build_app(spans: Counter[str]) -> web.Application:
    reply = ExportTraceServiceResponse().SerializeToString()

    async def receive(request: web.Request) -> web.Response:
        body = ExportTraceServiceRequest()
        try:
            body.ParseFromString(await request.read())
        except Exception:  # protobuf's DecodeError (its stubs are not installed)
            return web.Response(status=400, text="not an ExportTraceServiceRequest")
        for resource_spans in body.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes
                 if a.key == "service.name"),
                "unknown",
            )  # fmt: skip
            spans[service] += sum(len(s.spans) for s in resource_spans.scope_spans)
        return web.Response(body=reply, content_type="application/x-protobuf")

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_post("/v1/traces", receive)
    return app


async def serve(host: str, port: int) -> Counter[str]:
    spans: Counter[str] = Counter()
    runner = web.AppRunner(build_app(spans), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"otlp_sink: listening on http://{host}:{port}/v1/traces", file=sys.stderr, flush=True)
    await stop.wait()
    await runner.cleanup()
    return spans


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.otlp_sink")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    spans = asyncio.run(serve(args.host, args.port))
    print(json.dumps({"spans": dict(spans)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
