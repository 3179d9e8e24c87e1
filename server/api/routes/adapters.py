"""The adapter registry over HTTP: upload, list, show, delete, and merge exports as background jobs.

Also vLLM's runtime adapter endpoints, so vLLM tooling drives peftserve unchanged:
`POST /v1/load_lora_adapter` publishes a server-side folder into the store (any adapter kind,
validated like an upload) and `POST /v1/unload_lora_adapter` deletes the name from the store.
The store is shared, so both take effect on every replica that reads it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from server.adapters.common import AdapterError
from server.api.auth import require_admin
from server.api.errors import APIError, documented
from server.registry.merge import MergeJobs, merged_paths
from server.registry.store import NAME, Store, StoreError, UnknownAdapter, Version
from server.registry.uploads import (
    Budget,
    UploadError,
    allowed_name,
    check_complete,
    copy_folder,
    extract_archive,
    is_archive,
    save_file,
    too_large,
)

router = APIRouter(tags=["adapters"])
# Multipart framing around the files; the files themselves count against --max-adapter-bytes.
FORM_OVERHEAD = 64 * 1024
MAX_PARTS = 16
PAGE_DEFAULT, PAGE_MAX = 100, 1000

UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["name", "file"],
                "properties": {
                    "name": {"type": "string", "pattern": NAME.pattern},
                    "file": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "minItems": 1,
                        "description": "adapter_config.json and .safetensors files, or one "
                        ".tar.gz, .tgz or .zip archive of them",
                    },
                },
            }
        }
    },
}
# OpenAPI links: what an answer leads to (schemathesis' stateful phase follows them).
UPLOADED_LINKS = {
    "links": {
        "show": {"operationId": "show_adapter", "parameters": {"name": "$response.body#/name"}},
        "merge": {"operationId": "merge_adapter", "parameters": {"name": "$response.body#/name"}},
        "delete": {"operationId": "delete_adapter", "parameters": {"name": "$response.body#/name"}},
    }
}
MERGE_LINKS = {
    "links": {"status": {"operationId": "merge_status", "parameters": {"job_id": "$response.body#/id"}}}
}
GZIP = {"content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}}}


def store(request: Request) -> Store:
    return request.app.state.store


def merges(request: Request) -> MergeJobs:
    return request.app.state.merges


def without_paths(message: str, root: Path) -> str:
    """The message with every path inside the store cut to its last part: clients see no server paths."""
    for prefix in {str(root.resolve()), str(root.absolute()), str(root)}:
        message = re.sub(re.escape(prefix) + r"[^\s'\":,;)]*", lambda m: Path(m.group()).name, message)
    return message


def registry_error(exc: Exception, root: Path) -> APIError:
    message = without_paths(str(exc), root)
    if isinstance(exc, UploadError):
        return APIError(
            exc.status, message, param=exc.param, code="request_too_large" if exc.status == 413 else None
        )
    if isinstance(exc, AdapterError):
        return APIError(400, message, param=exc.field, code="invalid_adapter")
    if isinstance(exc, UnknownAdapter):
        return APIError(404, f"no adapter named '{exc.args[0]}'", param="name", code="adapter_not_found")
    if isinstance(exc, StoreError):
        return APIError(400, message, param="name")
    raise exc


async def _limited_body(request: Request, limit: int) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit + FORM_OVERHEAD:
            raise too_large(limit)
        yield chunk


async def _read_form(request: Request, limit: int):
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "send the adapter as multipart/form-data with a `name` field and its files")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + FORM_OVERHEAD:
        raise APIError(413, str(too_large(limit)), code="request_too_large")
    parser = MultiPartParser(
        request.headers, _limited_body(request, limit), max_files=MAX_PARTS, max_fields=MAX_PARTS
    )
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise APIError(400, f"malformed multipart body: {exc.message}") from exc


def _stage(files: list[UploadFile], folder: Path, budget: Budget) -> None:
    if not files:
        raise UploadError("the upload has no files: send adapter_config.json and adapter_model.safetensors")
    if len(files) == 1 and is_archive(files[0].filename or ""):
        extract_archive(files[0].file, files[0].filename or "", folder, budget)
    else:
        for upload in files:
            save_file(upload.file, folder / allowed_name(upload.filename or ""), budget)
    check_complete(folder)


@router.post(
    "/v1/adapters",
    status_code=201,
    dependencies=[Depends(require_admin)],
    openapi_extra={"requestBody": UPLOAD_BODY},
    responses={201: UPLOADED_LINKS, **documented(400, 401, 403, 413)},
)
async def upload_adapter(request: Request) -> dict[str, Any]:
    """Upload a new version of an adapter; it is validated before it becomes visible."""
    limit = request.app.state.settings.adapters.max_adapter_bytes
    reg = store(request)
    try:
        form = await _read_form(request, limit)
        name = form.get("name")
        if not isinstance(name, str) or not name:
            raise APIError(400, "the form needs a `name` field", param="name")
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        # Copying, parsing, hashing and fsync all block: a worker thread does them, the loop serves.
        meta = await run_in_threadpool(_stage_and_publish, reg, name, files, limit)
    except (UploadError, AdapterError, StoreError) as exc:
        raise registry_error(exc, reg.root) from exc
    return meta.public()


def _stage_and_publish(reg: Store, name: str, files: list[UploadFile], limit: int):
    with reg.staging() as folder:
        _stage(files, folder, Budget(limit))
        return reg.publish(name, folder)


def _summary(version: Version, versions: tuple[Version, ...] | list[Version]) -> dict[str, Any]:
    return {**version.meta.public(), "versions": [v.ref.version for v in versions]}


def _page(data: list[dict[str, Any]], key: str, more: bool) -> dict[str, Any]:
    first, last = (data[0][key], data[-1][key]) if data else (None, None)
    return {"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": more}


@router.get("/v1/adapters", responses=documented(400, 401, 403))
async def list_adapters(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=PAGE_MAX)] = PAGE_DEFAULT,
    after: Annotated[str | None, Query(description="list the names after this one")] = None,
) -> dict[str, Any]:
    """Adapters by name with their latest version, a page at a time (`after` = the last name seen)."""
    entries, more = store(request).page(after, limit)
    return _page([_summary(e.latest, e.versions) for e in entries], "name", more)


@router.get("/v1/adapters/{name}", operation_id="show_adapter", responses=documented(401, 403, 404))
async def show_adapter(name: str, request: Request) -> dict[str, Any]:
    try:
        versions = store(request).versions(name)
    except UnknownAdapter as exc:
        raise registry_error(exc, store(request).root) from exc
    return {**_summary(versions[-1], versions), "history": [v.meta.public() for v in versions]}


@router.delete(
    "/v1/adapters/{name}",
    operation_id="delete_adapter",
    dependencies=[Depends(require_admin)],
    responses=documented(401, 403, 404),
)
async def delete_adapter(name: str, request: Request) -> dict[str, Any]:
    try:
        await run_in_threadpool(store(request).delete, name)
    except UnknownAdapter as exc:
        raise registry_error(exc, store(request).root) from exc
    return {"name": name, "deleted": True}


@router.post(
    "/v1/adapters/{name}/merge",
    status_code=202,
    operation_id="merge_adapter",
    dependencies=[Depends(require_admin)],
    responses={202: MERGE_LINKS, **documented(400, 401, 403, 404)},
)
async def merge_adapter(name: str, request: Request) -> dict[str, Any]:
    """Start folding the adapter (`name` or `name@N`) into the base: 202 with a job to poll."""
    try:
        version = store(request).version(name)
        job = merges(request).submit(version.ref)
    except (AdapterError, UnknownAdapter) as exc:
        raise registry_error(exc, store(request).root) from exc
    return job.public()


@router.get(
    "/v1/merges/{job_id}",
    operation_id="merge_status",
    dependencies=[Depends(require_admin)],
    responses=documented(401, 403, 404),
)
async def merge_status(job_id: str, request: Request) -> dict[str, Any]:
    """A merge job: queued, running, succeeded (download ready) or failed (with the reason)."""
    try:
        return merges(request).get(job_id).public()
    except KeyError as exc:
        raise APIError(404, f"no merge job {job_id!r}", param="job_id", code="job_not_found") from exc


@router.get(
    "/v1/adapters/{name}/merged",
    dependencies=[Depends(require_admin)],
    response_class=FileResponse,
    responses={200: GZIP, **documented(401, 403, 404)},
)
async def download_merged(name: str, request: Request) -> FileResponse:
    """The merged model as .tar.gz, once a merge job for this version has succeeded."""
    try:
        version = store(request).version(name)
    except UnknownAdapter as exc:
        raise registry_error(exc, store(request).root) from exc
    _, archive = merged_paths(store(request).root, version.ref)
    if not archive.is_file():
        raise APIError(
            404, f"{name} has not been merged yet: POST /v1/adapters/{name}/merge first", param="name"
        )
    return FileResponse(archive, media_type="application/gzip", filename=f"{version.ref.name}-merged.tar.gz")


class LoadLoRAAdapter(BaseModel):
    """vLLM's load request; unknown fields are ignored, as vLLM does."""

    model_config = ConfigDict(extra="ignore", strict=True)
    lora_name: str = Field(pattern=NAME.pattern, description="the adapter's name in `model` fields")
    lora_path: str = Field(min_length=1, description="a folder on the server with the adapter's files")
    load_inplace: bool = Field(
        default=False, description="publish a new version when the name is taken, instead of refusing"
    )


