"""A client that goes away, streaming or not, running or still queued: its request ends, quietly."""

from __future__ import annotations

import logging
import socket

import httpx
import pytest

from tests.conftest import LiveServer, tiny_settings
from tests.helpers import wait_until


def send_raw(port: int, body: dict) -> socket.socket:
    """POST a completion over a plain socket, so the test can drop the connection at will."""
    content = httpx.Request("POST", "/", json=body).content
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(content)}\r\n\r\n".encode()
        + content
    )
    return sock


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("n", [1, 2])
def test_a_client_that_goes_away_ends_its_requests_without_a_traceback(
    tiny_model_dir, tiny_model, caplog, stream, n
):
    settings = tiny_settings(tiny_model_dir, max_batch_size=n)  # the first request fills every row
    caplog.set_level(logging.INFO)
    with LiveServer(settings, tiny_model) as server:
        engine = server.engine
        caplog.clear()  # the start-up warnings about open access are not what this test is about
        uvicorn_log = logging.getLogger("uvicorn")  # it does not propagate to the root logger
        uvicorn_log.addHandler(caplog.handler)
        body = {"model": tiny_model.name, "prompt": "Tell me", "max_tokens": 480, "stream": stream, "n": n}
        body["ignore_eos"] = True
        running = send_raw(server.port, body)
        wait_until(lambda: engine.snapshot.running == n)
        queued = send_raw(server.port, body)  # no free row: these wait in the queue
        wait_until(lambda: engine.snapshot.waiting == n)
        queued.close()
        wait_until(lambda: engine.snapshot.waiting == 0)
        running.close()
        wait_until(lambda: engine.snapshot.running == 0)
        get = engine.metrics.registry.get_sample_value
        assert get("peftserve_request_failure_total", {"reason": "cancelled"}) == 2 * n
        assert httpx.get(f"{server.url}/health").status_code == 200
        uvicorn_log.removeHandler(caplog.handler)
    noisy = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert noisy == [], [caplog.handler.format(r) for r in noisy]
