"""Structured outputs and tool calls on the embedded default model, served over HTTP with
--chat-template templates/hermes_tools.jinja, through the `openai` client."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from server.config import Settings
from tests.conftest import LiveServer
from tests.server.api.test_tools import ASK, SCHEMAS, TEMPLATE, TOOLS, assert_valid_calls
from tests.server.engine.test_grammar import SCHEMA

pytestmark = pytest.mark.slow

FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def server(default_model):
    settings = Settings.load({"dtype": "float32", "chat_template": str(TEMPLATE)})
    with LiveServer(settings, default_model) as live:
        yield live


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


def test_nested_schema_always_validates(client, default_model):
    messages = [{"role": "user", "content": "Describe a pet as JSON, with its owner and some tags."}]
    greedy = client.chat.completions.create(
        model=default_model.name, messages=messages, max_tokens=300, temperature=0, response_format=FORMAT
    )
    sampled = client.chat.completions.create(
        model=default_model.name,
        messages=messages,
        max_tokens=300,
        temperature=1.0,
        seed=7,
        n=4,
        response_format=FORMAT,
    )
    for choice in [*greedy.choices, *sampled.choices]:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    stream = client.chat.completions.create(
        model=default_model.name,
        messages=messages,
        max_tokens=300,
        temperature=0,
        response_format=FORMAT,
        stream=True,
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        == greedy.choices[0].message.content
    )


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_parse_and_validate(client, default_model, choice):
    # With parallel calls a model this small tends to repeat `required` calls without end (README).
    kwargs = dict(
        model=default_model.name,
        messages=ASK,
        tools=TOOLS,
        tool_choice=choice,
        max_tokens=300,
        parallel_tool_calls=False,
    )
    sampled = client.chat.completions.create(**kwargs, n=3, seed=3)
    greedy = client.chat.completions.create(**kwargs, temperature=0)
    names = ["get_weather"] if isinstance(choice, dict) else SCHEMAS
    for c in [*sampled.choices, *greedy.choices]:
        assert c.finish_reason == "tool_calls"
        assert len(c.message.tool_calls) == 1
        assert_valid_calls(c.message.tool_calls, names)


def test_a_tool_call_conversation_end_to_end(client, default_model):
    """Call a tool, send its result back, get the answer: the loop an application runs."""
    first = client.chat.completions.create(
        model=default_model.name,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=300,
        temperature=0,
        parallel_tool_calls=False,
    )
    assert first.choices[0].finish_reason == "tool_calls", repr(first.choices[0].message.content)
    calls = first.choices[0].message.tool_calls
    assert_valid_calls(calls)
    conversation = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        *({"role": "tool", "tool_call_id": c.id, "content": '{"temperature": 21}'} for c in calls),
    ]
    answer = client.chat.completions.create(
        model=default_model.name, messages=conversation, tools=TOOLS, max_tokens=40, temperature=0
    )
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens
