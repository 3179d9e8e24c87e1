"""The CPU cache between the store and the slots holds at most --cpu-adapter-memory bytes."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from server.adapters.common import AdapterRef
from server.adapters.loader import folder_loader
from server.adapters.slots import SlotTable
from server.engine.tiers import AdapterTiers
from server.metrics import Metrics
from tests.adapter_factory import make_peft_adapter


def make_tiers(model, cpu_bytes: int, dtype: torch.dtype | None = None) -> tuple[AdapterTiers, Metrics]:
    load = folder_loader(model, 64, own=False)  # as the engine loads
    metrics = Metrics()
    table = SlotTable(1, model.shape, dtype or model.dtype, model.device, max_rank=64)
    return AdapterTiers(table, cpu_bytes, lambda ref: load(ref.path), lambda: None, metrics), metrics


def bring(tiers: AdapterTiers, ref: AdapterRef) -> None:
    """Load `ref` into slot 0, from the CPU cache or from disk, wait until it is installed and cached."""
    tiers.start_load(0, ref)
    done = threading.Event()
    for _ in range(2000):
        assert not tiers.poll()
        if tiers.slots[0].ready:
            done.set()
            break
        done.wait(0.005)
    assert done.is_set(), f"{ref.key} never loaded"
    tiers.settle()  # the CPU cache's copy is made after the slot is ready


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
    size = folder_loader(tiny_model, 64)(a.path).nbytes  # owned, as the cache holds it
    tiers, metrics = make_tiers(tiny_model, cpu_bytes=2 * size + size // 2)
    for ref in (a, b, c):
        bring(tiers, ref)
    assert tiers.cached() == [b.key, c.key] and tiers.cpu_bytes == 2 * size
    bring(tiers, b)  # from the cache, which makes it the most recent
    assert (loads(metrics, "disk"), loads(metrics, "cpu")) == (3, 1)
    bring(tiers, a)  # from disk again; c, now the least recent, leaves
    assert tiers.cached() == [b.key, a.key] and tiers.cpu_bytes == 2 * size
    assert loads(metrics, "disk") == 4
    tiers.shutdown()


def test_an_adapter_larger_than_the_cache_is_not_kept(tiny_model, tiny_model_dir, tmp_path):
    small, big = refs(tiny_model_dir, tmp_path, ["prompt", "lora"])
    small_size = folder_loader(tiny_model, 64)(small.path).nbytes
    tiers, _ = make_tiers(tiny_model, cpu_bytes=small_size)
    bring(tiers, small)
    bring(tiers, big)
    assert tiers.cached() == [small.key] and tiers.cpu_bytes == small_size
    tiers.shutdown()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_load_from_disk_fills_the_slot_as_a_load_from_the_cache_does(
    tiny_model, tiny_model_dir, tmp_path, dtype
):
    """The slot is filled straight from the file; the cached copy is packed apart: same rows, bit for bit."""
    (ref,) = refs(tiny_model_dir, tmp_path, ["lora"])
    tiers, metrics = make_tiers(tiny_model, cpu_bytes=1 << 30, dtype=dtype)
    bring(tiers, ref)
    from_disk = {key: table.get(0) for key, table in tiers.table.lowrank.items()}
    from_disk = {key: tuple(t.clone() for t in w if t is not None) for key, w in from_disk.items()}
    tiers.start_load(0, AdapterRef("other", 1, ref.path, "LORA", digest="x" * 12))  # evicts it
    tiers.settle()
    tiers.poll()
    bring(tiers, ref)
    assert (loads(metrics, "disk"), loads(metrics, "cpu")) == (2, 1)
    for key, table in tiers.table.lowrank.items():
        cached = [t for t in table.get(0) if t is not None]
        assert all(torch.equal(x, y) for x, y in zip(from_disk[key], cached, strict=True)), key
    tiers.shutdown()


def test_loads_run_on_the_loader_thread(tiny_model, tiny_model_dir, tmp_path, monkeypatch):
    """Neither reading nor copying into the slot happens on the thread that calls start_load."""
    (ref,) = refs(tiny_model_dir, tmp_path, ["lora"])
    tiers, _ = make_tiers(tiny_model, cpu_bytes=1 << 30)
    threads = []
    install = tiers.table.install
    monkeypatch.setattr(
        tiers.table, "install", lambda *a: (threads.append(threading.current_thread()), install(*a))
    )
    bring(tiers, ref)
    tiers.start_load(0, AdapterRef("again", 1, ref.path, "LORA", digest="y" * 12))
    tiers.settle()
    tiers.poll()
    bring(tiers, ref)  # from the CPU cache
    assert len(threads) == 3 and threading.current_thread() not in threads
    tiers.shutdown()


def test_slot_data_is_a_copy_not_a_view_of_the_parsed_adapter(tiny_model, tiny_model_dir, tmp_path):
    """A parsed adapter may view its file; what a slot keeps by reference must not."""
    prompt, prefix = refs(tiny_model_dir, tmp_path, ["prompt", "prefix"])
    load = folder_loader(tiny_model, 64, own=False)
    table = SlotTable(2, tiny_model.shape, tiny_model.dtype, tiny_model.device, max_rank=64)
    for slot, ref in enumerate((prompt, prefix)):
        weights = load(ref.path)
        table.install(slot, weights)
        kept = [t.clone() for t in weights.tensors()]
        for t in weights.tensors():
            t.add_(1.0)
        data = table.data[slot]
        held = [t for value in data.values() for t in (value if isinstance(value, tuple) else (value,))]
        assert [torch.equal(x, y) for x, y in zip(held, kept, strict=True)] == [True] * len(kept)


def test_the_loader_thread_exits_once_its_loads_are_done(tiny_model, tiny_model_dir, tmp_path):
    """A thread that ran torch work keeps an OpenMP pool while it lives, which slows the engine's
    every op (server/torch_threads.py): the loader must not outlive its loads."""
    tiers, _ = make_tiers(tiny_model, cpu_bytes=1 << 30)
    for ref in refs(tiny_model_dir, tmp_path, ["lora", "ia3"]):
        bring(tiers, ref)  # ends with settle()
        loaders = [t.name for t in threading.enumerate() if t.name.startswith("peftserve-adapter-loader")]
        assert loaders == []


def test_adapter_loads_run_single_threaded(tiny_model, tiny_model_dir, tmp_path):
    """Under churn the loader runs for as long as the churn lasts: it must hold no OpenMP pool."""
    tiers, _ = make_tiers(tiny_model, cpu_bytes=1 << 30)
    load, threads = tiers._load, []
    tiers._load = lambda ref: threads.append(torch.get_num_threads()) or load(ref)
    (ref,) = refs(tiny_model_dir, tmp_path, ["lora"])
    bring(tiers, ref)
    assert threads == [1] and torch.get_num_threads() > 1
