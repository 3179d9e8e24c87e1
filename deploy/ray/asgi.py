"""Drive an ASGI app in-process: its lifespan, and one HTTP request at a time as a stream of parts.

A Ray Serve replica runs the whole peftserve FastAPI app without a socket: the ingress hands it
an `HTTPRequest`, the replica answers with a `ResponseStart` and then the body chunks as the app
sends them, so streaming responses stream through Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.types import ASGIApp, Message

log = logging.getLogger("ray.serve")  # what Ray Serve writes to each replica's log file

# After the caller stops reading, the app gets this long to notice the disconnect and finish.
SHUTDOWN_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class HTTPRequest:
    """One buffered HTTP request, as it travels from the ingress to a replica."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(frozen=True)
class ResponseStart:
    """Status and headers of a response; body chunks (bytes) follow it."""

    status: int
    headers: list[tuple[bytes, bytes]]
    replica: str
    """The replica that answers (Ray Serve's replica id)."""


class Lifespan:
    """Run an app's lifespan startup now and its shutdown later, outside an ASGI server."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._stack = contextlib.AsyncExitStack()

    async def start(self) -> None:
        await self._stack.enter_async_context(self.app.router.lifespan_context(self.app))

    async def stop(self) -> None:
        await self._stack.aclose()


async def call(app: ASGIApp, request: HTTPRequest, replica: str) -> AsyncIterator[ResponseStart | bytes]:
    """Run `request` through `app`; yield its `ResponseStart`, then each non-empty body chunk.

    Closing the iterator early is a client disconnect: the app's next `receive()` says so, which
    cancels the engine request behind a stream.
    """
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "query_string": request.query_string,
        "root_path": "",
        "headers": request.headers,
        "client": None,
        "server": None,
        "state": {},
    }
    sent: asyncio.Queue[Message | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_given = False

    async def receive() -> Message:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await app(scope, receive, sent.put)
        except Exception:
            # The app has already answered 500 (Starlette's error middleware) and re-raised.
            log.exception("%s %s failed", request.method, request.path)
        finally:
            await sent.put(None)

    task = asyncio.create_task(run())
    try:
        while (message := await sent.get()) is not None:
            if message["type"] == "http.response.start":
                yield ResponseStart(message["status"], list(message.get("headers", [])), replica)
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    break
    finally:
        gone.set()
        done, _ = await asyncio.wait([task], timeout=SHUTDOWN_GRACE_SECONDS)
        if not done:
            task.cancel()
