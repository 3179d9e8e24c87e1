"""Every Prometheus metric the server exposes, declared in one place.

Counters and histograms are updated as things happen (mostly on the engine thread). Gauges
that describe the engine's state are read from a snapshot at scrape time, so they cost
nothing between scrapes. Names use base units; counters end in `_total`. The `vllm:` gauges
follow the model-server protocol of the Kubernetes Gateway API Inference Extension, so its
endpoint picker can route by adapter affinity. Adapter residency (which adapters are warm in a
device slot, which only in the CPU cache) is exposed twice: as `peftserve_adapter_resident`,
and under the names of vLLM's open proposal for loaded-adapter metrics
(vllm-project/vllm#45411, #54830; asked for by llm-d-router#1500), `vllm:lora_adapter_loaded`
with `level` "gpu" (a device slot, whatever the device) or "cpu".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server import __version__

# `_created` series double the exposition and no dashboard of ours reads them.
disable_created_metrics()

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's state at one moment, for the gauges."""

    running: int
    waiting: int
    kv_cache_usage: float
    """Fraction of the KV cache blocks held by sequences (cached blocks no sequence holds are free)."""
    slots: int
    slots_used: int
    cached_adapters: int
    running_adapters: tuple[str, ...]
    waiting_adapters: tuple[str, ...]
    taken_at: float
    """Unix time the snapshot was taken."""
    resident: tuple[tuple[str, int, str], ...] = ()
    """(name, version, tier) of every adapter held: tier "device" (a ready slot) or "cpu" (cache only)."""


