"""What the page tests share: Chromium, the stack serving the page, a Node script's records."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from contracts.redis_server import EmbeddedRedis
from tests.bridge.harness import FAST_ENV
from tests.e2e.node import HERE, NODE_MODULES
from tests.support.procs import ServerProcess

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")


def chromium() -> str:
    """Debian's Chromium; skipped when absent, except on CI (``CI=true``), where it fails."""
    path = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"chromium not found at {CHROMIUM} (required on CI)")
        pytest.skip(f"chromium not found at {CHROMIUM}")
    return path


@contextmanager
def page_stack(backend_token: str, backend_env: Mapping[str, str]) -> Iterator[tuple[str, str]]:
    """A private Redis, the backend (scripted model, ``backend_env`` on top), one bridge serving
    the page; yields (bridge URL, Redis URL)."""
    assert (NODE_MODULES / "playwright-core").exists(), "run npm ci in tests/e2e"
    with EmbeddedRedis() as redis:
        env = {
            "REDIS_URL": redis.url,
            "BACKEND_TOKEN": backend_token,
            "PROVIDER": "scripted",
            "SCRIPTED_DIRECTIVES": "1",
            **backend_env,
        }
        with ServerProcess.python_module("backend_stream", env=env) as backend:
            bridge_env = {
                **FAST_ENV,
                "BACKEND_URL": backend.url,
                "BACKEND_TOKEN": backend_token,
                "REDIS_URL": redis.url,
                "BRIDGE_FIRST_CHUNK_TIMEOUT_S": "5",
                "BRIDGE_IDLE_TIMEOUT_S": "5",
            }
            with ServerProcess.python_module("bridge", env=bridge_env) as bridge:
                yield bridge.url, redis.url


def run_script(script: str, spec: dict[str, Any], timeout_s: float = 120.0) -> list[dict[str, Any]]:
    """Run ``node <script> <spec.json>`` here; its stdout's JSON lines, asserting exit 0."""
    node = shutil.which("node")
    assert node is not None, "node is required for the e2e tests"
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(spec, fh)
    try:
        proc = subprocess.run(
            [node, str(HERE / script), fh.name],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=HERE,
        )
    finally:
        Path(fh.name).unlink(missing_ok=True)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failed = f"{script} failed ({proc.returncode}): {records[-6:]}\n{proc.stderr}"
    assert proc.returncode == 0, failed
    return records