class UnloadLoRAAdapter(BaseModel):
    """vLLM's unload request (`lora_int_id`, which names nothing here, is ignored)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    lora_name: str = Field(min_length=1)


TEXT = {"content": {"text/plain": {"schema": {"type": "string"}}}}


@router.post(
    "/v1/load_lora_adapter",
    dependencies=[Depends(require_admin)],
    responses={200: TEXT, **documented(400, 401, 403, 404, 413)},
)
async def load_lora_adapter(body: LoadLoRAAdapter, request: Request) -> PlainTextResponse:
    """vLLM-compatible: serve the adapter folder `lora_path` (on the server) as `lora_name`."""
    reg = store(request)
    limit = request.app.state.settings.adapters.max_adapter_bytes
    try:
        if not body.load_inplace and _known(reg, body.lora_name):
            raise APIError(
                400,
                f"The lora adapter '{body.lora_name}' has already been loaded. "
                "To publish a new version of it, set 'load_inplace' to true.",
                param="lora_name",
                code="adapter_exists",
            )
        await run_in_threadpool(_copy_and_publish, reg, body.lora_name, Path(body.lora_path), limit)
    except (UploadError, AdapterError, StoreError) as exc:
        raise registry_error(exc, reg.root) from exc
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post(
    "/v1/unload_lora_adapter",
    dependencies=[Depends(require_admin)],
    responses={200: TEXT, **documented(400, 401, 403, 404)},
)
async def unload_lora_adapter(body: UnloadLoRAAdapter, request: Request) -> PlainTextResponse:
    """vLLM-compatible: stop serving `lora_name` (every version; on every replica of the store)."""
    try:
        await run_in_threadpool(store(request).delete, body.lora_name)
    except UnknownAdapter as exc:
        raise APIError(
            404,
            f"The lora adapter '{body.lora_name}' cannot be found.",
            param="lora_name",
            code="adapter_not_found",
        ) from exc
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def _known(reg: Store, name: str) -> bool:
    try:
        reg.version(name)
    except UnknownAdapter:
        return False
    return True


def _copy_and_publish(reg: Store, name: str, source: Path, limit: int):
    with reg.staging() as folder:
        copy_folder(source, folder, Budget(limit))
        check_complete(folder)
        return reg.publish(name, folder)
