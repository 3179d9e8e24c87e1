"""200 adapters over 4 slots and 16 cached, over HTTP: all complete, outputs match the reference."""

from __future__ import annotations

import asyncio

import httpx

from tests.adapter_factory import reference_tokens
from tests.conftest import LiveServer, tiny_settings
from tests.server.engine.test_many_adapters import SAMPLE, TOKENS, cache_bytes_for, zipf_names


def test_200_adapters_over_http(tiny_model, tiny_model_dir, many_lora_store):
    settings = tiny_settings(
        tiny_model_dir,
        store=many_lora_store,
        max_active_adapters=4,
        cpu_adapter_memory=cache_bytes_for(many_lora_store, 16),
        max_batch_size=16,
        max_queue=1024,
    )
    prompt = "The quick brown fox"
    names = zipf_names(50, seed=1)

    async def scenario() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(names))
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            body = {"prompt": prompt, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}
            return await asyncio.gather(
                *(client.post("/v1/completions", json={**body, "model": n}) for n in names)
            )

    with LiveServer(settings, tiny_model) as server:
        replies = asyncio.run(scenario())
    assert [r.status_code for r in replies] == [200] * len(names)
    text = {n: r.json()["choices"][0]["text"] for n, r in zip(names, replies, strict=True)}
    prompt_ids = tiny_model.tokenizer(prompt).input_ids
    for i in SAMPLE:
        name = f"l{i:03d}"
        expected = reference_tokens(tiny_model_dir, many_lora_store / name, prompt_ids, TOKENS)
        assert text[name] == tiny_model.tokenizer.decode(expected, skip_special_tokens=True), name
