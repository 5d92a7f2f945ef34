"""The chart and the code cannot drift: the rendered pods run here, as processes.

Redis, the backend and the bridge start with the rendered command, args and environment
(secretKeyRefs resolved from the rendered Secret). The only rewrites are the host-specific ones:
``python`` -> this interpreter, ``0.0.0.0`` -> ``127.0.0.1``, each container port -> a free
port, Redis's ``/data`` volume -> a temporary directory, and each Service's DNS name and port ->
``127.0.0.1`` and the port of the pod the Service selects (found through its selector and named
targetPort, so a Service pointing at the wrong pods or port fails here). Then both probes must
answer 200 on the rendered paths and ports, and a message streams through the bridge.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts.redis_server import find_redis_server, free_port
from tests.bridge.harness import Client, assert_contract_stream, new_id
from tests.helm.chart import JWT, TOKEN, Doc, container, find, render, resolved_env, workload
from tests.support.procs import ServerProcess

pytestmark = pytest.mark.slow

VALUES = {"secrets": {"jwtSecret": JWT, "backendToken": TOKEN}}


class Pods:
    """The rendered workloads as local processes, with the rewrites of the module docstring."""

    def __init__(self, docs: list[Doc], data_dir: Path) -> None:
        self.docs = docs
        self.data_dir = data_dir
        self.ports = {c: free_port() for c in ("redis", "backend", "bridge")}
        self.procs: dict[str, ServerProcess] = {}

    def service_hosts(self) -> dict[str, str]:
        """``name:port`` of each Service -> ``127.0.0.1:<local port of its pod>``."""
        hosts = {}
        for service in find(self.docs, "Service"):
            selected = [
                component
                for component in self.ports
                if service["spec"]["selector"].items()
                <= workload(self.docs, component)["spec"]["template"]["metadata"]["labels"].items()
            ]
            (component,) = selected
            names = {p["name"] for p in container(self.docs, component)["ports"]}
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in names
                local = f"127.0.0.1:{self.ports[component]}"
                hosts[f"{service['metadata']['name']}:{port['port']}"] = local
        return hosts

    def argv(self, component: str) -> list[str]:
        spec = container(self.docs, component)
        (port,) = spec["ports"]
        argv = []
        for arg in [*spec["command"], *spec.get("args", [])]:
            arg = {"python": sys.executable, "0.0.0.0": "127.0.0.1"}.get(arg, arg)
            arg = {"redis-server": find_redis_server(), "/data": str(self.data_dir)}.get(arg, arg)
            argv.append(str(self.ports[component]) if arg == str(port["containerPort"]) else arg)
        return argv

    def env(self, component: str) -> dict[str, str]:
        env = resolved_env(self.docs, component)
        for name, value in env.items():
            for service, local in self.service_hosts().items():
                value = value.replace(f"//{service}", f"//{local}")
            env[name] = value
        return env

    def start(self, component: str) -> ServerProcess:
        proc = ServerProcess(self.argv(component), name=component)
        if component != "redis":
            # exactly the pod's environment, not the test runner's
            proc.env = {"PATH": proc.env["PATH"], **self.env(component)}
        proc.start()
        self.procs[component] = proc
        return proc

    def probe_urls(self, component: str) -> list[str]:
        spec = container(self.docs, component)
        named = {p["name"]: p["containerPort"] for p in spec["ports"]}
        urls = []
        for probe in (spec["livenessProbe"], spec["readinessProbe"]):
            get = probe["httpGet"]
            assert named[get["port"]]
            urls.append(f"http://127.0.0.1:{self.ports[component]}{get['path']}")
        return urls

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()


def wait_200(url: str, proc: ServerProcess, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        assert proc.proc is not None and proc.proc.poll() is None, proc.output()[-3000:]
        try:
            status = httpx.get(url, timeout=2.0).status_code
            if status == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url}: {status} after {timeout_s}s\n{proc.output()[-3000:]}")


def wait_redis(port: int, proc: ServerProcess) -> None:
    import redis

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if redis.Redis(port=port, socket_timeout=1).ping():
                return
        except redis.RedisError:
            time.sleep(0.05)
    raise AssertionError(proc.output()[-3000:])


@pytest.fixture(scope="module")
def pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pods]:
    running = Pods(render(VALUES), tmp_path_factory.mktemp("redis-data"))
    try:
        wait_redis(running.ports["redis"], running.start("redis"))
        for component in ("backend", "bridge"):
            proc = running.start(component)
            for url in running.probe_urls(component):
                wait_200(url, proc)
        yield running
    finally:
        running.stop()


def test_rendered_pods_answer_their_probes_and_metrics(pods: Pods) -> None:
    for component in ("backend", "bridge"):
        for url in pods.probe_urls(component):
            assert httpx.get(url).status_code == 200
        annotations = workload(pods.docs, component)["spec"]["template"]["metadata"]
        path = annotations["annotations"]["prometheus.io/path"]
        metrics = httpx.get(f"http://127.0.0.1:{pods.ports[component]}{path}")
        assert metrics.status_code == 200 and "# TYPE" in metrics.text
    assert (pods.data_dir / "appendonlydir").is_dir()  # the volume holds the append-only file


async def test_a_message_streams_through_the_rendered_bridge_and_backend(pods: Pods) -> None:
    from bridge.auth import make_token

    env: dict[str, Any] = pods.env("bridge")
    token = make_token(env["JWT_SECRET"], new_id("user"), roles=[], ttl_s=600)
    client = Client()
    await client.connect(f"http://127.0.0.1:{pods.ports['bridge']}", auth={"token": token})
    try:
        room, rid = new_id("room"), new_id("req")
        assert (await client.call("join_room", {"roomId": room}))["ok"] is True
        ack = await client.call("send_message", {"roomId": room, "content": "hi", "requestId": rid})
        assert ack["ok"] is True and ack["path"] == "stream", ack
        (done,) = await client.wait_for("message_ack", wait_s=20)
    finally:
        await client.close()
    assert done["ok"] is True and done["path"] == "stream", done
    assert assert_contract_stream(client, rid, sender=True)
