"""The CPU cache between the store and the slots holds at most --cpu-adapter-memory bytes."""

from __future__ import annotations

import threading
from pathlib import Path

from server.adapters.common import AdapterRef
from server.adapters.loader import folder_loader
from server.adapters.slots import SlotTable
from server.engine.tiers import AdapterTiers
from server.metrics import Metrics
from tests.adapter_factory import make_peft_adapter


def make_tiers(model, cpu_bytes: int) -> tuple[AdapterTiers, Metrics]:
    load = folder_loader(model, 64)
    metrics = Metrics()
    table = SlotTable(1, model.shape, model.dtype, model.device, max_rank=64)
    return AdapterTiers(table, cpu_bytes, lambda ref: load(ref.path), lambda: None, metrics), metrics


def bring(tiers: AdapterTiers, ref: AdapterRef) -> None:
    """Load `ref` into slot 0, from the CPU cache or from disk, and wait until it is installed."""
    tiers.start_load(0, ref)
    done = threading.Event()
    for _ in range(2000):
        assert not tiers.poll()
        if tiers.slots[0].ready:
            done.set()
            break
        done.wait(0.005)
    assert done.is_set(), f"{ref.key} never loaded"


def loads(metrics: Metrics, source: str) -> float:
    return metrics.adapter_loads.labels(source=source)._value.get()


def refs(model_dir: Path, root: Path, kinds: list[str]) -> list[AdapterRef]:
    out = []
    for i, kind in enumerate(kinds):
        folder = make_peft_adapter(model_dir, kind, root / f"a{i}", seed=i)
        out.append(AdapterRef(f"a{i}", 1, folder, kind.upper(), digest=f"{i:012d}"))
    return out


def test_the_cache_keeps_the_most_recent_adapters_that_fit_its_bytes(tiny_model, tiny_model_dir, tmp_path):
    a, b, c = refs(tiny_model_dir, tmp_path, ["prompt", "prompt", "prompt"])
    size = folder_loader(tiny_model, 64)(a.path).nbytes
    tiers, metrics = make_tiers(tiny_model, cpu_bytes=2 * size + size // 2)
    for ref in (a, b, c):
        bring(tiers, ref)
    assert list(tiers.cpu) == [b.key, c.key] and tiers.cpu_bytes == 2 * size
    bring(tiers, b)  # from the cache, which makes it the most recent
    assert (loads(metrics, "disk"), loads(metrics, "cpu")) == (3, 1)
    bring(tiers, a)  # from disk again; c, now the least recent, leaves
    assert list(tiers.cpu) == [b.key, a.key] and tiers.cpu_bytes == 2 * size
    assert loads(metrics, "disk") == 4
    tiers.shutdown()


def test_an_adapter_larger_than_the_cache_is_not_kept(tiny_model, tiny_model_dir, tmp_path):
    small, big = refs(tiny_model_dir, tmp_path, ["prompt", "lora"])
    small_size = folder_loader(tiny_model, 64)(small.path).nbytes
    tiers, _ = make_tiers(tiny_model, cpu_bytes=small_size)
    bring(tiers, small)
    bring(tiers, big)
    assert list(tiers.cpu) == [small.key] and tiers.cpu_bytes == small_size
    tiers.shutdown()
