"""The paged KV cache through the threaded engine: prefix cache hits equal misses for every adapter kind,
adapters never share a block, preemption keeps streams whole, memory budget and admission by blocks."""

from __future__ import annotations

import logging

import pytest

from server.config import AdapterSettings, EngineSettings, Settings
from server.engine.engine import Engine
from server.engine.kv_cache import bytes_per_token, choose_budget
from server.engine.request import ContextLengthError
from server.engine.sampler import SamplingParams
from server.metrics import Metrics
from server.registry.store import Store
from tests.adapter_factory import reference_tokens
from tests.helpers import reference_greedy, token_ids, wait_finished

NEW_TOKENS = 6
BLOCK = 4
KINDS = ["lora", "rslora", "dora", "ia3", "prompt", "ptuning", "prefix", "bottleneck"]


def greedy(n: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0)


def serve(
    engine: Engine, jobs: list[tuple[str | None, list[int]]], together: bool = False
) -> list[list[int]]:
    """Greedy tokens of each (model, prompt) job, one after another (so later ones can hit) or at once."""
    engine.start()
    try:
        submit = [
            lambda name=name, prompt=prompt: engine.submit(
                prompt, greedy(), engine.resolve_model(name) if name else None
            )
            for name, prompt in jobs
        ]
        if together:
            return [token_ids(events) for events in wait_finished([s() for s in submit], timeout=120)]
        return [token_ids(wait_finished([s()], timeout=120)[0]) for s in submit]
    finally:
        engine.stop()


def prefix_engine(model, store, caching: bool, metrics: Metrics | None = None, **settings) -> Engine:
    return Engine(
        model,
        EngineSettings(block_size=BLOCK, enable_prefix_caching=caching, **settings),
        AdapterSettings(),
        Store(store),
        metrics,
    )


