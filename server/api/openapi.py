"""The OpenAPI schema says what the server really answers: its errors, streams and keys.

schemathesis (`make fuzz`) holds the server to it: every status, header and body it answers
must be documented here.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from server.api.auth import require_admin, require_api_key
from server.config import ServerSettings

BEARER = "bearerAuth"


def _keys(route: APIRoute, server: ServerSettings) -> bool:
    """Whether this server demands a key on the route."""
    needs = {d.dependency for d in route.dependencies}
    return bool(
        (require_admin in needs and server.admin_key) or (require_api_key in needs and server.api_key)
    )


def install_openapi(app: FastAPI, server: ServerSettings) -> None:
    """Mark the routes this server guards with a key (bearer) in the schema."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            # Invalid input answers 400 (errors.py), never FastAPI's 422.
            for operation in (op for path in schema["paths"].values() for op in path.values()):
                operation["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            guarded = False
            for route in app.routes:
                if not isinstance(route, APIRoute) or not _keys(route, server):
                    continue
                for method in route.methods:
                    operation = schema["paths"][route.path_format].get(method.lower())
                    if operation is not None:
                        operation["security"] = [{BEARER: []}]
                        guarded = True
            if guarded:
                schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
                schemes[BEARER] = {"type": "http", "scheme": "bearer"}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
