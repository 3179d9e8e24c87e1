"""An `x-request-id` header on every response: the client's own if it sent a sane one, else a new one.

Pure ASGI (streams pass through untouched). The id is also kept in the scope, so the handler of
unexpected errors, which Starlette runs outside every middleware, can put it on a 500 as well.
"""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
SCOPE_KEY = "peftserve.request_id"
_SANE = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")
"""What is echoed back as is; anything else (too long, spaces, control bytes) gets a fresh id."""


def request_id_of(scope: Scope) -> str | None:
    return scope.get(SCOPE_KEY)


class RequestId:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(HEADER, b"")
        value = sent if _SANE.fullmatch(sent) else uuid.uuid4().hex.encode()
        scope[SCOPE_KEY] = value.decode()

        async def with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                message["headers"] = [*headers, (HEADER, value)]
            await send(message)

        await self.app(scope, receive, with_id)
