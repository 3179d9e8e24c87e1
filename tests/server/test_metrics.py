"""Metrics move by exactly what a known set of requests implies, and the exposition parses."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.config import AdapterSettings, EngineSettings
from server.engine.engine import Engine
from server.engine.sampler import SamplingParams
from server.metrics import EngineSnapshot, Metrics
from server.registry.store import Store
from tests.adapter_factory import make_peft_adapter
from tests.helpers import run_until_done


def scrape(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}, through the text format and its parser."""
    text = generate_latest(metrics.registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("store")
    make_peft_adapter(tiny_model_dir, "lora", root / "alpha", seed=1)
    make_peft_adapter(tiny_model_dir, "ia3", root / "beta", seed=2)
    return root


def params(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_counters_and_histograms_follow_the_requests(tiny_model, store):
    metrics = Metrics()
    engine = Engine(
        tiny_model, EngineSettings(), AdapterSettings(max_active_adapters=1), Store(store), metrics
    )
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    refs = [None, engine.resolve_model("alpha"), None]
    handles = [engine.submit(p, params(n), r) for p, n, r in zip(prompts, (5, 7, 4), refs, strict=True)]
    run_until_done(engine, handles)
    # alpha, then beta (evicting alpha), then alpha again from the CPU cache (evicting beta)
    for name in ("beta", "alpha"):
        run_until_done(engine, [engine.submit([1, 2], params(2), engine.resolve_model(name))])
    s = scrape(metrics)
    assert value(s, "peftserve_generation_tokens_total") == 5 + 7 + 4 + 2 + 2
    assert value(s, "peftserve_prompt_tokens_total") == 3 + 2 + 4 + 2 + 2
    assert value(s, "peftserve_request_success_total", finish_reason="length") == 5
    assert value(s, "peftserve_time_to_first_token_seconds_count") == 5
    assert value(s, "peftserve_inter_token_latency_seconds_count") == (5 + 7 + 4 + 2 + 2) - 5
    assert value(s, "peftserve_e2e_request_latency_seconds_count") == 5
    assert value(s, "peftserve_request_queue_time_seconds_count") == 5
    # every token after the first comes from one decode step; the batch holds all three at first
    assert value(s, "peftserve_batch_size_sum") == (5 + 7 + 4 + 2 + 2) - 5
    assert value(s, "peftserve_adapter_loads_total", source="disk") == 2
    assert value(s, "peftserve_adapter_loads_total", source="cpu") == 1
    assert value(s, "peftserve_adapter_load_seconds_count") == 3  # from disk twice, from the CPU cache once
    assert value(s, "peftserve_adapter_evictions_total") == 2
    assert value(s, "peftserve_adapter_slots") == 1 and value(s, "peftserve_adapters_active") == 1
    assert value(s, "peftserve_adapters_cached") == 2
    info = [k for k in s if k[0] == "peftserve_info"]
    assert dict(info[0][1])["base_model"] == tiny_model.name and dict(info[0][1])["dtype"] == "float32"


def test_cancelled_requests_are_failures(tiny_model, store):
    metrics = Metrics()
    engine = Engine(tiny_model, EngineSettings(), AdapterSettings(), Store(store), metrics)
    handle = engine.submit([1, 2, 3], params(50))
    engine.step()
    handle.cancel()
    engine.step()
    assert value(scrape(metrics), "peftserve_request_failure_total", reason="cancelled") == 1


def test_vllm_lora_info_lists_running_and_waiting_adapters(tiny_model, store):
    metrics = Metrics()
    engine = Engine(
        tiny_model, EngineSettings(), AdapterSettings(max_active_adapters=1), Store(store), metrics
    )
    running = engine.submit([1, 2, 3], params(200), engine.resolve_model("alpha"))
    while engine.snapshot.running == 0:
        engine.step()
    engine.submit([4, 5], params(3), engine.resolve_model("beta"))
    engine.step()
    s = scrape(metrics)
    (labels,) = [dict(k[1]) for k in s if k[0] == "vllm:lora_requests_info"]
    assert labels == {"max_lora": "1", "running_lora_adapters": "alpha", "waiting_lora_adapters": "beta"}
    assert value(s, "vllm:num_requests_running") == 1 and value(s, "vllm:num_requests_waiting") == 1
    assert 0 < value(s, "vllm:kv_cache_usage_perc") == value(s, "peftserve_kv_cache_usage_ratio") < 1
    running.cancel()


def test_metrics_endpoint_counts_requests_per_model(live_server, tiny_model):
    url = live_server.url
    body = {"prompt": "hi", "max_tokens": 2}
    assert httpx.post(f"{url}/v1/completions", json={"model": tiny_model.name, **body}).status_code == 200
    assert httpx.post(f"{url}/v1/completions", json={"model": "no-such", **body}).status_code == 404
    too_long = {"model": tiny_model.name, "prompt": "hi", "max_tokens": 10**6}
    assert httpx.post(f"{url}/v1/completions", json=too_long).status_code == 400
    reply = httpx.get(f"{url}/metrics")
    assert reply.headers["content-type"].startswith("text/plain")
    families = {f.name for f in text_string_to_metric_families(reply.text)}
    for name in (
        "peftserve_requests_running",
        "peftserve_requests_waiting",
        "peftserve_adapters_active",
        "peftserve_adapter_slots",
        "peftserve_adapters_cached",
        "peftserve_kv_cache_usage_ratio",
        "peftserve_prompt_tokens",
        "peftserve_generation_tokens",
        "peftserve_request_success",
        "peftserve_request_failure",
        "peftserve_adapter_loads",
        "peftserve_adapter_evictions",
        "peftserve_adapter_requests",
        "peftserve_time_to_first_token_seconds",
        "peftserve_inter_token_latency_seconds",
        "peftserve_e2e_request_latency_seconds",
        "peftserve_request_queue_time_seconds",
        "peftserve_adapter_load_seconds",
        "peftserve_batch_size",
        "peftserve_info",
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:lora_requests_info",
        "vllm:cache_config_info",
        "peftserve_prefix_cache_queries",
        "peftserve_prefix_cache_hits",
        "vllm:prefix_cache_queries",
        "vllm:prefix_cache_hits",
        "peftserve_preemptions",
        "vllm:num_preemptions",
    ):
        assert name in families, name
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(reply.text)
        for s in f.samples
    }
    assert value(samples, "peftserve_adapter_requests_total", adapter=tiny_model.name) == 2
    assert value(samples, "peftserve_adapter_requests_total", adapter="other") == 1
    assert value(samples, "peftserve_request_failure_total", reason="invalid_request") == 2


def test_cache_config_prefix_cache_and_usage_gauges(tiny_model):
    metrics = Metrics()
    engine = Engine(tiny_model, EngineSettings(block_size=4, kv_cache_memory="64KiB"), metrics=metrics)
    s = scrape(metrics)
    assert (
        value(s, "vllm:cache_config_info", block_size="4", num_gpu_blocks=str(engine.cache.num_blocks)) == 1
    )
    prompt = list(range(100, 118))  # 18 tokens: 4 full blocks before the last token
    run_until_done(engine, [engine.submit(prompt, params(3))])
    run_until_done(engine, [engine.submit(prompt, params(3))])
    s = scrape(metrics)
    for prefix in ("peftserve_", "vllm:"):
        assert value(s, f"{prefix}prefix_cache_queries_total") == 2 * 18
        assert value(s, f"{prefix}prefix_cache_hits_total") == 16  # the second request, its 4 full blocks
    assert value(s, "vllm:kv_cache_usage_perc") == 0  # blocks that are only cached count as free
    running = engine.submit(prompt, params(8))
    engine.step()
    s = scrape(metrics)
    held = -(-(18 + 1) // 4)
    assert value(s, "vllm:kv_cache_usage_perc") == pytest.approx(held / engine.blocks.capacity)
    assert value(s, "peftserve_kv_cache_usage_ratio") == value(s, "vllm:kv_cache_usage_perc")
    running.cancel()


def test_a_repeated_prompt_over_http_hits_the_prefix_cache_and_answers_the_same(live_server, tiny_model):
    url = live_server.url
    body = {
        "model": tiny_model.name,
        "prompt": "Summarise the following text in one line. " * 8,
        "max_tokens": 8,
        "temperature": 0,
    }
    texts = [httpx.post(f"{url}/v1/completions", json=body).json()["choices"][0]["text"] for _ in range(2)]
    assert texts[0] == texts[1]
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
        for s in f.samples
    }
    prompt_tokens = len(tiny_model.tokenizer(body["prompt"]).input_ids)
    assert value(samples, "vllm:prefix_cache_queries_total") == 2 * prompt_tokens
    assert value(samples, "vllm:prefix_cache_hits_total") == (prompt_tokens - 1) // 16 * 16


def test_lora_info_sets_are_separate_and_residency_takes_the_warmest_tier():
    metrics = Metrics()
    snapshot = EngineSnapshot(
        running=1,
        waiting=2,
        kv_cache_usage=0.1,
        slots=4,
        slots_used=1,
        cached_adapters=2,
        running_adapters=("a",),
        waiting_adapters=("a", "b"),  # a@2 waits while a@1 is in a slot
        taken_at=1.0,
        resident=(("a", 1, "device"), ("a", 2, "cpu"), ("c", 1, "cpu")),
    )
    metrics.watch(lambda: snapshot)
    s = scrape(metrics)
    (labels,) = [dict(k[1]) for k in s if k[0] == "vllm:lora_requests_info"]
    assert labels == {"max_lora": "4", "running_lora_adapters": "a", "waiting_lora_adapters": "b"}
    assert value(s, "peftserve_adapter_resident", adapter="a", version="2", tier="cpu") == 1
    assert value(s, "vllm:lora_adapter_loaded", adapter_name="a", level="gpu", pinned="false") == 1
    assert value(s, "vllm:lora_adapter_loaded", adapter_name="c", level="cpu", pinned="false") == 1
    levels = [dict(k[1])["level"] for k in s if k[0] == "vllm:lora_adapter_loaded"]
    assert sorted(levels) == ["cpu", "gpu"], "one series per name, at its warmest tier"
    assert value(s, "vllm:num_gpu_loaded_lora_adapters") == 1
    assert value(s, "vllm:num_cpu_loaded_lora_adapters") == 1
