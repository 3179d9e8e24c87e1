"""Adapters over HTTP: listed under /v1/models, selected by the `model` field."""

from __future__ import annotations

import openai
import pytest

from tests.adapter_factory import make_peft_adapter, reference_tokens
from tests.conftest import LiveServer, tiny_settings


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("store")
    make_peft_adapter(tiny_model_dir, "lora", root / "support-bot" / "1", seed=1)
    make_peft_adapter(tiny_model_dir, "ia3", root / "support-bot" / "2", seed=2)
    make_peft_adapter(tiny_model_dir, "prefix", root / "legal", seed=3)
    return root


@pytest.fixture(scope="module")
def server(store, tiny_model_dir, tiny_model):
    extra = make_peft_adapter(tiny_model_dir, "prompt", store.parent / "outside", seed=4)
    settings = tiny_settings(tiny_model_dir, store=store, adapter=[f"pinned={extra}"])
    with LiveServer(settings, tiny_model) as live:
        yield live


def test_models_lists_adapters_with_their_parent(server, tiny_model):
    models = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x").models.list()
    base = tiny_model.name
    assert [(m.id, m.parent) for m in models.data] == [
        (base, None),
        ("legal", base),
        ("pinned", base),
        ("support-bot", base),
    ]


@pytest.mark.parametrize(
    "model, folder",
    [("support-bot", "support-bot/2"), ("support-bot@1", "support-bot/1"), ("legal", "legal")],
)
def test_model_field_selects_the_adapter(server, store, tiny_model, tiny_model_dir, model, folder):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")
    prompt = "Once upon a time"
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0)
    ids = tiny_model.tokenizer(prompt).input_ids
    expected = reference_tokens(tiny_model_dir, store / folder, ids, 6)
    assert reply.choices[0].text == tiny_model.tokenizer.decode(expected, skip_special_tokens=True)


def test_unknown_version_is_404(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="support-bot@7", prompt="x", max_tokens=2)


def test_virtual_tokens_count_against_the_context(server, tiny_model):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    limit = tiny_model.max_model_len
    with pytest.raises(openai.BadRequestError, match="context length"):
        # one prompt token + 5 prefix tokens + (limit - 5) completion tokens is one too many
        client.completions.create(model="legal", prompt=[1], max_tokens=limit - 5)
    reply = client.completions.create(model="legal", prompt=[1], max_tokens=1, temperature=0)
    assert reply.usage.prompt_tokens == 1
