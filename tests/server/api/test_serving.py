"""Serving behaviour over HTTP: queue limits, disconnects, the error chunk of a stream."""

from __future__ import annotations

import socket
import threading

import httpx

from server.api import app as app_module
from server.engine.engine import Engine
from server.engine.request import Finished
from server.engine.sampler import SamplingParams
from tests.adapter_factory import make_peft_adapter
from tests.conftest import LiveServer, tiny_settings
from tests.helpers import wait_until


def test_health_and_models(live_server):
    assert httpx.get(f"{live_server.url}/health").json() == {"status": "ok"}
    body = httpx.get(f"{live_server.url}/v1/models").json()
    assert body["object"] == "list"
    assert body["data"][0]["object"] == "model" and body["data"][0]["parent"] is None


def test_full_queue_answers_429_with_retry_after(tiny_model_dir, tiny_model):
    settings = tiny_settings(tiny_model_dir, max_queue=0)
    with LiveServer(settings, tiny_model) as server:
        reply = httpx.post(
            f"{server.url}/v1/completions", json={"model": tiny_model.name, "prompt": "hi", "max_tokens": 2}
        )
        assert reply.status_code == 429
        assert reply.headers["retry-after"] == "1"
        assert reply.json()["error"]["type"] == "rate_limit_error"


def test_a_client_that_disconnects_cancels_its_request(live_server, tiny_model, monkeypatch):
    engine = live_server.engine
    reasons: list[str] = []
    finish = engine._finish
    monkeypatch.setattr(
        engine,
        "_finish",
        lambda seq, reason, error=None: (reasons.append(reason), finish(seq, reason, error)),
    )
    for stream in (True, False):
        body = httpx.Request(
            "POST",
            "/",
            json={"model": tiny_model.name, "prompt": "Tell me", "max_tokens": 480, "stream": stream},
        ).content
        sock = socket.create_connection(("127.0.0.1", live_server.port))
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_until(lambda: engine.snapshot.running == 1)
        sock.close()
        wait_until(lambda: engine.snapshot.running == 0)
    assert reasons == ["abort", "abort"]


def test_a_failed_step_ends_the_stream_with_an_error_chunk(live_server, tiny_model, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(live_server.engine.decoder, "hidden", broken)  # the pass every step runs
    with httpx.stream(
        "POST",
        f"{live_server.url}/v1/chat/completions",
        json={"model": tiny_model.name, "messages": [{"role": "user", "content": "x"}], "stream": True},
    ) as reply:
        lines = [line for line in reply.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert '"error"' in lines[-2] and "boom" in lines[-2]
    monkeypatch.undo()
    ok = httpx.post(
        f"{live_server.url}/v1/completions", json={"model": tiny_model.name, "prompt": "hi", "max_tokens": 2}
    )
    assert ok.status_code == 200


def test_shutdown_ends_running_requests(tiny_model_dir, tiny_model):
    server = LiveServer(tiny_settings(tiny_model_dir), tiny_model).__enter__()
    engine = server.engine
    handle = engine.submit(engine.encode_text("hello"), SamplingParams(max_tokens=300))
    server.__exit__(None, None, None)
    events = handle.drain()
    assert isinstance(events[-1], Finished) and events[-1].reason == "abort"


def test_startup_and_upload_validation_run_torch_work_on_threads_that_exit(
    monkeypatch, tiny_model_dir, tmp_path
):
    """A thread that ran torch work keeps an OpenMP pool while it lives, and more pools than CPUs
    slow every op of the engine (server/torch_threads.py): the server's event loop thread must not
    load the model, build the engine or validate uploads itself."""
    ran_on: dict[str, list[threading.Thread]] = {"load": [], "engine": [], "validate": []}

    def spy(name, fn):
        def recorded(*args, **kwargs):
            ran_on[name].append(threading.current_thread())
            return fn(*args, **kwargs)

        return recorded

    monkeypatch.setattr(app_module, "load_base_model", spy("load", app_module.load_base_model))
    monkeypatch.setattr(Engine, "__init__", spy("engine", Engine.__init__))
    loader = app_module.folder_loader
    monkeypatch.setattr(app_module, "folder_loader", lambda *a, **k: spy("validate", loader(*a, **k)))
    folder = make_peft_adapter(tiny_model_dir, "lora", tmp_path / "lora")
    with LiveServer(tiny_settings(tiny_model_dir, store=tmp_path / "store"), None) as live:
        files = [("file", (p.name, p.read_bytes())) for p in sorted(folder.glob("adapter*"))]
        uploaded = httpx.post(f"{live.url}/v1/adapters", data={"name": "a"}, files=files, timeout=60)
        assert uploaded.status_code == 201, uploaded.text
        threads = [t for name in ("load", "engine", "validate") for t in ran_on[name]]
        assert [len(ran_on[name]) for name in ("load", "engine", "validate")] == [1, 1, 1]
        assert not any(t.is_alive() for t in threads), [t.name for t in threads]
