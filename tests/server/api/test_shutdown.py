"""Graceful shutdown of a real server process: SIGTERM drains, bounded by --drain-timeout, then exit 0."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

DRAIN_TIMEOUT = 4.0
SHORT, LONG = 40, 4000  # tokens: well under a second on the tiny model, and well over the timeout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--dtype", "float32",
        "--port", str(port), "--drain-timeout", str(DRAIN_TIMEOUT), "--max-batch-size", "8",
        "--served-name", "tiny", "--store", str(log.parent / "store"),
    ]  # fmt: skip
    root = Path(__file__).resolve().parents[3]
    process = subprocess.Popen(command, cwd=root, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the server did not start"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)


async def stream(client: httpx.AsyncClient, model: str, max_tokens: int, started: asyncio.Event) -> list:
    """Stream a completion; the finish reasons and errors it saw, then whether it ended with [DONE]."""
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True}
    body |= {"temperature": 0, "ignore_eos": True}
    seen, done = [], False
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        assert reply.status_code == 200
        async for line in reply.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                started.set()
                if "error" in chunk:
                    seen.append(("error", chunk["error"]["message"]))
                elif chunk["choices"][0]["finish_reason"]:
                    seen.append(("finish", chunk["choices"][0]["finish_reason"]))
    return [seen, done]


def long_context_copy(model_dir: Path, out: Path) -> Path:
    """The tiny model with a 4096-token context (rotary positions have no weights): streams can be long."""
    shutil.copytree(model_dir, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    return out


def test_sigterm_drains_four_streams_one_past_the_timeout(tiny_model_dir, tmp_path):
    port = free_port()
    log = tmp_path / "server.log"
    process = start_server(long_context_copy(tiny_model_dir, tmp_path / "model"), port, log)
    try:

        async def scenario():
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                started = [asyncio.Event() for _ in range(4)]
                lengths = [SHORT, SHORT, SHORT, LONG]
                streams = [
                    asyncio.create_task(stream(client, "tiny", n, e))
                    for n, e in zip(lengths, started, strict=True)
                ]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
                process.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
                body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
                refused = await client.post("/v1/completions", json=body)
                health = await client.get("/health")
                return await asyncio.gather(*streams), refused, health

        results, refused, health = asyncio.run(scenario())
        exit_code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text()
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
    assert health.status_code == 503
    for seen, done in results[:3]:
        assert (seen, done) == ([("finish", "length")], True)
    seen, done = results[3]
    assert done and len(seen) == 1 and seen[0][0] == "error" and "--drain-timeout" in seen[0][1]
    assert exit_code == 0, output
    assert "Traceback" not in output, output
