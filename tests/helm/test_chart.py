"""helm/chat-bridge rendered by the real Helm engine: lint, Kubernetes schemas, and the promises
of helm/README.md (security, probes, secrets, Redis, NetworkPolicy, Ingress, HPA, monitoring)."""

from __future__ import annotations

import json
from typing import Any

import helm_python
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from tests.helm.chart import (
    CHART,
    FULLNAME,
    JWT,
    NAMESPACE,
    OPENAI_KEY,
    RELEASE,
    TOKEN,
    Doc,
    chart_values,
    container,
    find,
    lint,
    notes,
    one,
    pod_specs,
    render,
    resolved_env,
    workload,
)

# The oldest Kubernetes Chart.yaml admits and the newest the validator knows.
KUBE_VERSIONS = ("1.25", kubernetes_validate.latest_version())
# Custom resources of prometheus-operator: not in the Kubernetes schemas, checked by hand below.
CUSTOM_KINDS = {"PrometheusRule", "ServiceMonitor"}
CHART_FILES = CHART / "files"
EXTERNAL_REDIS_SECRET = "ops-redis"
APP_SECRET = "ops-chat-secrets"

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "external-redis-existing-secret": {
        "redis": {"enabled": False, "existingSecret": EXTERNAL_REDIS_SECRET},
        "secrets": {"jwtSecret": JWT, "backendToken": TOKEN},
    },
    "ingress-hpa-monitoring": {
        "ingress": {
            "enabled": True,
            "host": "chat.internal.test",
            "tls": [{"secretName": "chat-tls", "hosts": ["chat.internal.test"]}],
        },
        "bridge": {"autoscaling": {"enabled": True, "targetMemoryUtilizationPercentage": 80}},
        "backend": {"autoscaling": {"enabled": True}},
        "monitoring": {
            "dashboard": {"enabled": True},
            "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus"}},
            "serviceMonitor": {"enabled": True},
        },
    },
    "existing-secret-redis-url-no-netpol": {
        "secrets": {"existingSecret": APP_SECRET},
        "redis": {"enabled": False, "url": "redis://:pw@redis.ops.svc:6379/3"},
        "networkPolicy": {"enabled": False},
        "serviceAccount": {"create": False},
        "bridge": {"pdb": {"enabled": False}, "replicas": 1},
    },
    "openai": {
        "backend": {"env": {"PROVIDER": "openai", "OPENAI_MODEL": "gpt-4o-mini"}},
        "secrets": {"openaiApiKey": OPENAI_KEY, "jwtSecret": JWT, "backendToken": TOKEN},
    },
}


def rendered(name: str) -> list[Doc]:
    return render(VALUE_SETS[name])


def selector_labels(component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "chat-bridge",
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": component,
    }


