"""Over HTTP, as a user meets it: no request is left waiting for a wake-up that never comes."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.conftest import LiveServer, tiny_settings
from tests.helpers import wait_until

TIMEOUT = 30.0


async def complete(client: httpx.AsyncClient, model: str, max_tokens: int = 8, **extra) -> httpx.Response:
    body = {"model": model, "prompt": "Hello there", "max_tokens": max_tokens, "temperature": 0, **extra}
    return await client.post("/v1/completions", json=body)


def run_concurrently(server: LiveServer, models: list[str], max_tokens: int = 8) -> list[httpx.Response]:
    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as client:
            return await asyncio.gather(*(complete(client, m, max_tokens) for m in models))

    return asyncio.run(scenario())


def assert_completed(replies: list[httpx.Response], max_tokens: int = 8) -> None:
    for reply in replies:
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] <= max_tokens


def test_three_requests_over_two_rows(tiny_model_dir, tiny_model):
    with LiveServer(tiny_settings(tiny_model_dir, max_batch_size=2), tiny_model) as server:
        assert_completed(run_concurrently(server, [tiny_model.name] * 3))


def test_batch_size_one_with_ten_requests(tiny_model_dir, tiny_model):
    with LiveServer(tiny_settings(tiny_model_dir, max_batch_size=1), tiny_model) as server:
        assert_completed(run_concurrently(server, [tiny_model.name] * 10, 4), 4)


def test_queue_limit_reached_and_freed(tiny_model_dir, tiny_model):
    settings = tiny_settings(tiny_model_dir, max_batch_size=1, max_queue=1)
    with LiveServer(settings, tiny_model) as server:

        async def until_served(client: httpx.AsyncClient) -> httpx.Response:
            deadline = time.monotonic() + TIMEOUT
            while True:
                reply = await complete(client, tiny_model.name, 3)
                if reply.status_code != 429:
                    return reply
                assert time.monotonic() < deadline, "the queue never freed"
                await asyncio.sleep(0.01)

        async def scenario() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as client:
                return await asyncio.gather(*(until_served(client) for _ in range(6)))

        assert_completed(asyncio.run(scenario()), 3)


def test_eight_kinds_over_four_slots(tiny_model_dir, tiny_model, kinds_store):
    settings = tiny_settings(tiny_model_dir, store=kinds_store, max_active_adapters=4)
    names = sorted(p.name for p in kinds_store.iterdir())
    with LiveServer(settings, tiny_model) as server:
        assert_completed(run_concurrently(server, [*names, *names, *[tiny_model.name] * 3]))


def test_one_slot_adapters_one_after_another(tiny_model_dir, tiny_model, kinds_store):
    settings = tiny_settings(tiny_model_dir, store=kinds_store, max_active_adapters=1)
    with LiveServer(settings, tiny_model) as server:
        for name in ["lora", "prefix", "lora", "prefix"]:
            assert_completed(run_concurrently(server, [name], 3), 3)


def test_a_seed_beyond_64_bits_is_refused_and_frees_its_place(tiny_model_dir, tiny_model):
    with LiveServer(tiny_settings(tiny_model_dir, max_queue=1), tiny_model) as server:

        async def scenario() -> tuple[list[httpx.Response], httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as client:
                refused = [await complete(client, tiny_model.name, seed=2**70) for _ in range(3)]
                return refused, await complete(client, tiny_model.name, seed=7)

        refused, served = asyncio.run(scenario())
        health = httpx.get(f"{server.url}/health")
    for reply in refused:
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["param"] == "seed"
    assert_completed([served])
    assert health.status_code == 200


def test_health_answers_503_while_a_request_waits_too_long_with_nothing_running(
    tiny_model_dir, tiny_model, kinds_store
):
    settings = tiny_settings(tiny_model_dir, store=kinds_store, stall_timeout=0.3)
    with LiveServer(settings, tiny_model) as server:
        tiers = server.engine.tiers
        load, release = tiers._load, threading.Event()

        def held_load(ref):
            release.wait(TIMEOUT)
            return load(ref)

        tiers._load = held_load  # the adapter's load hangs: its request waits, nothing runs
        with ThreadPoolExecutor(1) as pool:
            reply = pool.submit(
                httpx.post,
                f"{server.url}/v1/completions",
                json={"model": "lora", "prompt": "hi", "max_tokens": 2},
                timeout=TIMEOUT,
            )
            wait_until(lambda: httpx.get(f"{server.url}/health").status_code == 503)
            assert "--stall-timeout" in httpx.get(f"{server.url}/health").json()["error"]["message"]
            release.set()
            assert reply.result().status_code == 200
        assert httpx.get(f"{server.url}/health").status_code == 200
