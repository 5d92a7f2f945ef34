"""``python -m bridge stack``: the whole system on embedded defaults, for a demo or a load test.

Embedded Redis, the backend as a child process (``python -m backend_stream``: the two services
never import each other), the bridge in this process. Prints the URLs, a dev JWT and, once
everything answers, one machine-readable line::

    READY {"bridgeUrl": ..., "backendUrl": ..., "redisUrl": ..., "jwtSecret": ...,
           "backendToken": ..., "token": ..., "pageUrl": ...}

``backendToken`` is a fresh random service token per stack (the backend refuses the well-known
development default unless told it is insecure); the load tester's ``--direct`` reads it here.

``pageUrl`` opens the try-it page (bridge/page.py) already connected with the dev JWT.

Ctrl-C / SIGTERM stops the bridge, then the backend, then Redis. The children are stopped with
SIGINT / SIGTERM blocked: a second signal during that cleanup (a supervisor that repeats its
SIGTERM, an impatient Ctrl-C) used to raise ``SystemExit`` in the middle of it and leave the
backend or Redis running as orphans; it is delivered once the children are gone.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import httpx

from bridge.app import Bridge
from bridge.auth import make_token
from bridge.prometheus import LocalPrometheus
from bridge.settings import DEV_JWT_SECRET, Settings
from contracts.redis_server import EmbeddedRedis, free_port, stop_process

BACKEND_START_TIMEOUT_S = 30.0
BACKEND_STOP_TIMEOUT_S = 10.0
DEV_USER = "dev-user"


def start_backend(host: str, port: int, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "backend_stream", "--host", host, "--port", str(port)]
    return subprocess.Popen(argv, env=dict(env), stdout=sys.stderr, stderr=sys.stderr)


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"backend exited with {proc.returncode} at start")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"backend not healthy within {timeout_s}s")


def run_stack(host: str, port: int, environ: Mapping[str, str], *, prometheus: bool = False) -> int:
    redis = EmbeddedRedis().start()
    backend: subprocess.Popen[bytes] | None = None
    scraper: LocalPrometheus | None = None
    try:
        backend_port = free_port(host)
        backend_url = f"http://{host}:{backend_port}"
        # A fresh service token per stack: the backend refuses the well-known dev default.
        token = environ.get("BACKEND_TOKEN") or secrets.token_urlsafe(24)
        secret = environ.get("JWT_SECRET") or DEV_JWT_SECRET
        env = {**environ, "REDIS_URL": redis.url, "BACKEND_TOKEN": token}
        env.setdefault("PROVIDER", "scripted")
        backend = start_backend(host, backend_port, env)
        wait_healthy(backend_url, backend, BACKEND_START_TIMEOUT_S)
        if prometheus:
            targets = {"chat-bridge": f"{host}:{port}", "chat-backend": f"{host}:{backend_port}"}
            scraper = LocalPrometheus(targets, host=host).start()
            env.setdefault("PROMETHEUS_URL", scraper.url)  # the rollout gates read it
        settings = Settings.from_env({**env, "BACKEND_URL": backend_url, "JWT_SECRET": secret})
        bridge = Bridge(settings, redis_url=redis.url)
        info = {
            "bridgeUrl": f"http://{host}:{port}",
            "backendUrl": backend_url,
            "redisUrl": redis.url,
            "jwtSecret": secret,
            "backendToken": token,
            "token": make_token(secret, DEV_USER, roles=["internal"], ttl_s=86_400),
        }
        info["pageUrl"] = f"{info['bridgeUrl']}/?token={info['token']}"  # JWTs are URL-safe
        admin = make_token(secret, "dev-operator", roles=["admin"], ttl_s=86_400)
        info["adminUrl"] = f"{info['bridgeUrl']}/admin#token={admin}"
        if scraper is not None:
            info["prometheusUrl"] = scraper.url

        async def announce() -> None:
            print(_banner(info), flush=True)
            print("READY " + json.dumps(info), flush=True)

        asyncio.run(bridge.serve(host, port, on_ready=announce))
        return 0
    finally:
        with _signals_deferred():
            if scraper is not None:
                scraper.stop()
            if backend is not None:
                stop_process(backend, BACKEND_STOP_TIMEOUT_S)
            redis.stop()


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT / SIGTERM until the block is done (then they are delivered as usual)."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _banner(info: Mapping[str, str]) -> str:
    return "\n".join(
        [
            "chat stack is up",
            f"  Try it: {info['pageUrl']}",
            f"  bridge   {info['bridgeUrl']}  (Socket.IO v4 at /socket.io; /healthz /metrics)",
            f"  operators: {info['adminUrl']}",
            f"  backend  {info['backendUrl']}",
            f"  redis    {info['redisUrl']}",
            *(
                [
                    f"  prometheus {info['prometheusUrl']}  (scrapes both, with the chart's alarms;"
                    " the dashboard's queries: helm/chat-bridge/files/grafana/dashboard.json)"
                ]
                if "prometheusUrl" in info
                else []
            ),
            f"  dev JWT for user {DEV_USER!r} (24 h, signed with JWT_SECRET={info['jwtSecret']}):",
            f"    {info['token']}",
            "  or from a terminal:",
            f"    python -m bridge client --url {info['bridgeUrl']} --token <JWT> --room demo",
            "  more tokens: python -m bridge token <userId> [--roles internal,admin]",
            "  Ctrl-C stops everything.",
        ]
    )
