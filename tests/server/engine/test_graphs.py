"""Decode steps replayed from graphs (engine/graphs.py), on the CPU: nothing is captured there, but a
"graph" re-runs the same padded static-shape code over the same input buffers, so these tests hold
what a GPU replays (buckets, padding rows, every table for every row, one input copy per step) to
the references, through the engine's own thread and through HTTP."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.adapters import lowrank
from server.config import AdapterSettings, EngineSettings
from server.engine.engine import Engine
from server.engine.graphs import DecodeGraphs, GraphCaptureError, batch_buckets, block_bucket
from server.engine.sampler import SamplingParams
from server.registry.store import Store
from tests.adapter_factory import COPY_BYTES, build_store, check_against_references
from tests.conftest import LiveServer, tiny_settings
from tests.helpers import token_ids, wait_finished

NEW_TOKENS = 8
TABLE_KINDS = ["lora", "rslora", "dora", "ia3", "prompt", "ptuning", "prefix", "adalora", "vera"]
TABLE_KINDS += ["lora_bias", "ln_tuning", "bitfit"]
"""Kinds that act through per-site tables alone: their decode steps replay graphs."""


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, tiny_model_dir, tiny_model) -> Path:
    return build_store(tmp_path_factory.mktemp("store"), tiny_model_dir, tiny_model.shape)


@pytest.fixture(autouse=True)
def torch_gather_path():
    """Padded rows take the torch gather path, as on a GPU; so does the eager side it is compared with."""
    lowrank.set_native(False)
    yield
    lowrank.set_native(True)


def graph_engine(model, store: Path, mode: str = "on", **engine) -> Engine:
    settings = EngineSettings(decode_graphs=mode, **engine)
    return Engine(model, settings, AdapterSettings(max_module_copy_bytes=COPY_BYTES), Store(store))


@contextlib.contextmanager
def running(engine: Engine) -> Iterator[Engine]:
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


def serve(engine: Engine, names: list[str | None], prompts: list[list[int]]) -> dict:
    """Every (name, prompt index) submitted at once to the engine running on its own thread."""
    jobs = [(name, i) for i in range(len(prompts)) for name in names]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    handles = [engine.submit(prompts[i], params, engine.resolve_model(n) if n else None) for n, i in jobs]
    results = wait_finished(handles, timeout=120)
    return {job: token_ids(events) for job, events in zip(jobs, results, strict=True)}


def prompts_of(model) -> list[list[int]]:
    return [model.tokenizer(t).input_ids for t in ("Hello there", "The cat sat on the", "1 2 3")]


def test_buckets_cover_every_batch_size_and_block_count():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(3) == [1, 2, 3]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert [block_bucket(n, 100) for n in (1, 2, 3, 5, 64, 65, 100)] == [1, 2, 4, 8, 64, 100, 100]


def test_table_kinds_replay_graphs_and_equal_their_references(tiny_model, tiny_model_dir, tiny_store):
    prompts = prompts_of(tiny_model)
    with running(graph_engine(tiny_model, tiny_store)) as engine:
        served = serve(engine, [None, *TABLE_KINDS], prompts)
    assert engine.graphs.replays > 0
    assert not any(engine.slots.gathers_rows(s) for s in range(engine.slots.num_slots))
    check_against_references(tiny_model, tiny_model_dir, tiny_store, prompts, served, NEW_TOKENS)


def test_every_kind_mixed_with_graphs_on_equals_its_reference(tiny_model, tiny_model_dir, tiny_store):
    """Steps holding a kind that picks rows per slot (OFT, bottlenecks, embedding and head edits) run
    eagerly, the others may replay (how they mix depends on the thread's timing); then table kinds
    alone replay on the same engine and cache: every request gets its reference."""
    prompts = prompts_of(tiny_model)
    with running(graph_engine(tiny_model, tiny_store, max_batch_size=12)) as engine:
        mixed = serve(engine, [None, *(ref.name for ref in engine.source.names())], prompts)
        replays = engine.graphs.replays
        after = serve(engine, [None, "lora", "ia3"], prompts)
    assert engine.graphs.replays > replays
    check_against_references(tiny_model, tiny_model_dir, tiny_store, prompts, mixed, NEW_TOKENS)
    check_against_references(tiny_model, tiny_model_dir, tiny_store, prompts, after, NEW_TOKENS)


def test_a_new_table_after_capture_recaptures_graphs(tiny_model, tiny_model_dir, tiny_store):
    """LoRA brings low-rank tables the base had not, IA3 scale tables LoRA had not: a graph captured
    before either would skip them, so each arrival captures the same bucket anew (on the CPU,
    where a "graph" runs its Python again, only the count shows it)."""
    prompts = prompts_of(tiny_model)[1:2]
    served = {}
    with running(graph_engine(tiny_model, tiny_store)) as engine:
        for name in (None, "lora", "ia3"):
            served |= serve(engine, [name], prompts)
    assert engine.graphs.captures == 3 and engine.graphs.replays == 3 * (NEW_TOKENS - 1)
    check_against_references(tiny_model, tiny_model_dir, tiny_store, prompts, served, NEW_TOKENS)


def test_graphs_are_on_by_default_on_cuda_only(tiny_model, tiny_store):
    on_cuda = tiny_model.device.type == "cuda"
    assert (graph_engine(tiny_model, tiny_store, mode="auto").graphs is not None) == on_cuda
    assert graph_engine(tiny_model, tiny_store, mode="off").graphs is None


def test_a_step_that_cannot_be_captured_runs_uncaptured_and_graphs_stay_off(
    tiny_model, tiny_model_dir, tiny_store, monkeypatch, caplog
):
    def fail(self, batch, blocks):
        raise GraphCaptureError("capturing the decode step failed: an operation syncs with the host")

    monkeypatch.setattr(DecodeGraphs, "_capture", fail)
    prompts = prompts_of(tiny_model)[:1]
    with running(graph_engine(tiny_model, tiny_store)) as engine:
        served = serve(engine, [None, "lora"], prompts)
    assert engine.graphs is None
    assert "decode steps run uncaptured from now on" in caplog.text
    check_against_references(tiny_model, tiny_model_dir, tiny_store, prompts, served, NEW_TOKENS)


def test_http_completions_with_graphs_equal_those_without(tiny_model, tiny_model_dir, tiny_store):
    body = {"model": "ia3", "prompt": "The cat sat on the", "max_tokens": NEW_TOKENS, "temperature": 0}
    texts = {}
    for mode in ("off", "on"):
        settings = tiny_settings(tiny_model_dir, store=str(tiny_store), decode_graphs=mode)
        with LiveServer(settings, tiny_model) as server:
            answers = [httpx.post(f"{server.url}/v1/completions", json=body, timeout=60) for _ in range(2)]
            assert all(a.status_code == 200 for a in answers), answers[0].text
            texts[mode] = [a.json()["choices"][0]["text"] for a in answers]
            replays = server.engine.graphs.replays if server.engine.graphs else 0
        assert (replays > 0) == (mode == "on")
    assert texts["on"] == texts["off"] and texts["on"][0]
