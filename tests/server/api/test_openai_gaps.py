"""Small parts of OpenAI's API: retrieving one model, and an x-request-id on every response."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import LiveServer, tiny_settings
from tests.helpers import write_random_lora


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, tiny_model):
    store = tmp_path_factory.mktemp("store")
    write_random_lora(tiny_model.hf, store / "bot", seed=1, rank=2, targets=["q_proj"])
    with LiveServer(tiny_settings(tiny_model_dir, store=str(store)), tiny_model) as live:
        yield live


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="anything", max_retries=0)


def test_retrieve_the_base_and_an_adapter(client, server):
    base = server.engine.model.name
    model = client.models.retrieve(base)
    assert (model.id, model.object, model.owned_by) == (base, "model", "peftserve")
    adapter = client.models.retrieve("bot")
    assert adapter.id == "bot" and adapter.model_extra["parent"] == base
    assert client.models.retrieve("bot@1").id == "bot@1"


def test_retrieving_an_unknown_model_is_openais_404(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.models.retrieve("no-such-adapter")
    assert error.value.body["code"] == "model_not_found" and error.value.body["param"] == "model"


def test_every_response_has_a_request_id(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        mine = http.get("/v1/models", headers={"x-request-id": "trace-42"})
        assert mine.headers["x-request-id"] == "trace-42"
        fresh = [http.get("/health").headers["x-request-id"] for _ in range(2)]
        assert fresh[0] != fresh[1] and all(len(f) == 32 for f in fresh)
        # errors too: a bad body, an unknown route, a refused field, and a stream
        assert http.post("/v1/completions", content=b"{").headers["x-request-id"]
        assert http.get("/nowhere", headers={"x-request-id": "abc"}).headers["x-request-id"] == "abc"
        body = {"model": server.engine.model.name, "prompt": "hi", "max_tokens": 2, "stream": True}
        with http.stream("POST", "/v1/completions", json=body, headers={"x-request-id": "s-1"}) as streamed:
            assert streamed.headers["x-request-id"] == "s-1"
        # an id that could not be a header value as sent is replaced, not echoed
        odd = http.get("/health", headers={"x-request-id": "a b" * 100})
        assert odd.headers["x-request-id"] != "a b" * 100 and len(odd.headers["x-request-id"]) == 32


def test_an_unexpected_error_has_a_request_id_too(server, monkeypatch):
    def broken(name):
        raise RuntimeError("boom")

    monkeypatch.setattr(server.engine, "resolve_model", broken)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        reply = http.get("/v1/models/bot", headers={"x-request-id": "crash-1"})
    assert reply.status_code == 500 and reply.headers["x-request-id"] == "crash-1"


def test_the_openai_client_sees_the_request_id(client, server):
    reply = client.completions.with_raw_response.create(
        model=server.engine.model.name, prompt="hi", max_tokens=1, extra_headers={"x-request-id": "from-sdk"}
    )
    assert reply.headers["x-request-id"] == "from-sdk"


@pytest.mark.parametrize(
    "fields, param",
    [({"frequency_penalty": 0.5}, "frequency_penalty"), ({"service_tier": "flex"}, "service_tier")],
)
def test_the_openai_client_is_told_which_field_is_refused(client, server, fields, param):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(
            model=server.engine.model.name,
            messages=[{"role": "user", "content": "x"}],
            max_tokens=1,
            **fields,
        )
    assert error.value.body["param"] == param and "not supported" in error.value.body["message"]
