"""Every kind of bad input gets a 4xx in OpenAI's error shape, and the server keeps serving."""

from __future__ import annotations

import json

import httpx
import pytest

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def assert_openai_error(response: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param != "any":
        assert body["error"]["param"] == param
    return body["error"]


@pytest.fixture
def http(live_server):
    with httpx.Client(base_url=live_server.url, timeout=60) as client:
        yield client


@pytest.fixture
def model(live_server):
    return live_server.engine.model.name


def chat(model: str, **fields) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 1000}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, None),
        ({"stop": ["a"] * 100}, "stop"),
        ({"seed": "x"}, "seed"),
        ({"stream": "maybe"}, "stream"),
    ],
)
def test_invalid_chat_fields_are_400(http, model, fields, param):
    error = assert_openai_error(http.post(CHAT, json=chat(model, **fields)), 400)
    if param is not None:
        assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_missing_model_field(http):
    assert_openai_error(http.post(CHAT, json={"messages": [{"role": "user", "content": "x"}]}), 400, "model")


def test_unknown_model_is_404(http):
    error = assert_openai_error(http.post(CHAT, json=chat("no-such-model")), 404, "model")
    assert error["code"] == "model_not_found"


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"",
        b"[1, 2]",
        b"null",
        b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
    ],
)
def test_malformed_bodies_are_400(http, content):
    assert_openai_error(http.post(CHAT, content=content, headers={"content-type": "application/json"}), 400)


def test_absurd_max_tokens_is_400_with_the_numbers(http, model, live_server):
    error = assert_openai_error(http.post(CHAT, json=chat(model, max_tokens=10**9)), 400, "messages")
    assert error["code"] == "context_length_exceeded"
    assert str(live_server.engine.max_model_len) in error["message"]
    assert str(10**9) in error["message"]


def test_prompt_beyond_the_context_is_400(http, model):
    error = assert_openai_error(
        http.post(COMPLETIONS, json={"model": model, "prompt": "word " * 3000}), 400, "prompt"
    )
    assert error["code"] == "context_length_exceeded"


def test_ten_megabyte_prompt_is_413_without_reading_it_all(http, model):
    body = json.dumps({"model": model, "prompt": "a" * (10 * 1024 * 1024)}).encode()
    error = assert_openai_error(
        http.post(COMPLETIONS, content=body, headers={"content-type": "application/json"}), 413
    )
    assert error["code"] == "request_too_large"

    def chunks():
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    # A chunked upload declares no length: the limit applies while it streams in.
    streamed = http.post(COMPLETIONS, content=chunks(), headers={"content-type": "application/json"})
    assert_openai_error(streamed, 413)


@pytest.mark.parametrize("prompt", ["", [], [[]], [-1], [10**9], [1, "a"], {"text": "x"}])
def test_bad_completion_prompts_are_400(http, model, prompt):
    assert_openai_error(http.post(COMPLETIONS, json={"model": model, "prompt": prompt, "max_tokens": 2}), 400)


def test_wrong_method_and_route(http):
    assert_openai_error(http.get(CHAT), 405)
    assert_openai_error(http.get("/v1/nothing-here"), 404)


def test_server_keeps_serving_around_bad_requests(http, model):
    for _ in range(3):
        assert (
            http.post(CHAT, content=b"{oops", headers={"content-type": "application/json"}).status_code == 400
        )
        ok = http.post(CHAT, json=chat(model, temperature=0))
        assert ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert http.get("/health").json() == {"status": "ok"}


