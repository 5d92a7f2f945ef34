"""The chart rendered by the real Helm engine (helm-python-sdk, in-process), as Python objects.

Also the one place that knows which environment variables the services read: parsed from
bridge/settings.py and backend_stream/settings.py (and their READMEs' settings tables), so a
setting added to the code and not to the chart fails tests/helm/test_settings_env.py.
"""

from __future__ import annotations

import ast
import base64
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import helm_python
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "chat-bridge"
RELEASE = "chat"
NAMESPACE = "chat-ns"
FULLNAME = f"{RELEASE}-chat-bridge"
JWT = "jwt-secret-given-in-values-0123456789abcdef"
TOKEN = "backend-token-given-in-values-0123456789"
OPENAI_KEY = "sk-test-openai-key-given-in-values"
# The variables the chart fills from Secrets or from redis.*, not from <component>.env.
SECRET_VARS = {"bridge": {"JWT_SECRET", "BACKEND_TOKEN"}, "backend": {"BACKEND_TOKEN"}}
OPTIONAL_SECRET_VARS = {"backend": {"OPENAI_API_KEY", "TASK_WEBHOOK_SECRET"}}
COMPUTED_VARS = {"REDIS_URL"}
SOURCES = {
    "bridge": (ROOT / "bridge" / "settings.py", ROOT / "bridge" / "README.md"),
    "backend": (ROOT / "backend_stream" / "settings.py", ROOT / "backend_stream" / "README.md"),
}
_ENV_READERS = {
    "text", "integer", "number", "flag", "names", "choice", "get", "_raw", "optional_integer",
    "optional_number",
}  # fmt: skip
Doc = dict[str, Any]


def render(values: Mapping[str, Any] | None = None) -> list[Doc]:
    """Every object the chart renders with ``values`` (over its defaults), in template order."""
    with helm_python.Chart.load(CHART) as chart:
        manifests = chart.render(values=dict(values or {}), name=RELEASE, namespace=NAMESPACE)
    docs: list[Doc] = []
    for path in sorted(manifests):
        if path.endswith(".txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(manifests[path]) if d)
    return docs


def notes(values: Mapping[str, Any] | None = None) -> str:
    with helm_python.Chart.load(CHART) as chart:
        manifests = chart.render(values=dict(values or {}), name=RELEASE, namespace=NAMESPACE)
    return manifests[f"{CHART.name}/templates/NOTES.txt"]


def chart_values() -> dict[str, Any]:
    with helm_python.Chart.load(CHART) as chart:
        return chart.values


def find(docs: list[Doc], kind: str, name: str | None = None) -> list[Doc]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = find(docs, kind, name)
    assert len(found) == 1, (kind, name, [(d["kind"], d["metadata"]["name"]) for d in docs])
    return found[0]


def workload(docs: list[Doc], component: str) -> Doc:
    kind = "StatefulSet" if component == "redis" else "Deployment"
    return one(docs, kind, f"{FULLNAME}-{component}")


def container(docs: list[Doc], component: str) -> Doc:
    containers = workload(docs, component)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    found: Doc = containers[0]
    return found


def pod_specs(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(workload, pod spec) of every Deployment and StatefulSet."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            yield doc, doc["spec"]["template"]["spec"]


def secret_data(docs: list[Doc]) -> dict[tuple[str, str], str]:
    """(Secret name, key) -> decoded value of every rendered Secret."""
    return {
        (d["metadata"]["name"], key): base64.b64decode(value).decode()
        for d in find(docs, "Secret")
        for key, value in (d.get("data") or {}).items()
    }


def resolved_env(
    docs: list[Doc], component: str, external: Mapping[tuple[str, str], str] | None = None
) -> dict[str, str]:
    """The container's environment with every secretKeyRef looked up in the rendered Secrets
    (or in ``external``, the Secrets a test pretends the operator made)."""
    secrets = {**secret_data(docs), **(external or {})}
    env: dict[str, str] = {}
    for entry in container(docs, component).get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
            continue
        ref = entry["valueFrom"]["secretKeyRef"]
        key = (ref["name"], ref["key"])
        if key in secrets:
            env[entry["name"]] = secrets[key]
        else:
            assert ref.get("optional") is True, f"{entry['name']}: no Secret {key} rendered"
    return env


def settings_env_names(component: str) -> set[str]:
    """Every variable the service's settings read (the code), and every one its README lists."""
    settings_py, readme = SOURCES[component]
    names: set[str] = set()
    for node in ast.walk(ast.parse(settings_py.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in _ENV_READERS
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and re.fullmatch(r"[A-Z][A-Z0-9_]+", node.args[0].value)
        ):
            names.add(node.args[0].value)
    return names | readme_env_names(readme)


def readme_env_names(readme: Path) -> set[str]:
    """The first column of the README's "Settings" table."""
    text = readme.read_text()
    start = re.search(r"^## Settings.*$", text, re.MULTILINE)
    assert start is not None, f"{readme}: no '## Settings' section"
    section = text[start.end() :].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)`", section, re.MULTILINE))


def lint(values: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Lint findings of warning severity or worse (helm's info "icon is recommended" is not)."""
    report = helm_python.lint(CHART, dict(values or {}), namespace=NAMESPACE)
    findings = [m for m in report["messages"] if m["severity"] >= 2]
    return findings + [{"severity": 3, "error": e} for e in report["errors"]]
