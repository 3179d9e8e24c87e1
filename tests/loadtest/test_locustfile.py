"""The locustfile against a server that stops answering: requests that never end must count as
failures, not vanish when the run ends."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from loadtest.run import LOCUSTFILE, REPO_ROOT
from loadtest.workload import read_requests


class StallingServer(BaseHTTPRequestHandler):
    """Lists one adapter, then starts every chat stream and never finishes it."""

    release = threading.Event()

    def do_GET(self) -> None:
        body = json.dumps(
            {"data": [{"id": "base", "parent": None}, {"id": "only-adapter", "parent": "base"}]}
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        role = {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
        self.wfile.write(f"data: {json.dumps(role)}\n\n".encode())
        self.wfile.flush()
        self.release.wait(60)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def stalling_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), StallingServer)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        StallingServer.release.set()
        server.shutdown()
        server.server_close()


def test_requests_still_running_after_the_stop_timeout_are_failures(stalling_url: str, tmp_path: Path):
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary"]
    command += ["--host", stalling_url, "--users", "2", "--spawn-rate", "2", "--run-time", "2s"]
    command += ["--stop-timeout", "2", "--csv", str(tmp_path / "locust")]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr  # locust's exit code when requests failed

    records = read_requests(tmp_path / "locust_requests.csv")
    assert len(records) == 2
    assert all(not r.ok and r.model == "only-adapter" for r in records)
    assert all(r.error == "unfinished 2 s after the end of the run" for r in records)