def test_unknown_fields_are_ignored(http, model):
    reply = http.post(CHAT, json=chat(model, frobnicate=True, temperature=0))
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize(
    "path, fields, param",
    [
        (CHAT, {"frequency_penalty": 0.5}, "frequency_penalty"),
        (COMPLETIONS, {"presence_penalty": -1}, "presence_penalty"),
        (COMPLETIONS, {"best_of": 3}, "best_of"),
        (COMPLETIONS, {"suffix": "the end"}, "suffix"),
        (CHAT, {"functions": [{"name": "f"}]}, "functions"),
        (CHAT, {"function_call": "auto"}, "function_call"),
        (CHAT, {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        (CHAT, {"modalities": ["text", "audio"]}, "modalities"),
        (CHAT, {"prediction": {"type": "content", "content": "x"}}, "prediction"),
        (CHAT, {"reasoning_effort": "low"}, "reasoning_effort"),
        (CHAT, {"verbosity": "low"}, "verbosity"),
        (CHAT, {"web_search_options": {}}, "web_search_options"),
        (CHAT, {"store": True}, "store"),
        (CHAT, {"service_tier": "priority"}, "service_tier"),
    ],
)
def test_fields_we_cannot_honour_are_refused(http, model, path, fields, param):
    body = (
        chat(model, **fields) if path == CHAT else {"model": model, "prompt": "hi", "max_tokens": 2, **fields}
    )
    error = assert_openai_error(http.post(path, json=body), 400, param)
    assert "not supported" in error["message"] or "only" in error["message"]


@pytest.mark.parametrize(
    "fields",
    [
        {"logprobs": False, "echo": False, "logit_bias": {}, "tool_choice": "none"},
        {"response_format": {"type": "text"}, "tools": None, "top_logprobs": None},
        {"frequency_penalty": 0, "presence_penalty": 0.0, "functions": None, "function_call": "none"},
        {"modalities": ["text"], "store": False, "service_tier": "auto", "reasoning_effort": None},
    ],
)
def test_values_that_ask_for_nothing_are_accepted(http, model, fields):
    assert http.post(CHAT, json=chat(model, **fields)).status_code == 200


@pytest.mark.parametrize(
    "path, fields, param",
    [
        (CHAT, {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        (CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (CHAT, {"echo": True}, "echo"),
        (COMPLETIONS, {"logprobs": 6}, "logprobs"),
        (COMPLETIONS, {"max_tokens": 0}, None),  # generates nothing
        (COMPLETIONS, {"best_of": 1, "suffix": ""}, None),
    ],
)
def test_logprobs_and_echo_limits(http, model, path, fields, param):
    body = chat(model) if path == CHAT else {"model": model, "prompt": "hi", "max_tokens": 2}
    response = http.post(path, json={**body, **fields})
    if param is None:
        assert response.status_code == 200, response.text
    else:
        assert assert_openai_error(response, 400, param)["message"].startswith(param)


@pytest.mark.parametrize(
    "path, fields, param",
    [
        (COMPLETIONS, {"max_tokens": "8"}, "max_tokens"),
        (COMPLETIONS, {"prompt": [[False]]}, "prompt"),
        (COMPLETIONS, {"prompt": [True, 1]}, "prompt"),
        (COMPLETIONS, {"prompt": [""]}, "prompt"),
        (COMPLETIONS, {"seed": 2**70}, "seed"),
        (COMPLETIONS, {"top_k": 6 * 10**25, "temperature": 1}, "top_k"),  # found by schemathesis: a 500
        (COMPLETIONS, {"seed": -(2**64)}, "seed"),
        (COMPLETIONS, {"temperature": "0.5"}, "temperature"),
        (COMPLETIONS, {"stream": 1}, "stream"),
        (CHAT, {"messages": [{"role": "tool"}]}, "messages.0.content"),
        (CHAT, {"max_completion_tokens": "4"}, "max_completion_tokens"),
        (CHAT, {"n": 2.5}, "n"),
    ],
)
def test_request_fields_are_strict(http, model, path, fields, param):
    body = chat(model) if path == CHAT else {"model": model, "prompt": "hi", "max_tokens": 2}
    error = assert_openai_error(http.post(path, json={**body, **fields}), 400, param)
    assert error["message"].startswith(param)


def test_text_that_encodes_to_nothing_starts_from_the_start_token(http, model):
    # Found by schemathesis: "\u0014" is a valid prompt, and answered 400 "the prompt is empty".
    reply = http.post(COMPLETIONS, json={"model": model, "prompt": ["\u0014", "hi"], "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["choices"]) == 2


def test_a_top_k_beyond_the_vocabulary_is_off(http, model):
    body = {"model": model, "prompt": "hi", "max_tokens": 2, "top_k": 2**31 - 1, "n": 2}
    assert http.post(COMPLETIONS, json=body).status_code == 200


def test_integral_numbers_are_integers(http, model):
    # JSON Schema counts 2.0 as an integer; schemathesis sent it and got a 400.
    body = {"model": model, "prompt": [1.0, 2], "max_tokens": 2.0, "n": 2.0}
    reply = http.post(COMPLETIONS, json=body)
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["choices"]) == 2


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63), float(2**63 - 1), 2**63 + 192, -(2**63) - 5])
def test_a_64_bit_seed_is_served(http, model, seed):
    # Compared as doubles, these equal a bound; schemathesis sent them as schema-valid and got a 400.
    body = {"model": model, "prompt": "hi", "max_tokens": 2, "n": 2, "seed": seed}
    assert http.post(COMPLETIONS, json=body).status_code == 200
