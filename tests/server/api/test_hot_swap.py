"""Uploading or deleting an adapter while requests for it stream: none fail, each keeps its version."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.adapter_factory import make_peft_adapter, reference_tokens
from tests.conftest import LiveServer, tiny_settings

TOKENS = 300


@pytest.fixture(scope="module")
def versions(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("versions")
    return [make_peft_adapter(tiny_model_dir, "lora", root / f"v{i}", seed=10 + i) for i in (1, 2)]


def files_of(folder):
    return [("file", (p.name, p.read_bytes())) for p in sorted(folder.glob("adapter*"))]


async def stream_tokens(
    client: httpx.AsyncClient, model: str, prompt: list[int], started: asyncio.Event
) -> list:
    """A streaming completion; sets `started` on its first chunk; the text pieces and the finish reason."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": TOKENS,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    pieces, reason = [], None
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        assert reply.status_code == 200, await reply.aread()
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            started.set()
            pieces.append(chunk["choices"][0]["text"])
            reason = chunk["choices"][0]["finish_reason"] or reason
    return ["".join(pieces), reason]


def expected_text(tiny_model, tiny_model_dir, folder, prompt) -> str:
    return tiny_model.tokenizer.decode(
        reference_tokens(tiny_model_dir, folder, prompt, TOKENS), skip_special_tokens=True
    )


def test_upload_v2_while_v1_streams(tmp_path, tiny_model_dir, tiny_model, versions):
    prompt = tiny_model.tokenizer("Once upon a time").input_ids
    with LiveServer(tiny_settings(tiny_model_dir, store=tmp_path), tiny_model) as server:

        async def scenario():
            async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
                first = await client.post("/v1/adapters", data={"name": "bot"}, files=files_of(versions[0]))
                assert first.status_code == 201
                started = [asyncio.Event() for _ in range(3)]
                old = [asyncio.create_task(stream_tokens(client, "bot", prompt, e)) for e in started]
                await asyncio.gather(*(e.wait() for e in started))
                second = await client.post("/v1/adapters", data={"name": "bot"}, files=files_of(versions[1]))
                assert second.status_code == 201 and second.json()["version"] == 2
                assert not any(t.done() for t in old), "the first requests should still be streaming"
                new = [
                    asyncio.create_task(stream_tokens(client, "bot", prompt, asyncio.Event()))
                    for _ in range(2)
                ]
                return await asyncio.gather(*old), await asyncio.gather(*new)

        old, new = asyncio.run(scenario())
    v1 = expected_text(tiny_model, tiny_model_dir, versions[0], prompt)
    v2 = expected_text(tiny_model, tiny_model_dir, versions[1], prompt)
    assert v1 != v2
    assert old == [[v1, "length"]] * 3
    assert new == [[v2, "length"]] * 2


def test_delete_while_running(tmp_path, tiny_model_dir, tiny_model, versions):
    prompt = tiny_model.tokenizer("In a hole in the ground").input_ids
    with LiveServer(tiny_settings(tiny_model_dir, store=tmp_path), tiny_model) as server:

        async def scenario():
            async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
                await client.post("/v1/adapters", data={"name": "temp"}, files=files_of(versions[0]))
                started = asyncio.Event()
                running = asyncio.create_task(stream_tokens(client, "temp", prompt, started))
                await started.wait()
                assert (await client.delete("/v1/adapters/temp")).status_code == 200
                refused = await client.post(
                    "/v1/completions", json={"model": "temp", "prompt": "x", "max_tokens": 2}
                )
                return await running, refused.status_code

        finished, refused = asyncio.run(scenario())
    assert finished == [expected_text(tiny_model, tiny_model_dir, versions[0], prompt), "length"]
    assert refused == 404