@pytest.mark.parametrize("name", VALUE_SETS)
def test_chart_lints_clean(name: str) -> None:
    assert lint(VALUE_SETS[name]) == []


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(name: str, version: str) -> None:
    for doc in rendered(name):
        if doc["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_container_runs_as_non_root_on_a_read_only_root(name: str) -> None:
    docs = rendered(name)
    for doc, pod in pod_specs(docs):
        assert pod["securityContext"]["runAsNonRoot"] is True, doc["metadata"]["name"]
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            context = c["securityContext"]
            assert context["runAsNonRoot"] is True
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert context["runAsUser"] != 0
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert "emptyDir" in volumes[mounts["/tmp"]]
            assert c["resources"]["requests"] and c["resources"]["limits"]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_probes_hit_healthz_and_readyz_on_the_named_port(name: str) -> None:
    docs = rendered(name)
    for component in ("bridge", "backend"):
        c = container(docs, component)
        assert [p["name"] for p in c["ports"]] == ["http"]
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        annotations = workload(docs, component)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/path"] == "/metrics"
        assert annotations["prometheus.io/port"] == str(c["ports"][0]["containerPort"])


@pytest.mark.parametrize("name", VALUE_SETS)
def test_services_select_their_pods_and_target_a_port_the_pods_have(name: str) -> None:
    docs = rendered(name)
    for service in find(docs, "Service"):
        selector = service["spec"]["selector"]
        pods = [
            (doc, pod)
            for doc, pod in pod_specs(docs)
            if selector.items() <= doc["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(pods) == 1, service["metadata"]["name"]
        doc, pod = pods[0]
        assert doc["spec"]["selector"]["matchLabels"].items() <= selector.items()
        names = {p["name"] for c in pod["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= names


@pytest.mark.parametrize("name", VALUE_SETS)
def test_secret_values_are_never_plain_env_values(name: str) -> None:
    docs = rendered(name)
    given = {JWT, TOKEN, OPENAI_KEY}
    for _, pod in pod_specs(docs):
        for c in pod["containers"]:
            for entry in c.get("env", []):
                if entry["name"] in {"JWT_SECRET", "BACKEND_TOKEN", "OPENAI_API_KEY"}:
                    assert "value" not in entry and entry["valueFrom"]["secretKeyRef"], entry
                if entry["name"] == "REDIS_URL" and "value" in entry:
                    assert "@" not in entry["value"], "a Redis password in a plain value"
    outside_secrets = json.dumps([d for d in docs if d["kind"] != "Secret"])
    assert not [g for g in given if g in outside_secrets]
    assert "redis://:pw@" not in outside_secrets


def test_default_secrets_are_generated_and_both_services_read_the_same_token() -> None:
    docs = render()
    bridge, backend = resolved_env(docs, "bridge"), resolved_env(docs, "backend")
    assert len(bridge["JWT_SECRET"]) >= 32
    assert len(bridge["BACKEND_TOKEN"]) >= 32
    assert bridge["BACKEND_TOKEN"] == backend["BACKEND_TOKEN"]
    assert "OPENAI_API_KEY" not in backend
    # generated, not a default baked into the chart
    assert resolved_env(render(), "bridge")["JWT_SECRET"] != bridge["JWT_SECRET"]


def test_given_secrets_are_stored_and_openai_key_reaches_only_the_backend() -> None:
    docs = rendered("openai")
    bridge, backend = resolved_env(docs, "bridge"), resolved_env(docs, "backend")
    assert (bridge["JWT_SECRET"], bridge["BACKEND_TOKEN"]) == (JWT, TOKEN)
    assert (backend["BACKEND_TOKEN"], backend["OPENAI_API_KEY"]) == (TOKEN, OPENAI_KEY)
    assert "OPENAI_API_KEY" not in bridge and "JWT_SECRET" not in backend
    assert backend["PROVIDER"] == "openai"


def test_existing_secret_replaces_the_charts_secret() -> None:
    docs = rendered("existing-secret-redis-url-no-netpol")
    assert not find(docs, "Secret", f"{FULLNAME}-secrets")
    for component in ("bridge", "backend"):
        refs = [
            e["valueFrom"]["secretKeyRef"]
            for e in container(docs, component)["env"]
            if e["name"] in {"JWT_SECRET", "BACKEND_TOKEN", "OPENAI_API_KEY"}
        ]
        assert refs and {r["name"] for r in refs} == {APP_SECRET}


def test_default_model_is_the_scripted_one_and_openai_without_a_key_is_refused() -> None:
    assert resolved_env(render(), "backend")["PROVIDER"] == "scripted"
    with pytest.raises(helm_python.HelmError, match="needs secrets.openaiApiKey"):
        render({"backend": {"env": {"PROVIDER": "openai"}}})
    docs = render({"backend": {"env": {"PROVIDER": "openai"}}, "secrets": {"existingSecret": "s"}})
    assert resolved_env(docs, "backend", {("s", "BACKEND_TOKEN"): "t"})["PROVIDER"] == "openai"


def test_redis_is_a_statefulset_with_a_volume_claim_behind_a_network_policy() -> None:
    docs = render()
    redis = workload(docs, "redis")
    claims = redis["spec"]["volumeClaimTemplates"]
    assert [c["metadata"]["name"] for c in claims] == ["data"]
    assert claims[0]["spec"]["resources"]["requests"]["storage"] == "4Gi"
    c = container(docs, "redis")
    assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
    args = c["args"]
    assert args[args.index("--dir") + 1] == "/data"
    assert args[args.index("--appendonly") + 1] == "yes"
    url = f"redis://{FULLNAME}-redis:6379/0"
    assert resolved_env(docs, "bridge")["REDIS_URL"] == url
    assert resolved_env(docs, "backend")["REDIS_URL"] == url
    policy = one(docs, "NetworkPolicy", f"{FULLNAME}-redis")
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [
        {"podSelector": {"matchLabels": selector_labels("bridge")}},
        {"podSelector": {"matchLabels": selector_labels("backend")}},
    ]
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]


def test_external_redis_renders_no_redis_objects_and_reads_the_url_from_a_secret() -> None:
    docs = rendered("external-redis-existing-secret")
    redis_objects = [
        d
        for d in docs
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "redis"
    ]
    assert redis_objects == []
    assert not find(docs, "StatefulSet")
    for component in ("bridge", "backend"):
        (entry,) = [e for e in container(docs, component)["env"] if e["name"] == "REDIS_URL"]
        assert entry["valueFrom"]["secretKeyRef"] == {
            "name": EXTERNAL_REDIS_SECRET,
            "key": "REDIS_URL",
        }


def test_external_redis_url_goes_through_a_secret_of_the_chart() -> None:
    docs = rendered("existing-secret-redis-url-no-netpol")
    assert not find(docs, "StatefulSet")
    env = resolved_env(docs, "backend", {(APP_SECRET, "BACKEND_TOKEN"): "t"})
    assert env["REDIS_URL"] == "redis://:pw@redis.ops.svc:6379/3"
    with pytest.raises(helm_python.HelmError, match="needs redis.url or redis.existingSecret"):
        render({"redis": {"enabled": False}})


def test_only_the_bridge_reaches_the_backend() -> None:
    docs = render()
    policy = one(docs, "NetworkPolicy", f"{FULLNAME}-backend")
    assert policy["spec"]["podSelector"] == {"matchLabels": selector_labels("backend")}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    peers = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    assert peers == [
        {"podSelector": {"matchLabels": selector_labels("bridge")}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
    ]
    for rule in policy["spec"]["ingress"]:
        assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]


def test_the_bridge_port_is_open_to_the_ingress_controller_and_monitoring() -> None:
    docs = render({"networkPolicy": {"monitoringNamespaceSelector": {"matchLabels": {"m": "1"}}}})
    policy = one(docs, "NetworkPolicy", f"{FULLNAME}-bridge")
    assert policy["spec"]["podSelector"] == {"matchLabels": selector_labels("bridge")}
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}},
        {"namespaceSelector": {"matchLabels": {"m": "1"}}},
    ]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]


