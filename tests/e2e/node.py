"""Drive tests/e2e/scenario.mjs (the official socket.io-client under Node) from pytest."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
NODE_MODULES = HERE / "node_modules"


def ensure_node_modules() -> None:
    """``npm ci`` from the committed lock file when tests/e2e/node_modules is missing."""
    if all((NODE_MODULES / name).exists() for name in ("socket.io-client", "playwright-core")):
        return
    npm = shutil.which("npm")
    assert npm is not None, "npm is required for the e2e tests"
    subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=HERE, check=True, timeout=300)


def run_scenario(scenario: dict[str, Any], timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Run one scenario; return every JSON line it printed. Fails on a step timeout."""
    node = shutil.which("node")
    assert node is not None, "node is required for the e2e tests"
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(scenario, fh)
    proc = subprocess.run(
        [node, str(HERE / "scenario.mjs"), fh.name],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=HERE,
    )
    Path(fh.name).unlink(missing_ok=True)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, (
        f"scenario failed ({proc.returncode}): {records[-5:]}\n{proc.stderr}"
    )
    return records


def of(records: list[dict[str, Any]], socket: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("socket") == socket]


def events(records: list[dict[str, Any]], socket: str, name: str) -> list[Any]:
    return [r["data"] for r in of(records, socket) if r["kind"] == "event" and r["event"] == name]
