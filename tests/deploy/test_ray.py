"""deploy/ray: its parts in-process, then on a local Ray instance with 2 engine replicas of the
tiny model behind the ingress.

One Ray instance for the module (Ray's startup is most of the cost); each Ray test deploys the
application it needs and deletes it after.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from deploy.ray.__main__ import build_parser
from deploy.ray.app import REPLICA_HEADER, absolute_paths, build_app, engine_options, requested_model
from deploy.ray.asgi import HTTPRequest, Lifespan, ResponseStart, call
from deploy.ray.metrics import merge_expositions
from deploy.ray.settings import RaySettings
from loadtest.workload import ZipfChooser
from server.api.app import create_app
from server.config import Settings
from tests.adapter_factory import make_peft_adapter
from tests.conftest import LiveServer, tiny_settings
from tests.helpers import wait_until

ADAPTERS = [f"a{i:02d}" for i in range(16)]
KINDS = ("lora", "ia3", "prompt", "prefix")
APP = "peftserve-test"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("ray-store")
    for i, name in enumerate(ADAPTERS):
        make_peft_adapter(tiny_model_dir, KINDS[i % len(KINDS)], root / name, seed=i)
    return root


@pytest.fixture(scope="module")
def settings(tiny_model_dir: Path, store: Path) -> Settings:
    return tiny_settings(tiny_model_dir, store=store, max_active_adapters=16, max_batch_size=16)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    """Ray Serve's HTTP proxy on a local Ray instance: loopback only, small, no dashboard."""
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=128 * 1024**2,
        log_to_driver=False,
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@contextlib.contextmanager
def deployed(settings: Settings, **ray_flags) -> Iterator[None]:
    ray_settings = RaySettings(replicas=2, replica_cpus=1, **ray_flags)
    serve.run(build_app(settings, ray_settings), name=APP, route_prefix="/")
    try:
        yield
    finally:
        serve.delete(APP)


def complete(url: str, model: str, prompt: str, max_tokens: int = 6) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response


def loads_per_replica(url: str) -> dict[str, float]:
    """peftserve_adapter_loads_total summed per replica, from the ingress's merged /metrics."""
    loads: Counter[str] = Counter()
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == "peftserve_adapter_loads_total":
                loads[sample.labels["replica"]] += sample.value
    return dict(loads)


def zipf_run(url: str, requests: int = 96, seed: int = 0) -> list[httpx.Response]:
    chooser = ZipfChooser(ADAPTERS, 1.0, random.Random(seed))
    models = [chooser.choose() for _ in range(requests)]
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda m: complete(url, m, "Tell me a story", max_tokens=2), models))


def post(path: str, body: dict) -> HTTPRequest:
    return HTTPRequest("POST", path, b"", [(b"content-type", b"application/json")], json.dumps(body).encode())


def test_the_adapter_to_route_by_is_the_model_field_of_a_json_post():
    assert requested_model(post("/v1/completions", {"model": "support", "prompt": "x"})) == "support"
    assert requested_model(post("/v1/adapters", {"name": "x"})) is None
    assert requested_model(HTTPRequest("POST", "/v1/completions", b"", [], b"{not json")) is None
    assert requested_model(HTTPRequest("GET", "/v1/models", b"", [], b"")) is None


