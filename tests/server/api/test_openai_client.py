"""The official `openai` client against a live server."""

from __future__ import annotations

import openai
import pytest

from tests.helpers import reference_greedy


@pytest.fixture
def client(live_server):
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="anything", max_retries=0)


def test_models_lists_the_base_model(client, live_server):
    models = client.models.list()
    assert [m.id for m in models.data] == [live_server.engine.model.name]


def test_chat_completion_equals_generate(client, live_server, tiny_model):
    messages = [{"role": "user", "content": "Tell me a story."}]
    reply = client.chat.completions.create(
        model=tiny_model.name, messages=messages, max_tokens=10, temperature=0
    )
    prompt = live_server.engine.encode_chat(messages)
    expected = tiny_model.tokenizer.decode(
        reference_greedy(tiny_model.hf, prompt, 10), skip_special_tokens=True
    )
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.refusal is None
    assert choice.message.content == expected
    assert choice.finish_reason == "length"
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == 10
    assert reply.usage.total_tokens == len(prompt) + 10


def test_chat_streaming(client, tiny_model):
    messages = [{"role": "user", "content": "Hi!"}]
    whole = client.chat.completions.create(
        model=tiny_model.name, messages=messages, max_tokens=8, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=tiny_model.name,
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices]
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert content[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in content) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_with_a_list_of_prompts_and_n(client, tiny_model):
    reply = client.completions.create(
        model=tiny_model.name, prompt=["Once upon", "In a galaxy"], max_tokens=5, n=2, temperature=0
    )
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    # Greedy: both choices of one prompt agree; the two prompts differ.
    assert reply.choices[0].text == reply.choices[1].text
    assert reply.choices[2].text == reply.choices[3].text
    assert reply.usage.completion_tokens == 20


def test_completions_streaming(client, tiny_model):
    whole = client.completions.create(model=tiny_model.name, prompt="Once upon", max_tokens=6, temperature=0)
    chunks = list(
        client.completions.create(
            model=tiny_model.name, prompt="Once upon", max_tokens=6, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_sampled_chat_with_seed_is_reproducible(client, tiny_model):
    kwargs = dict(
        model=tiny_model.name, messages=[{"role": "user", "content": "Go"}], max_tokens=12, seed=3, n=2
    )
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert first.choices[0].message.content != first.choices[1].message.content


def test_unknown_model_is_a_404_for_the_client(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert error.value.body["param"] == "model"