VLLM_LEVEL = {"device": "gpu", "cpu": "cpu"}


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], EngineSnapshot | None]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot()
        if s is None:  # the engine is gone
            return
        for name, doc, value in (
            ("peftserve_requests_running", "Requests decoding in the running batch.", s.running),
            ("peftserve_requests_waiting", "Requests waiting for a batch row.", s.waiting),
            ("peftserve_adapters_active", "Device adapter slots in use.", s.slots_used),
            ("peftserve_adapter_slots", "Device adapter slots in all.", s.slots),
            ("peftserve_adapters_cached", "Adapters parsed and kept in CPU memory.", s.cached_adapters),
            (
                "peftserve_kv_cache_usage_ratio",
                "Fraction of the KV cache holding tokens (0-1).",
                s.kv_cache_usage,
            ),
            ("vllm:num_requests_running", "Requests decoding (vLLM-compatible).", s.running),
            ("vllm:num_requests_waiting", "Requests waiting (vLLM-compatible).", s.waiting),
            ("vllm:kv_cache_usage_perc", "KV cache usage, 0-1 (vLLM-compatible).", s.kv_cache_usage),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Adapters in device slots and adapters waiting for one; value: Unix time of the reading.",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        # Separate sets: a name whose one version is in a slot while another waits counts as running.
        waiting = [name for name in s.waiting_adapters if name not in s.running_adapters]
        info.add_metric([str(s.slots), ",".join(s.running_adapters), ",".join(waiting)], s.taken_at)
        yield info
        yield from _residency(s.resident)


def _residency(resident: tuple[tuple[str, int, str], ...]) -> Iterator[Metric]:
    ours = GaugeMetricFamily(
        "peftserve_adapter_resident",
        "1 per adapter version held: tier device (in a slot, warm) or cpu (parsed in the CPU cache).",
        labels=["adapter", "version", "tier"],
    )
    for name, version, tier in resident:
        ours.add_metric([name, str(version), tier], 1)
    yield ours
    levels: dict[str, str] = {}  # by name, the warmest tier of any of its versions
    for name, _, tier in resident:
        if levels.get(name) != "gpu":
            levels[name] = VLLM_LEVEL[tier]
    loaded = GaugeMetricFamily(
        "vllm:lora_adapter_loaded",
        "1 per loaded adapter (vLLM's proposed name): level gpu = a device slot, cpu = the CPU cache.",
        labels=["adapter_name", "level", "pinned"],
    )
    for name, level in levels.items():
        loaded.add_metric([name, level, "false"], 1)
    yield loaded
    for level in ("gpu", "cpu"):
        count = sum(value == level for value in levels.values())
        yield GaugeMetricFamily(
            f"vllm:num_{level}_loaded_lora_adapters",
            f"Adapters loaded at level {level} (vLLM's proposed name; gpu = device slots).",
            value=count,
        )


@dataclass(frozen=True)
class StoreSnapshot:
    """The adapter store's index, for the gauges."""

    adapters: int
    versions: int
    unverified: int
    index_bytes: int


class _StoreCollector(Collector):
    def __init__(self, snapshot: Callable[[], StoreSnapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot()
        for name, doc, value in (
            ("peftserve_store_adapters", "Adapter names in the store's index.", s.adapters),
            ("peftserve_store_versions", "Adapter versions in the store's index.", s.versions),
            (
                "peftserve_store_unverified_versions",
                "Versions whose checksums are verified at their first load, not yet loaded.",
                s.unverified,
            ),
            ("peftserve_store_index_bytes", "Estimated memory held by the store's index.", s.index_bytes),
        ):
            yield GaugeMetricFamily(name, doc, value=value)


class _CacheConfigCollector(Collector):
    def __init__(self, block_size: int, num_blocks: int) -> None:
        self.labels = [str(block_size), str(num_blocks)]

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "KV cache configuration (vLLM-compatible), for routers that score prefix-cache affinity.",
            labels=["block_size", "num_gpu_blocks"],
        )
        info.add_metric(self.labels, 1.0)
        yield info


class Metrics:
    """The server's metrics, in a registry of their own (so several servers can share a process)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.info = Info("peftserve", "Server version and the base model it serves.", registry=r)
        self.prompt_tokens = Counter("peftserve_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generation_tokens = Counter("peftserve_generation_tokens", "Tokens generated.", registry=r)
        self.request_success = Counter(
            "peftserve_request_success", "Requests that finished normally.", ["finish_reason"], registry=r
        )
        self.request_failure = Counter(
            "peftserve_request_failure", "Requests that did not finish normally.", ["reason"], registry=r
        )
        self.adapter_loads = Counter(
            "peftserve_adapter_loads",
            "Adapters placed into a device slot, by where they came from.",
            ["source"],
            registry=r,
        )
        self.adapter_evictions = Counter(
            "peftserve_adapter_evictions", "Adapters evicted from a slot.", registry=r
        )
        self.adapter_requests = Counter(
            "peftserve_adapter_requests",
            "Generation requests by the model they named.",
            ["adapter"],
            registry=r,
        )
        self.ttft = Histogram(
            "peftserve_time_to_first_token_seconds",
            "Arrival to first token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "peftserve_inter_token_latency_seconds",
            "Time between two tokens of a request.",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "peftserve_e2e_request_latency_seconds", "Arrival to last token.", buckets=E2E_BUCKETS, registry=r
        )
        self.queue_time = Histogram(
            "peftserve_request_queue_time_seconds",
            "Arrival to joining the batch.",
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.adapter_load_time = Histogram(
            "peftserve_adapter_load_seconds",
            "Into a device slot, from disk or the CPU cache, per load.",
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        # vLLM names these counters without `_total`; prometheus_client adds it on the wire, as vLLM's does.
        self.prefix_cache_queries = Counter(
            "peftserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", registry=r
        )
        self.prefix_cache_hits = Counter(
            "peftserve_prefix_cache_hits", "Prompt tokens found in the prefix cache.", registry=r
        )
        self.vllm_prefix_cache_queries = Counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in tokens (vLLM-compatible).", registry=r
        )
        self.vllm_prefix_cache_hits = Counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in tokens (vLLM-compatible).", registry=r
        )
        self.preemptions = Counter(
            "peftserve_preemptions",
            "Running sequences preempted for KV cache blocks (recomputed later).",
            registry=r,
        )
        self.vllm_preemptions = Counter("vllm:num_preemptions", "Preemptions (vLLM-compatible).", registry=r)
        self.batch_size = Histogram(
            "peftserve_batch_size", "Sequences in each decode step.", buckets=BATCH_BUCKETS, registry=r
        )

    def describe(self, base_model: str, dtype: str, quantization: str) -> None:
        self.info.info(
            {"version": __version__, "base_model": base_model, "dtype": dtype, "quantization": quantization}
        )

    def describe_cache(self, block_size: int, num_blocks: int) -> None:
        """Export vllm:cache_config_info for this engine's cache."""
        self.registry.register(_CacheConfigCollector(block_size, num_blocks))

    def prefix_lookup(self, queried: int, hit: int) -> None:
        """Count one prefix cache lookup, in tokens, under both names."""
        for counter, value in (
            (self.prefix_cache_queries, queried),
            (self.vllm_prefix_cache_queries, queried),
            (self.prefix_cache_hits, hit),
            (self.vllm_prefix_cache_hits, hit),
        ):
            counter.inc(value)

    def preempted(self) -> None:
        self.preemptions.inc()
        self.vllm_preemptions.inc()

    def watch(self, snapshot: Callable[[], EngineSnapshot | None]) -> None:
        """Read the state gauges from `snapshot` at every scrape; None (the engine is gone): no gauges."""
        self.registry.register(_SnapshotCollector(snapshot))

    def watch_store(self, snapshot: Callable[[], StoreSnapshot]) -> None:
        """Read the adapter store gauges from `snapshot` at every scrape."""
        self.registry.register(_StoreCollector(snapshot))
