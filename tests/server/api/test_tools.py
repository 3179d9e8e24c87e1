"""Tool calls: the Hermes parser, the stream shape, and calls end to end with the `openai` client
over a server started with --chat-template templates/hermes_tools.jinja."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest

from server.api.tools import ToolOutput, parse_hermes, parse_required
from tests.conftest import LiveServer, tiny_settings

TEMPLATE = Path(__file__).resolve().parents[3] / "templates" / "hermes_tools.jinja"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "array", "items": {"enum": ["mon", "tue", "wed"]}, "maxItems": 3},
    },
    "required": ["city", "unit", "days"],
}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_hermes_replies_parse_into_calls():
    assert parse_hermes("just text") == ("just text", [])
    content, calls = parse_hermes(
        'Let me look.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>\n'
        '<tool_call>{"name": "f", "parameters": {}}'  # the last one unclosed (the reply ended): still a call
    )
    assert content == "Let me look."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_time", {"zone": "UTC"}),
        ("f", {}),
    ]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2
    broken = 'x <tool_call>{"name": "f", "arguments": {</tool_call>'
    assert parse_hermes(broken) == (broken, []), "a call that does not parse stays text"
    assert parse_hermes('<tool_call>{"arguments": {}}</tool_call>')[1] == [], "a call needs a name"


def test_auto_streams_text_and_holds_back_what_may_open_a_call():
    output = ToolOutput("auto")
    pieces = [
        "Sure",
        " <tool",
        '_call>\n{"name": "get_time", ',
        '"arguments": {"zone": "CET"}}',
        "\n</tool_call>",
    ]
    deltas = [d for piece in pieces for d in output.feed(piece)]
    assert deltas == [{"content": "Sure"}, {"content": " "}]
    tail, reason = output.end("stop")
    assert reason == "tool_calls"
    head, arguments = tail
    assert head["tool_calls"][0]["function"] == {"name": "get_time", "arguments": ""}
    assert head["tool_calls"][0]["id"].startswith("call_") and head["tool_calls"][0]["type"] == "function"
    assert json.loads(arguments["tool_calls"][0]["function"]["arguments"]) == {"zone": "CET"}
    # A `<` that turns out not to open a call is released.
    text = ToolOutput("auto")
    assert text.feed("a <to") == [{"content": "a "}]
    assert text.feed("y") == [{"content": "<toy"}]
    assert text.end("stop") == ([], "stop")


def test_required_replies_parse_every_call():
    text = '[{"name": "get_time", "parameters": {"zone": "UTC"}}, {"name": "f", "parameters": {}}]'
    calls = parse_required(text)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_time", {"zone": "UTC"}),
        ("f", {}),
    ]
    message, reason = ToolOutput("required").message(text, "stop")
    assert reason == "tool_calls" and message["content"] is None and len(message["tool_calls"]) == 2


def test_a_reply_cut_by_max_tokens_keeps_length():
    message, reason = ToolOutput("required").message('[{"name": "get_time", "param', "length")
    assert reason == "length" and "tool_calls" not in message and message["content"].startswith("[")


@pytest.fixture(scope="module")
def tool_server(tiny_model_dir, tiny_model):
    with LiveServer(tiny_settings(tiny_model_dir, chat_template=str(TEMPLATE)), tiny_model) as server:
        yield server


@pytest.fixture
def client(tool_server):
    return openai.OpenAI(base_url=f"{tool_server.url}/v1", api_key="x", max_retries=0)


def assert_valid_calls(calls, names=SCHEMAS) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_calls_always_parse(client, tiny_model, choice):
    # Sampled rows of a random model: only the grammar keeps the arguments valid.
    reply = client.chat.completions.create(
        model=tiny_model.name,
        messages=ASK,
        tools=TOOLS,
        tool_choice=choice,
        max_tokens=190,
        n=4,
        seed=1,
        parallel_tool_calls=False,
    )
    names = ["get_time"] if isinstance(choice, dict) else SCHEMAS
    for c in reply.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None
        assert len(c.message.tool_calls) == 1
        assert_valid_calls(c.message.tool_calls, names)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_calls_stream_as_openai_does(client, tiny_model, choice):
    kwargs = dict(model=tiny_model.name, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=190)
    whole = client.chat.completions.create(**kwargs, temperature=0, parallel_tool_calls=False)
    [call] = whole.choices[0].message.tool_calls
    chunks = [
        c
        for c in client.chat.completions.create(
            **kwargs, temperature=0, parallel_tool_calls=False, stream=True
        )
        if c.choices
    ]
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices[0].delta.tool_calls]
    first = deltas[0][0]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == call.function.name and first.function.arguments == ""
    assert all(d[0].id is None and d[0].function.name is None for d in deltas[1:])
    assert "".join(d[0].function.arguments for d in deltas[1:]) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_auto_parses_a_hermes_call_from_the_reply(client, tiny_model):
    # A grammar makes the random model write one Hermes call, deterministically.
    regex = r'<tool_call>\n\{"name": "get_time", "arguments": \{"zone": "(UTC|CET)"\}\}\n</tool_call>'
    kwargs = dict(
        model=tiny_model.name, messages=ASK, tools=TOOLS, max_tokens=100, extra_body={"guided_regex": regex}
    )
    reply = client.chat.completions.create(**kwargs)
    assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.content is None
    assert_valid_calls(reply.choices[0].message.tool_calls, ["get_time"])
    chunks = [c for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    streamed = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert streamed[0].function.name == "get_time" and streamed[0].id.startswith("call_")
    assert json.loads(streamed[1].function.arguments)["zone"] in ("UTC", "CET")
    assert not any(c.choices[0].delta.content for c in chunks), "the call is not also sent as text"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_calls_and_results_round_trip_through_the_template(client, tool_server, tiny_model):
    conversation = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": '{"zone": "CET"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]
    reply = client.chat.completions.create(
        model=tiny_model.name, messages=conversation, tools=TOOLS, max_tokens=2
    )
    rendered = tiny_model.tokenizer.apply_chat_template(
        [
            *ASK,
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_time", "arguments": {"zone": "CET"}}}
                ],
            },
            {"role": "tool", "content": "12:00"},
        ],
        tools=TOOLS,
        chat_template=TEMPLATE.read_text(),
        tokenize=False,
        add_generation_prompt=True,
    )
    assert '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>' in rendered
    assert "<tool_response>\n12:00\n</tool_response>" in rendered
    assert reply.usage.prompt_tokens == len(
        tiny_model.tokenizer(rendered, add_special_tokens=False).input_ids
    )
    bad = [
        *conversation[:1],
        {
            **conversation[1],
            "tool_calls": [
                {**conversation[1]["tool_calls"][0], "function": {"name": "get_time", "arguments": "{oops"}}
            ],
        },
    ]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=tiny_model.name, messages=bad, tools=TOOLS, max_tokens=2)
    assert "arguments" in caught.value.body["param"]


def test_tool_choice_none_renders_no_tools(client, tool_server, tiny_model):
    reply = client.chat.completions.create(
        model=tiny_model.name, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=2
    )
    assert reply.usage.prompt_tokens == len(tool_server.engine.encode_chat(ASK))
    assert reply.choices[0].message.tool_calls is None


def test_an_unreadable_chat_template_fails_before_the_model_loads(tmp_path):
    from server.api.app import create_app
    from server.config import Settings

    with pytest.raises(ValueError, match="--chat-template"):
        create_app(Settings.load({"chat_template": str(tmp_path / "missing.jinja")}))
