"""Every error the API answers has OpenAI's shape: {"error": {message, type, param, code}}."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from server.api.request_id import request_id_of
from server.api.schemas import UNSUPPORTED, UNSUPPORTED_ON

log = logging.getLogger("peftserve.api")

# pydantic names the member of a union that failed: `str`, `list[str]`, `constrained-int`, ...
_TAG = re.compile(r"[\[\]-]|^(str|int|float|bool|none|dict|list)$")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error answered to the client as-is."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = _TYPES.get(status, "internal_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _field_path(loc: tuple) -> list[str]:
    """A pydantic error location as request field names: without `body` and union member tags."""
    return [str(p) for p in loc if p != "body" and not (isinstance(p, str) and _TAG.search(p))]


def _validation_message(exc: RequestValidationError, route: str = "") -> tuple[str, str | None]:
    """The problem, phrased for a person, and the request field it concerns."""
    errors = exc.errors()
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    path = _field_path(first.get("loc", ()))
    param = ".".join(path) or None
    refused = {**UNSUPPORTED, **UNSUPPORTED_ON.get(route, {})}
    if path and path[0] in refused:
        return f"{path[0]}: {refused[path[0]]}", path[0]
    # A value that fits none of a union's forms fails once per form: report them together.
    same = [e for e in errors if _field_path(e.get("loc", ()))[:1] == path[:1]]
    messages = list(dict.fromkeys(e.get("msg", "invalid") for e in same))
    message = "; or ".join(messages) if len(same) > 1 else first.get("msg", "invalid request")
    if len(same) > 1 and path:
        param = path[0]
    return (f"{param}: {message}" if param else message), param


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette's Allow names only the first route's)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods - {"HEAD"})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc, request.url.path)
        return error_response(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        headers = getattr(exc, "headers", None)
        if exc.status_code == 404 and message == "Not Found":
            message = "no such route"
        if exc.status_code == 405:
            allowed = _allowed_methods(request)
            message = f"{request.method} is not allowed here; use {', '.join(allowed)}"
            headers = {**(headers or {}), "Allow": ", ".join(allowed)}
        return error_response(APIError(exc.status_code, message, headers=headers))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette answers this one outside every middleware: add the request id here.
        log.exception("unhandled error")
        request_id = request_id_of(request.scope)
        headers = {"x-request-id": request_id} if request_id else None
        return error_response(APIError(500, f"internal error: {type(exc).__name__}", headers=headers))


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


_DESCRIPTIONS = {
    400: "Invalid request: the message and `param` name the field at fault",
    401: "No `Authorization: Bearer` key, and this server needs one",
    403: "The key is not valid for this request",
    404: "No such model, adapter or job",
    413: "The request body or upload is over the configured limit",
    429: "The queue is full; retry after `Retry-After` seconds",
    503: "The server is shutting down or the engine has stopped",
}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error statuses a route answers, each with OpenAI's error body."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        responses[status] = {"model": ErrorBody, "description": _DESCRIPTIONS[status]}
        if status == 429:
            responses[status]["headers"] = {
                "Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}
            }
    return responses
