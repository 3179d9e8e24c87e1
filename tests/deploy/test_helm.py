"""deploy/helm/peftserve: rendered by Helm itself (its Go SDK, from the helm-python-sdk package),
checked against the Kubernetes schemas, and held to what the server and the llm-d router expect.

No cluster runs here: nothing is installed, the gateway never routes a request. What the router
needs from a pod is checked against a live server instead: its labels in the chart, its metrics
at /metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python
import httpx
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from server.cli import build_parser, settings_from_args
from server.config import Settings

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "peftserve"
KUBERNETES = "1.33"
# The model-server protocol of the GAIE / llm-d endpoint picker for pods labelled
# llm-d.ai/engine-type=vllm: queue and KV-cache scorers, and the LoRA-affinity scorer's gauge.
ROUTER_GAUGES = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")
LORA_INFO = "vllm:lora_requests_info"
LORA_LABELS = {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}


def render(values: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Kind -> the one manifest of that kind in the chart rendered with `values`."""
    rendered = helm_python.Chart.load(CHART).render(values or {}, name="demo", namespace="ml")
    manifests = [m for text in rendered.values() for m in yaml.safe_load_all(text) if m]
    by_kind = {m["kind"]: m for m in manifests}
    assert len(by_kind) == len(manifests), "one manifest per kind"
    return by_kind


def container(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (only,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def served_settings(manifests: dict[str, dict[str, Any]]) -> Settings:
    """What `peftserve serve` makes of the container's arguments (the image's entrypoint adds --host)."""
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0", *container(manifests)["args"]])
    return settings_from_args(args)


def test_helm_lints_the_chart_without_errors():
    report = helm_python.lint(str(CHART), strict=True, kube_version=f"v{KUBERNETES}.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"replicaCount": 3, "gpus": 1, "store": {"persistence": {"existingClaim": "shared"}}},
        {"store": {"persistence": {"enabled": False}}, "env": [{"name": "HF_HOME", "value": "/tmp"}]},
    ],
    ids=["defaults", "gpus-existing-claim", "no-volume"],
)
def test_core_manifests_are_valid_kubernetes(values):
    for kind, manifest in render(values).items():
        assert kind in {"Deployment", "Service", "PersistentVolumeClaim"}
        kubernetes_validate.validate(manifest, KUBERNETES, strict=True)


def test_defaults_serve_on_the_service_port_with_health_probes_and_the_store_volume():
    manifests = render()
    assert set(manifests) == {"Deployment", "Service", "PersistentVolumeClaim"}, "no CRDs by default"
    pod = container(manifests)
    assert pod["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert pod[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert manifests["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    assert {"name": "store", "mountPath": "/adapters"} in pod["volumeMounts"]
    volumes = manifests["Deployment"]["spec"]["template"]["spec"]["volumes"]
    claim = next(v for v in volumes if v["name"] == "store")["persistentVolumeClaim"]["claimName"]
    assert claim == manifests["PersistentVolumeClaim"]["metadata"]["name"]
    assert manifests["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    settings = served_settings(manifests)
    assert (settings.server.host, settings.server.port) == ("0.0.0.0", 8000)


def test_the_pod_outlives_the_servers_drain():
    """Kubernetes kills a pod terminationGracePeriodSeconds after SIGTERM; the drain must fit in it."""
    manifests = render()
    grace = manifests["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > served_settings(manifests).server.drain_timeout
    longer = render({"settings": {"drain-timeout": 90}, "terminationGracePeriodSeconds": 100})
    assert longer["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 100
    assert served_settings(longer).server.drain_timeout == 90


def test_settings_values_become_flags_the_server_accepts():
    values = {
        "settings": {
            "dtype": "float32",
            "max-active-adapters": 8,
            "max-adapter-bytes": 2 * 1024**3,
            "adapter": ["support=/extra/support", "legal=/extra/legal"],
            "log-level": "debug",
        },
        "port": 9000,
    }
    settings = served_settings(render(values))
    assert settings.model.dtype == "float32"
    assert settings.adapters.max_active_adapters == 8
    assert settings.adapters.max_adapter_bytes == 2 * 1024**3
    assert settings.adapters.adapter == ["support=/extra/support", "legal=/extra/legal"]
    assert settings.server.log_level == "debug"
    assert settings.server.port == 9000


@pytest.mark.parametrize("flag", ["port", "max_batch_size"])
def test_settings_the_chart_cannot_pass_fail_the_render(flag):
    with pytest.raises(helm_python.errors.HelmError, match=f"settings.{flag}"):
        render({"settings": {flag: 1}})


def test_gpus_are_requested_beside_the_other_limits():
    resources = container(render({"gpus": 2}))["resources"]
    assert resources["limits"] == {"memory": "8Gi", "nvidia.com/gpu": "2"}
    assert "nvidia.com/gpu" not in container(render())["resources"].get("limits", {})


def test_service_monitor_only_when_asked_or_when_the_operator_is_present():
    assert "ServiceMonitor" not in render()  # offline, Helm sees no monitoring.coreos.com/v1
    manifests = render({"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}}})
    monitor = manifests["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus"
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items()
        <= manifests["Service"]["metadata"]["labels"].items()
    )
    assert "http" in {p["name"] for p in manifests["Service"]["spec"]["ports"]}


def test_inference_pool_selects_the_pods_the_router_can_read():
    values = {"inferencePool": {"enabled": True, "httpRoute": {"gateway": "inference-gateway"}}}
    manifests = render(values)
    pool = manifests["InferencePool"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    pod_labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["llm-d.ai/engine-type"] == "vllm"
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pool["spec"]["targetPorts"] == [{"number": container(manifests)["ports"][0]["containerPort"]}]
    assert pool["spec"]["endpointPickerRef"] == {
        "name": "peftserve-epp",
        "port": {"number": 9002},
        "failureMode": "FailOpen",
    }
    route = manifests["HTTPRoute"]
    assert route["spec"]["parentRefs"] == [{"name": "inference-gateway"}]
    (backend,) = route["spec"]["rules"][0]["backendRefs"]
    assert backend == {
        "group": "inference.networking.k8s.io",
        "kind": "InferencePool",
        "name": pool["metadata"]["name"],
    }


def test_every_metric_the_router_reads_is_one_the_server_exposes(live_server):
    families = {
        f.name: f for f in text_string_to_metric_families(httpx.get(f"{live_server.url}/metrics").text)
    }
    for name in ROUTER_GAUGES:
        assert families[name].type == "gauge", name
    (info,) = families[LORA_INFO].samples
    assert families[LORA_INFO].type == "gauge"
    assert set(info.labels) == LORA_LABELS
    assert info.labels["max_lora"] == str(live_server.app.state.settings.adapters.max_active_adapters)