def test_network_policy_off_renders_none() -> None:
    assert not find(rendered("existing-secret-redis-url-no-netpol"), "NetworkPolicy")


def test_ingress_is_off_by_default_and_sticky_with_long_timeouts_when_on() -> None:
    assert not find(render(), "Ingress")
    docs = rendered("ingress-hpa-monitoring")
    ingress = one(docs, "Ingress", FULLNAME)
    notes_ = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert notes_[prefix + "affinity"] == "cookie"
    assert notes_[prefix + "session-cookie-name"] == "chat-bridge-affinity"
    # longer than nginx's 60 s default: an idle websocket, a stream's pauses, a 180 s request
    assert int(notes_[prefix + "proxy-read-timeout"]) > 180
    assert int(notes_[prefix + "proxy-send-timeout"]) > 180
    assert notes_[prefix + "proxy-buffering"] == "off"
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "chat.internal.test"
    (path,) = rule["http"]["paths"]
    assert path["backend"]["service"] == {"name": f"{FULLNAME}-bridge", "port": {"name": "http"}}
    assert ingress["spec"]["tls"][0]["secretName"] == "chat-tls"
    assert ingress["spec"]["ingressClassName"] == "nginx"


def test_hpa_targets_each_deployment_which_then_leaves_replicas_to_it() -> None:
    assert not find(render(), "HorizontalPodAutoscaler")
    docs = rendered("ingress-hpa-monitoring")
    for component in ("bridge", "backend"):
        deployment = workload(docs, component)
        assert "replicas" not in deployment["spec"]
        hpa = one(docs, "HorizontalPodAutoscaler", f"{FULLNAME}-{component}")
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": deployment["metadata"]["name"],
        }
        resources = [m["resource"]["name"] for m in hpa["spec"]["metrics"]]
        assert resources == (["cpu", "memory"] if component == "bridge" else ["cpu"])
    assert workload(render(), "bridge")["spec"]["replicas"] == 2


def test_pdbs_select_each_service() -> None:
    docs = render()
    for component in ("bridge", "backend"):
        pdb = one(docs, "PodDisruptionBudget", f"{FULLNAME}-{component}")
        assert pdb["spec"]["selector"] == {"matchLabels": selector_labels(component)}
        assert pdb["spec"]["maxUnavailable"] == 1
    docs = rendered("existing-secret-redis-url-no-netpol")
    assert [d["metadata"]["name"] for d in find(docs, "PodDisruptionBudget")] == [
        f"{FULLNAME}-backend"
    ]


def test_monitoring_objects_are_off_by_default() -> None:
    kinds = {d["kind"] for d in render()}
    assert not kinds & CUSTOM_KINDS
    assert not find(render(), "ConfigMap")


