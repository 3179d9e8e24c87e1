"""Bearer keys: `--api-key` guards generation, `--admin-key` guards changes to the adapter store."""

from __future__ import annotations

import hmac
import logging

from fastapi import Request

from server.api.errors import APIError
from server.config import ServerSettings

log = logging.getLogger("peftserve.api")


def _check(request: Request, keys: list[str]) -> None:
    """401 without a bearer token, 403 with a wrong one; nothing to check when no key is set."""
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(
            401,
            "this server needs `Authorization: Bearer <key>`",
            code="missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    given = token.strip().encode()
    # compare_digest takes the same time wherever the strings differ; check every key regardless.
    matches = [hmac.compare_digest(given, key.encode()) for key in keys]
    if not any(matches):
        raise APIError(403, "the key is not valid for this request", code="invalid_api_key")


def _settings(request: Request) -> ServerSettings:
    return request.app.state.settings.server


async def require_api_key(request: Request) -> None:
    server = _settings(request)
    _check(request, [k for k in (server.api_key, server.admin_key) if k] if server.api_key else [])


async def require_admin(request: Request) -> None:
    server = _settings(request)
    _check(request, [server.admin_key] if server.admin_key else [])


def warn_if_open(server: ServerSettings) -> None:
    if not server.admin_key:
        log.warning("no --admin-key: anyone who can reach this server can upload, delete and merge adapters")
    if not server.api_key:
        log.warning("no --api-key: anyone who can reach this server can generate")
