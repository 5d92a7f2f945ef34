"""``python -m backend_stream --host H --port P`` (console script ``chat-backend``).

The only module that reads ``os.environ``. Without ``REDIS_URL`` it starts a private Redis
(``contracts.redis_server.EmbeddedRedis``) and stops it on exit.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace

import structlog
import uvicorn

from backend_stream.app import create_app
from backend_stream.logs import configure_logging
from backend_stream.settings import Settings, SettingsError
from contracts.redis_server import EmbeddedRedis

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8100
# Young-generation GC threshold (CPython's default is 700). Every request and chunk allocates
# coroutines, dicts and futures; at the default the collector ran ~10 % of the CPU at 100 streams.
GC_GEN0_THRESHOLD = 50_000


KEEP_ALIVE_S = 75  # > the bridge's KEEPALIVE_EXPIRY_S (30 s)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="backend_stream", description=__doc__)
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    return parser.parse_args(argv)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _tune_gc() -> None:
    """Move what startup built (modules, FastAPI's routes, pydantic schemas) out of the
    collector's sight, and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = Settings.from_env(os.environ)
    except SettingsError as exc:
        print(f"backend_stream: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    log = structlog.get_logger("backend_stream")
    # uvicorn re-raises the signal it caught after its graceful shutdown: turn that into
    # SystemExit so the embedded Redis below is stopped instead of orphaned.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    embedded: EmbeddedRedis | None = None
    if settings.redis_url is None:
        embedded = EmbeddedRedis().start()
        settings = replace(settings, redis_url=embedded.url)
        log.info("embedded_redis_started", port=embedded.port)
    try:
        config = uvicorn.Config(
            create_app(settings),
            host=args.host,
            port=args.port,
            log_config=None,
            access_log=False,
            # Idle keep-alive connections outlive the bridge's (bridge/upstream.py keeps them
            # 30 s): with uvicorn's default of 5 s the server closed connections the bridge could
            # pick for its next request in that very instant, which then failed and fell back.
            timeout_keep_alive=KEEP_ALIVE_S,
            timeout_graceful_shutdown=5,
        )
        _tune_gc()
        uvicorn.Server(config).run()
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
