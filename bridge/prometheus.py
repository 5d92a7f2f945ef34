"""A local Prometheus beside a stack (``python -m bridge stack --prometheus``, the tests).

Debian's ``prometheus`` binary scraping the bridge's and the backend's ``/metrics``, with the
chart's alerting rules (helm/chat-bridge/files/prometheus/alerts.yaml, when this is a source
checkout) loaded, so the dashboard's queries and the alarms can be tried on one machine.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from contracts.redis_server import free_port, stop_process

RULES = Path(__file__).resolve().parents[1] / "helm/chat-bridge/files/prometheus/alerts.yaml"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def config(targets: Mapping[str, str], *, interval_s: float, rules: Path | None) -> str:
    """prometheus.yml scraping ``targets`` (job name -> host:port) every ``interval_s``."""
    lines = [
        "global:",
        f"  scrape_interval: {interval_s:g}s",
        f"  evaluation_interval: {interval_s:g}s",
    ]
    if rules is not None:
        lines += ["rule_files:", f"  - {rules}"]
    lines.append("scrape_configs:")
    for job, address in targets.items():
        lines += [
            f"  - job_name: {job}",
            "    metrics_path: /metrics",
            "    static_configs:",
            f"      - targets: ['{address}']",
        ]
    return "\n".join(lines) + "\n"


class LocalPrometheus:
    """One ``prometheus`` process with its own config and storage in a temporary folder."""

    def __init__(
        self,
        targets: Mapping[str, str],
        *,
        host: str = "127.0.0.1",
        interval_s: float = 5.0,
        rules: Path | None = RULES,
    ) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise FileNotFoundError("no prometheus binary (Debian: apt-get install prometheus)")
        self._binary = binary
        self._dir = Path(tempfile.mkdtemp(prefix="chat-prometheus-"))
        rules = rules if rules is not None and rules.exists() else None
        (self._dir / "prometheus.yml").write_text(
            config(targets, interval_s=interval_s, rules=rules)
        )
        self.targets = len(targets)
        self.port = free_port(host)
        self.url = f"http://{host}:{self.port}"
        self._host = host
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self._dir / "prometheus.log"

    def start(self) -> LocalPrometheus:
        argv = [
            self._binary,
            f"--config.file={self._dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self._dir / 'data'}",
            f"--web.listen-address={self._host}:{self.port}",
            "--storage.tsdb.retention.time=1d",
        ]
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"prometheus not ready within {START_TIMEOUT_S:g}s")

    def wait_scraping(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until every target was scraped and is up (service discovery hands static targets to
        the scrapers in a few seconds, not at once)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                reply = httpx.get(f"{self.url}/api/v1/targets", timeout=1.0).json()
                active = reply["data"]["activeTargets"]
                if len(active) == self.targets and all(t["health"] == "up" for t in active):
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus targets not all up within {timeout_s:g}s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, STOP_TIMEOUT_S)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> LocalPrometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
