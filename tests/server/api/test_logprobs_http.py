"""Logprobs and echo over HTTP with the official `openai` client: the legacy completions shape (what
lm-evaluation-harness reads), chat's shape, streamed and not, per adapter kind, beside rows without."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.adapter_factory import reference_logprobs
from tests.conftest import LiveServer, tiny_settings

KINDS = ["lora", "rslora", "dora", "ia3", "prompt", "ptuning", "prefix", "bottleneck"]
ATOL = 1e-4


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_model, kinds_store):
    with LiveServer(tiny_settings(tiny_model_dir, store=str(kinds_store)), tiny_model) as live:
        yield live


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="anything", max_retries=0)


@pytest.mark.parametrize("name", [None, *KINDS])
def test_echo_scores_the_prompt_as_an_uncached_forward_does(
    client, tiny_model, tiny_model_dir, kinds_store, name
):
    tok = tiny_model.tokenizer
    prompt = tok("The quick brown fox jumps over the lazy dog").input_ids
    model = name or tiny_model.name
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    [choice] = reply.choices
    assert choice.text == tok.decode(prompt) and choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 0 and reply.usage.prompt_tokens == len(prompt)
    lp = choice.logprobs
    assert lp.tokens == [tok.decode([t]) for t in prompt]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    reference = reference_logprobs(tiny_model_dir, kinds_store / name if name else None, prompt)
    for i, token in enumerate(prompt[1:]):
        assert lp.token_logprobs[i + 1] == pytest.approx(reference[i, token].item(), abs=ATOL)
        values, best = reference[i].topk(2)
        expected = {tok.decode([t]): v for t, v in zip(best.tolist(), values.tolist(), strict=True)}
        expected.setdefault(lp.tokens[i + 1], reference[i, token].item())
        assert lp.top_logprobs[i + 1] == pytest.approx(expected, abs=ATOL)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(prompt))]


def test_the_request_lm_eval_sends(server, tiny_model):
    """local-completions' loglikelihood request: token ids, max_tokens 1, logprobs 1, echo."""
    import httpx

    prompt = tiny_model.tokenizer("Paris is the capital of France").input_ids
    body = {
        "model": "lora",
        "prompt": [prompt],
        "max_tokens": 1,
        "logprobs": 1,
        "echo": True,
        "temperature": 0,
    }
    reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    lp = reply["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(prompt) + 1 == len(lp["top_logprobs"]) == len(lp["tokens"])
    # lm-eval's greedy check: the greedy token's logprob is the largest of its top_logprobs
    assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())


def test_completion_logprobs_without_echo_and_streamed(client, tiny_model):
    kwargs = dict(model="ia3", prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=3)
    whole = client.completions.create(**kwargs).choices[0]
    assert len(whole.logprobs.tokens) == 6 and "".join(whole.logprobs.tokens) == whole.text
    assert all(len(top) >= 3 for top in whole.logprobs.top_logprobs)
    chunks = list(client.completions.create(**kwargs, echo=True, stream=True))
    prompt_text = "Once upon a time"
    assert chunks[0].choices[0].text == prompt_text
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    n_prompt = len(tiny_model.tokenizer(prompt_text).input_ids)
    assert streamed[n_prompt:] == whole.logprobs.tokens
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == [sum(len(t) for t in streamed[:i]) for i in range(len(streamed))]


def test_chat_logprobs_streamed_equal_unstreamed(client, tiny_model):
    kwargs = dict(
        model="prefix",
        messages=[{"role": "user", "content": "Say something."}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=4,
    )
    whole = client.chat.completions.create(**kwargs).choices[0]
    content = whole.logprobs.content
    assert len(content) == 8
    assert "".join(c.token for c in content) == whole.message.content
    for entry in content:
        assert len(entry.top_logprobs) == 4
        assert entry.top_logprobs[0].logprob >= entry.logprob  # greedy: the best one
        assert entry.top_logprobs[0].token == entry.token
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=ATOL)


def test_rows_with_and_without_logprobs_share_the_server(server, tiny_model):
    async def run() -> list:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as client:
            messages = [{"role": "user", "content": "Hello"}]
            return await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model=name, messages=messages, max_tokens=5, temperature=0, logprobs=scored
                    )
                    for name in ("lora", tiny_model.name, "prompt", "bottleneck")
                    for scored in (True, False)
                )
            )

    replies = asyncio.run(run())
    for i, reply in enumerate(replies):
        choice = reply.choices[0]
        if i % 2:
            assert choice.logprobs is None
        else:
            assert [e.token for e in choice.logprobs.content] and choice.message.content == replies[
                i + 1
            ].choices[0].message.content


def test_continuous_usage_stats_put_usage_on_every_chunk(client, tiny_model):
    chunks = list(
        client.chat.completions.create(
            model=tiny_model.name,
            messages=[{"role": "user", "content": "Count."}],
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 6 and counts[0] == 0
    assert len({c.usage.prompt_tokens for c in chunks}) == 1
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)