def test_dashboard_configmap_carries_the_charts_grafana_json() -> None:
    docs = rendered("ingress-hpa-monitoring")
    (configmap,) = find(docs, "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["namespace"] == NAMESPACE
    (text,) = configmap["data"].values()
    dashboard = json.loads(text)
    assert dashboard == json.loads((CHART_FILES / "grafana" / "dashboard.json").read_text())
    assert dashboard["panels"]


def test_prometheus_rule_is_the_charts_alerts_file() -> None:
    docs = rendered("ingress-hpa-monitoring")
    rule = one(docs, "PrometheusRule", FULLNAME)
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus"
    alerts = yaml.safe_load((CHART_FILES / "prometheus" / "alerts.yaml").read_text())
    assert rule["spec"] == alerts
    assert set(rule["spec"]) == {"groups"}
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for r in group["rules"]:
            assert ("alert" in r) != ("record" in r) and r["expr"]


def test_service_monitor_scrapes_both_services_metrics_port() -> None:
    docs = rendered("ingress-hpa-monitoring")
    monitor = one(docs, "ServiceMonitor", FULLNAME)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    selected = [
        s["metadata"]["name"]
        for s in find(docs, "Service")
        if all(
            s["metadata"]["labels"].get(e["key"]) in e["values"]
            for e in monitor["spec"]["selector"]["matchExpressions"]
        )
    ]
    assert sorted(selected) == [f"{FULLNAME}-backend", f"{FULLNAME}-bridge"]


WRONG_VALUES: dict[str, dict[str, Any]] = {
    "replicas-as-text": {"bridge": {"replicas": "two"}},
    "redis-enabled-as-text": {"redis": {"enabled": "yes"}},
    "unknown-provider": {"backend": {"env": {"PROVIDER": "anthropic"}}},
    "percent-over-100": {"bridge": {"env": {"CHAT_STREAMING_PERCENT": 150}}},
    "timeout-as-text": {"bridge": {"env": {"BRIDGE_IDLE_TIMEOUT_S": "soon"}}},
    "misspelt-setting": {"bridge": {"env": {"BRIDGE_IDLE_TIMEOUT": 3}}},
    "unknown-top-level-key": {"bridges": {"replicas": 2}},
    "secret-in-plain-env-map": {"backend": {"env": {"OPENAI_API_KEY": "sk-x"}}},
}


@pytest.mark.parametrize("name", WRONG_VALUES)
def test_schema_rejects_wrong_values_at_render_and_lint(name: str) -> None:
    with pytest.raises(helm_python.HelmError, match="values don't meet the specifications"):
        render(WRONG_VALUES[name])
    findings = lint(WRONG_VALUES[name])
    assert any("schema" in str(f["error"]) for f in findings), findings


def test_values_yaml_is_what_the_schema_checks() -> None:
    with helm_python.Chart.load(CHART) as chart:
        chart.validate_schema(chart_values())
        schema = chart.schema
    assert schema is not None
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    for component in ("bridge", "backend"):
        env_schema = schema["properties"][component]["properties"]["env"]
        assert env_schema["additionalProperties"] is False
        assert set(env_schema["properties"]) == set(chart_values()[component]["env"])


def test_notes_say_how_to_connect_and_warn_about_insecure_modes() -> None:
    text = notes()
    assert f"port-forward svc/{FULLNAME}-bridge" in text
    assert "WARNING" not in text
    text = notes({"bridge": {"env": {"BRIDGE_INSECURE_DEV_AUTH": True}}})
    assert "WARNING: bridge.env.BRIDGE_INSECURE_DEV_AUTH" in text
    text = notes(VALUE_SETS["ingress-hpa-monitoring"])
    assert "https://chat.internal.test/" in text


def test_the_task_webhook_needs_its_secret_which_reaches_only_the_backend() -> None:
    hook = {"backend": {"env": {"TASK_WEBHOOK_URL": "https://apps.example/hook"}}}
    with pytest.raises(helm_python.HelmError, match="needs secrets.taskWebhookSecret"):
        render(hook)
    secret = "webhook-secret-given-in-values-0123"
    docs = render({**hook, "secrets": {"taskWebhookSecret": secret}})
    backend, bridge = resolved_env(docs, "backend"), resolved_env(docs, "bridge")
    assert backend["TASK_WEBHOOK_SECRET"] == secret and "TASK_WEBHOOK_SECRET" not in bridge
    (entry,) = [e for e in container(docs, "backend")["env"] if e["name"] == "TASK_WEBHOOK_SECRET"]
    assert "value" not in entry and entry["valueFrom"]["secretKeyRef"]
    assert secret not in json.dumps([d for d in docs if d["kind"] != "Secret"])
    assert "TASK_WEBHOOK_SECRET" not in resolved_env(render(), "backend")
