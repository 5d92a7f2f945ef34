"""The Dockerfile's shape (no Docker engine here to build it): locked installs, a non-root numeric
user the chart runs as, and the commands and ports the chart uses."""

from __future__ import annotations

import fnmatch
import json
import re

from tests.helm.chart import ROOT, chart_values, container, render

DOCKERFILE = ROOT / "Dockerfile"


def stages() -> list[list[str]]:
    """Instructions (continuation lines joined) per build stage."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    result: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            result.append([])
        if result:
            result[-1].append(line)
    return result


def test_builder_installs_uv_by_hash_and_the_locked_packages_without_dev_or_extras() -> None:
    builder, runtime = stages()
    assert re.fullmatch(r"FROM \S+ AS builder", builder[0])
    assert "COPY .ci/uv.txt /tmp/uv.txt" in builder
    (pip,) = [i for i in builder if "pip install" in i]
    assert "--require-hashes" in pip and "-r /tmp/uv.txt" in pip
    syncs = [i for i in builder if "uv sync" in i]
    assert len(syncs) == 2
    for sync in syncs:
        assert "--locked" in sync and "--no-dev" in sync
        assert "--all-extras" not in sync and "--extra" not in sync
    assert not [i for i in runtime if "uv" in i.split()[0:3] or "/opt/uv" in i]


def test_runtime_runs_as_the_numeric_non_root_user_the_chart_sets() -> None:
    runtime = stages()[-1]
    (user,) = [i for i in runtime if i.startswith("USER ")]
    uid, gid = (int(part) for part in user.split()[1].split(":"))
    assert uid != 0 and gid != 0
    values = chart_values()
    assert values["podSecurityContext"]["runAsUser"] == uid
    assert values["securityContext"]["runAsUser"] == uid
    assert values["podSecurityContext"]["runAsGroup"] == gid
    assert any(i.startswith("COPY --from=builder /app/.venv /app/.venv") for i in runtime)


def test_default_command_and_ports_are_the_charts() -> None:
    runtime = stages()[-1]
    (cmd,) = [i for i in runtime if i.startswith("CMD ")]
    docs = render()
    bridge = container(docs, "bridge")
    assert json.loads(cmd[len("CMD ") :]) == bridge["command"] + bridge["args"]
    (expose,) = [i for i in runtime if i.startswith("EXPOSE ")]
    ports = {int(p) for p in expose.split()[1:]}
    assert ports == {container(docs, c)["ports"][0]["containerPort"] for c in ("bridge", "backend")}
    env = next(i for i in runtime if i.startswith("ENV "))
    assert "PATH=/app/.venv/bin:" in env  # the chart's command is a bare "python"


def test_everything_the_build_copies_exists_and_is_not_docker_ignored() -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    builder = stages()[0]
    copied = [src for i in builder if i.startswith("COPY ") for src in i.split()[1:-1]]
    assert {"pyproject.toml", "uv.lock", "bridge", "backend_stream", "contracts"} <= set(copied)
    for src in copied:
        assert (ROOT / src).exists(), src
        assert not [p for p in ignored if fnmatch.fnmatch(src, p.rstrip("/"))], src
    for needed in (".venv", ".git", "tests", "node_modules"):
        assert needed in ignored