def test_merged_metrics_name_each_family_once_with_every_replicas_samples():
    one = '# HELP x_total Things.\n# TYPE x_total counter\nx_total{source="disk"} 2.0\n'
    two = '# HELP x_total Things.\n# TYPE x_total counter\nx_total{source="disk"} 5.0\n'
    text = merge_expositions({"r1": one, "r2": two}).decode()
    assert text.count("# TYPE x_total counter") == 1
    samples = {s.labels["replica"]: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples == {"r1": 2.0, "r2": 5.0}


def test_the_launcher_passes_server_flags_through_and_scales_by_its_own():
    args = vars(
        build_parser().parse_args(["--max-batch-size", "8", "--replicas", "2", "--max-replicas", "4"])
    )
    settings = Settings.load({k: v for k, v in args.items() if k in Settings.fields()})
    ray_settings = RaySettings(**{k: v for k, v in args.items() if k in RaySettings.model_fields})
    options = engine_options(settings, ray_settings)
    assert options["autoscaling_config"]["min_replicas"] == 2
    assert options["autoscaling_config"]["max_replicas"] == 4
    assert options["max_ongoing_requests"] == 8, "a replica takes as many requests as it batches"
    with pytest.raises(ValueError, match="--max-replicas 1 is below --replicas 2"):
        RaySettings(replicas=2, max_replicas=1)


def test_replicas_get_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = absolute_paths(Settings.load({"store": "store", "adapter": ["a=adapters/a"]}))
    assert settings.adapters.store == tmp_path / "store"
    assert settings.adapters.adapter == [f"a={tmp_path / 'adapters' / 'a'}"]


def test_a_caller_that_stops_reading_a_stream_cancels_the_request(tiny_model_dir, tiny_model):
    app = create_app(tiny_settings(tiny_model_dir), tiny_model)
    body = {"model": tiny_model.name, "prompt": "Once", "max_tokens": 400, "stream": True, "temperature": 0}

    async def scenario() -> None:
        lifespan = Lifespan(app)
        await lifespan.start()
        try:
            parts = call(app, post("/v1/completions", body), "r1")
            start = await anext(parts)
            assert isinstance(start, ResponseStart) and start.status == 200 and start.replica == "r1"
            assert (await anext(parts)).startswith(b"data: ")
            await parts.aclose()
            registry = app.state.metrics.registry
            cancelled = {"reason": "cancelled"}
            await asyncio.to_thread(
                wait_until, lambda: registry.get_sample_value("peftserve_request_failure_total", cancelled)
            )
            assert (
                registry.get_sample_value("peftserve_request_success_total", {"finish_reason": "length"})
                is None
            )
        finally:
            await lifespan.stop()

    asyncio.run(scenario())


@pytest.mark.slow
def test_replicas_answer_as_a_single_server_does_and_stream(url, settings, tiny_model):
    prompts = [(name, f"Prompt {i}: the weather is") for i, name in enumerate(["a00", "a01", "a02", "a03"])]
    prompts.append((tiny_model.name, "The base model says"))
    with LiveServer(settings, tiny_model) as single:
        expected = [complete(single.url, m, p).json()["choices"][0]["text"] for m, p in prompts]
        chat = {
            "model": "a05",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 8,
            "temperature": 0,
        }
        whole = httpx.post(f"{single.url}/v1/chat/completions", json=chat, timeout=60).json()
    with deployed(settings):
        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(lambda mp: complete(url, *mp), prompts))
        assert [r.json()["choices"][0]["text"] for r in got] == expected
        assert all(r.headers[REPLICA_HEADER].startswith(f"SERVE_REPLICA::{APP}#") for r in got)

        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json={**chat, "stream": True}, timeout=60
        ) as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            events = [line.removeprefix("data: ") for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
        assert text == whole["choices"][0]["message"]["content"]

        missing = httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=60)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


@pytest.mark.slow
def test_affinity_shrinks_the_set_of_adapters_each_replica_loads(url, settings):
    counts = {}
    for affinity in (True, False):
        with deployed(settings, affinity=affinity):
            zipf_run(url)
            counts[affinity] = loads_per_replica(url)
    print(f"adapter loads per replica: affinity on {counts[True]}, off {counts[False]}")
    on, off = sorted(counts[True].values()), sorted(counts[False].values())
    assert len(on) == len(off) == 2
    assert max(on) < min(off), counts
    assert sum(on) <= 0.75 * sum(off), counts


@pytest.mark.slow
def test_killing_a_replica_loses_no_request_that_was_not_running_on_it(url, settings):
    with deployed(settings):
        first = complete(url, "a00", "warm up")
        victim = first.headers[REPLICA_HEADER]
        models = [ADAPTERS[i % 8] for i in range(32)]
        with ThreadPoolExecutor(8) as pool:
            pending = [pool.submit(complete, url, m, f"request {i}", 24) for i, m in enumerate(models)]
            pending[4].result()  # the run is under way
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            answered = [p.result() for p in pending]
        assert all(r.status_code == 200 for r in answered)
        after = [complete(url, m, "after the kill") for m in ADAPTERS[:4]]
        assert all(r.headers[REPLICA_HEADER] != victim for r in after)