def test_a_prefix_cache_hit_gives_what_a_miss_gives_for_every_kind(tiny_model, tiny_model_dir, kinds_store):
    tok = tiny_model.tokenizer
    system = tok("You are a helpful assistant who answers briefly and politely, always.").input_ids
    questions = [tok(q).input_ids for q in ("What is two plus two?", "Name a colour.")]
    jobs = [(name, system + q) for name in [None, *KINDS] for q in questions]
    metrics = Metrics()
    hit = serve(prefix_engine(tiny_model, kinds_store, True, metrics), jobs)
    miss = serve(prefix_engine(tiny_model, kinds_store, False), jobs)
    assert hit == miss
    # the second question of every model found the system prompt's blocks in the cache
    hits = metrics.prefix_cache_hits._value.get()
    assert hits >= (len(KINDS) + 1) * (len(system) // BLOCK - 1) * BLOCK
    for (name, prompt), tokens in zip(jobs, hit, strict=True):
        if name is None:
            assert tokens == reference_greedy(tiny_model.hf, prompt, NEW_TOKENS)
        else:
            assert tokens == reference_tokens(tiny_model_dir, kinds_store / name, prompt, NEW_TOKENS), name


def test_two_adapters_never_share_a_block(tiny_model, kinds_store):
    engine = prefix_engine(tiny_model, kinds_store, True)
    owner: dict[bytes, str] = {}  # block hash -> the identity whose sequence filled the block
    shared: list[tuple[str, bytes]] = []  # (identity of the sequence that took a cached block, its hash)
    seal, place = engine._seal, engine._place

    def recording_seal(seq, tokens):
        seal(seq, tokens)
        for h in seq.hashes:
            owner.setdefault(h, seq.identity)

    def recording_place(seq):
        placed = place(seq)
        shared.extend((seq.identity, h) for h in seq.hashes)
        return placed

    engine._seal, engine._place = recording_seal, recording_place
    prompt = tiny_model.tokenizer("The same words under every adapter, long enough to fill blocks").input_ids
    serve(engine, [(name, prompt) for name in [None, *KINDS, None, *KINDS]])
    assert len(shared) >= 2 * (len(prompt) // BLOCK - 1)  # the second round found its blocks
    assert {owner[h] for _, h in shared} >= {"", engine.resolve_model("lora").key}
    for identity, h in shared:
        assert owner[h] == identity


def test_preempted_streams_go_on_without_gap_or_duplicate(tiny_model, tiny_model_dir, kinds_store):
    # Room for 24 blocks of 4 tokens; 4 requests of 40 tokens each need 40: some must be preempted.
    per_block = BLOCK * bytes_per_token(tiny_model.shape, tiny_model.dtype)
    jobs = [
        (name, [100 + i, 200, 300 + 7 * i, 400, 17, 18, 19, 20, 21, 22 + i])
        for i, name in enumerate([None, "lora", "prefix", "prompt"])
    ]
    for caching in (True, False):
        metrics = Metrics()
        engine = Engine(
            tiny_model,
            EngineSettings(block_size=BLOCK, kv_cache_memory=25 * per_block, enable_prefix_caching=caching),
            AdapterSettings(),
            Store(kinds_store),
            metrics,
        )
        assert engine.blocks.capacity == 24
        engine.start()
        try:
            handles = [
                engine.submit(
                    p,
                    SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
                    engine.resolve_model(n) if n else None,
                )
                for n, p in jobs
            ]
            results = wait_finished(handles, timeout=120)
        finally:
            engine.stop()
        assert metrics.preemptions._value.get() > 0
        for (name, prompt), events in zip(jobs, results, strict=True):
            assert events[-1].reason == "length" and events[-1].completion_tokens == 30
            expected = (
                reference_greedy(tiny_model.hf, prompt, 30, stop_at_eos=False)
                if name is None
                else reference_tokens(tiny_model_dir, kinds_store / name, prompt, 30, stop_at_eos=False)
            )
            assert token_ids(events) == expected, (name, caching)
        assert engine.blocks.used == 0


def test_a_request_larger_than_the_whole_cache_is_refused(tiny_model):
    per_block = BLOCK * bytes_per_token(tiny_model.shape, tiny_model.dtype)
    engine = Engine(tiny_model, EngineSettings(block_size=BLOCK, kv_cache_memory=9 * per_block))
    with pytest.raises(ContextLengthError, match="32 tokens"):
        engine.submit([5] * 20, SamplingParams(max_tokens=13))
    engine.submit([5] * 20, SamplingParams(max_tokens=12))


def test_the_budget_sizes_the_cache_and_the_start_up_log_says_what_fits(tiny_model, caplog):
    caplog.set_level(logging.INFO, logger="peftserve.engine")
    settings = Settings.load({"kv_cache_memory": "1MiB", "block_size": 16}).engine
    engine = Engine(tiny_model, settings)
    per_block = 16 * bytes_per_token(tiny_model.shape, tiny_model.dtype)
    assert engine.cache.num_blocks == 1024**2 // per_block
    assert engine.cache.nbytes <= 1024**2
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("KV cache:")]
    assert f"{(engine.cache.num_blocks - 1) * 16} tokens" in line and "--kv-cache-memory" in line


def test_too_small_a_budget_fails_at_start_with_the_flag_to_raise(tiny_model):
    with pytest.raises(ValueError, match="raise --kv-cache-memory"):
        Engine(tiny_model, EngineSettings(kv_cache_memory=1000))


def test_the_default_budget_never_exceeds_what_the_batch_can_use():
    cpu = __import__("torch").device("cpu")
    assert choose_budget(cpu, None, 0.9, worst_case=10_000).bytes == 10_000
    assert choose_budget(cpu, 123, 0.9, worst_case=10_000).bytes == 123
    big = choose_budget(cpu, None, 0.9, worst_case=10**15)
    assert 0 < big.bytes <= 4 * 1024**3 and "CPU default" in big.source
