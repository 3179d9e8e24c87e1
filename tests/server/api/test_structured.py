"""Structured outputs and logit_bias over HTTP with the `openai` client (the tiny random model: its
output is noise, so only the grammar makes it parse)."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from tests.server.api.test_bad_input import CHAT, COMPLETIONS, assert_openai_error
from tests.server.engine.test_grammar import SCHEMA

MESSAGES = [{"role": "user", "content": "Describe a pet as JSON."}]
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}


@pytest.fixture
def client(live_server):
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="x", max_retries=0)


@pytest.fixture
def http(live_server):
    with httpx.Client(base_url=live_server.url, timeout=120) as client:
        yield client


def test_chat_json_schema_validates_and_streams_the_same(client, tiny_model):
    kwargs = dict(model=tiny_model.name, messages=MESSAGES, max_tokens=300, temperature=0)
    reply = client.chat.completions.create(**kwargs, response_format=JSON_SCHEMA_FORMAT)
    assert reply.choices[0].finish_reason == "stop"
    content = reply.choices[0].message.content
    jsonschema.validate(json.loads(content), SCHEMA)
    chunks = client.chat.completions.create(**kwargs, response_format=JSON_SCHEMA_FORMAT, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content


def test_json_object_and_sampled_rows_parse(client, tiny_model):
    reply = client.chat.completions.create(
        model=tiny_model.name,
        messages=MESSAGES,
        max_tokens=400,
        temperature=1.0,
        seed=5,
        n=3,
        response_format={"type": "json_object"},
    )
    for choice in reply.choices:
        if choice.finish_reason == "stop":  # "length": cut short, documented as not parsing
            assert isinstance(json.loads(choice.message.content), dict)
    assert any(c.finish_reason == "stop" for c in reply.choices)


def test_guided_fields_on_completions(client, tiny_model):
    base = dict(model=tiny_model.name, prompt="Once upon", max_tokens=300, temperature=0)
    as_json = client.completions.create(**base, extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads(as_json.choices[0].text), SCHEMA)
    as_text = client.completions.create(**base, extra_body={"guided_json": json.dumps(SCHEMA)})
    assert as_text.choices[0].text == as_json.choices[0].text
    regex = client.completions.create(
        **base, extra_body={"guided_regex": r"[a-z]{3,8}@[a-z]{2,5}\.(com|org)"}
    )
    assert re.fullmatch(r"[a-z]{3,8}@[a-z]{2,5}\.(com|org)", regex.choices[0].text)
    choices = ["yes", 'no "way"', "maybe\nlater", "été"]
    picked = client.completions.create(**base, n=2, extra_body={"guided_choice": choices})
    assert all(c.text in choices and c.finish_reason == "stop" for c in picked.choices)


def test_guided_choice_on_chat_beside_free_rows(client, tiny_model):
    # Constrained and free requests in flight together: each gets what it asked for.
    free = client.chat.completions.create(
        model=tiny_model.name, messages=MESSAGES, max_tokens=6, temperature=0
    )
    picked = client.chat.completions.create(
        model=tiny_model.name,
        messages=MESSAGES,
        max_tokens=20,
        temperature=0,
        extra_body={"guided_choice": ["A", "B"]},
    )
    assert picked.choices[0].message.content in ("A", "B")
    again = client.chat.completions.create(
        model=tiny_model.name, messages=MESSAGES, max_tokens=6, temperature=0
    )
    assert again.choices[0].message.content == free.choices[0].message.content


def test_logit_bias_steers_greedy_tokens(client, tiny_model):
    tokenizer = tiny_model.tokenizer
    [token] = tokenizer(" zebra", add_special_tokens=False).input_ids
    forced = client.completions.create(
        model=tiny_model.name, prompt="Once upon", max_tokens=3, temperature=0, logit_bias={str(token): 100}
    )
    assert forced.choices[0].text == " zebra" * 3
    plain = client.completions.create(model=tiny_model.name, prompt="Once upon", max_tokens=1, temperature=0)
    [first] = tokenizer(plain.choices[0].text, add_special_tokens=False).input_ids
    banned = client.completions.create(
        model=tiny_model.name, prompt="Once upon", max_tokens=1, temperature=0, logit_bias={str(first): -100}
    )
    assert banned.choices[0].text != plain.choices[0].text
    chat = client.chat.completions.create(
        model=tiny_model.name, messages=MESSAGES, max_tokens=2, temperature=0, logit_bias={str(token): 100}
    )
    assert chat.choices[0].message.content == " zebra" * 2


@pytest.mark.parametrize(
    "path, fields, param",
    [
        (
            CHAT,
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}},
            "response_format",
        ),
        (CHAT, {"response_format": {"type": "xml"}}, "response_format"),
        (COMPLETIONS, {"guided_json": "{not json"}, "guided_json"),
        (COMPLETIONS, {"guided_json": "[1, 2]"}, "guided_json"),
        (COMPLETIONS, {"guided_regex": "(unclosed"}, "guided_regex"),
        (
            COMPLETIONS,
            {"guided_json": {"type": "object", "properties": {"a": False}, "required": ["a"]}},
            "guided_json",
        ),
        (COMPLETIONS, {"guided_choice": []}, "guided_choice"),
        (COMPLETIONS, {"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        (CHAT, {"guided_regex": "a", "response_format": {"type": "json_object"}}, "response_format"),
        (COMPLETIONS, {"logit_bias": {"abc": 1}}, "logit_bias.abc"),
        (COMPLETIONS, {"logit_bias": {"5": 101}}, "logit_bias.5"),
        (COMPLETIONS, {"logit_bias": {"99999999": 1}}, "logit_bias"),
        (CHAT, {"tool_choice": "required"}, "tool_choice"),
        (CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        (CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"}, "tools"),
        (
            CHAT,
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
        ),
    ],
)
def test_bad_structured_requests_are_400_naming_the_field(http, tiny_model, path, fields, param):
    body = (
        {"model": tiny_model.name, "messages": MESSAGES, "max_tokens": 2, **fields}
        if path == CHAT
        else {"model": tiny_model.name, "prompt": "hi", "max_tokens": 2, **fields}
    )
    error = assert_openai_error(http.post(path, json=body), 400, param)
    assert "/project/" not in error["message"] and ".cc:" not in error["message"], "no paths in messages"
    assert http.post(path, json={k: v for k, v in body.items() if k not in fields}).status_code == 200


def test_tools_without_a_tool_template_say_how_to_get_one(http, tiny_model):
    tools = [{"type": "function", "function": {"name": "f"}}]
    body = {"model": tiny_model.name, "messages": MESSAGES, "max_tokens": 2, "tools": tools}
    error = assert_openai_error(http.post(CHAT, json=body), 400, "tools")
    assert "does not render tools" in error["message"] and "--chat-template" in error["message"]
    # tool_choice none shows the model no tools: plain text, whatever the template.
    assert http.post(CHAT, json={**body, "tool_choice": "none"}).status_code == 200
