"""The adapter registry over HTTP: upload, list, show, delete (merging lives in merge.py)."""

from __future__ import annotations

import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from server.adapters.common import AdapterError
from server.api.auth import require_admin
from server.api.errors import APIError
from server.registry.merge import export_merged
from server.registry.store import Store, StoreError, UnknownAdapter, Version, sha256_file
from server.registry.uploads import (
    Budget,
    UploadError,
    allowed_name,
    check_complete,
    extract_archive,
    is_archive,
    save_file,
)

router = APIRouter(tags=["adapters"])
# Multipart framing around the files; the files themselves count against --max-adapter-bytes.
FORM_OVERHEAD = 64 * 1024
MAX_PARTS = 16


def store(request: Request) -> Store:
    return request.app.state.store


def registry_error(exc: Exception) -> APIError:
    if isinstance(exc, UploadError):
        return APIError(
            exc.status, str(exc), param=exc.param, code="request_too_large" if exc.status == 413 else None
        )
    if isinstance(exc, AdapterError):
        return APIError(400, str(exc), param=exc.field, code="invalid_adapter")
    if isinstance(exc, UnknownAdapter):
        return APIError(404, f"no adapter named '{exc.args[0]}'", param="name", code="adapter_not_found")
    if isinstance(exc, StoreError):
        return APIError(400, str(exc), param="name")
    raise exc


async def _limited_body(request: Request, limit: int) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise UploadError(f"the upload is larger than --max-adapter-bytes ({limit} bytes)", status=413)
        yield chunk


async def _read_form(request: Request, limit: int):
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "send the adapter as multipart/form-data with a `name` field and its files")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + FORM_OVERHEAD:
        raise APIError(
            413, f"the upload is larger than --max-adapter-bytes ({limit} bytes)", code="request_too_large"
        )
    parser = MultiPartParser(
        request.headers,
        _limited_body(request, limit + FORM_OVERHEAD),
        max_files=MAX_PARTS,
        max_fields=MAX_PARTS,
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


@router.post("/v1/adapters", status_code=201, dependencies=[Depends(require_admin)])
async def upload_adapter(request: Request) -> dict[str, Any]:
    limit = request.app.state.settings.adapters.max_adapter_bytes
    try:
        form = await _read_form(request, limit)
        name = form.get("name")
        if not isinstance(name, str) or not name:
            raise APIError(400, "the form needs a `name` field", param="name")
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        with store(request).staging() as folder:
            await run_in_threadpool(_stage, files, folder, Budget(limit))
            meta = await run_in_threadpool(store(request).publish, name, folder)
    except (UploadError, AdapterError, StoreError) as exc:
        raise registry_error(exc) from exc
    return meta.public()


def _summary(version: Version, versions: list[Version]) -> dict[str, Any]:
    return {**version.meta.public(), "versions": [v.ref.version for v in versions]}


@router.get("/v1/adapters")
async def list_adapters(request: Request) -> dict[str, Any]:
    data = [_summary(v, store(request).versions(v.ref.name)) for v in store(request).latest()]
    return {"object": "list", "data": data}


@router.get("/v1/adapters/{name}")
async def show_adapter(name: str, request: Request) -> dict[str, Any]:
    try:
        versions = store(request).versions(name)
    except UnknownAdapter as exc:
        raise registry_error(exc) from exc
    return {**_summary(versions[-1], versions), "history": [v.meta.public() for v in versions]}


@router.delete("/v1/adapters/{name}", dependencies=[Depends(require_admin)])
async def delete_adapter(name: str, request: Request) -> dict[str, Any]:
    try:
        store(request).delete(name)
    except UnknownAdapter as exc:
        raise registry_error(exc) from exc
    return {"name": name, "deleted": True}


def _merged_paths(request: Request, version: Version) -> tuple[Path, Path]:
    folder = store(request).root / ".merged" / version.ref.key.replace("#", "-")
    return folder, folder.with_name(folder.name + ".tar.gz")


def _build_merged(request: Request, version: Version) -> Path:
    folder, archive = _merged_paths(request, version)
    weights = store(request).validate(version.ref.path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    export_merged(request.app.state.engine.model, weights, folder)
    tmp = archive.with_name(f".{archive.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(folder, arcname=f"{version.ref.name}-v{version.ref.version}-merged")
    tmp.replace(archive)
    return archive


@router.post("/v1/adapters/{name}/merge", dependencies=[Depends(require_admin)])
async def merge_adapter(name: str, request: Request) -> dict[str, Any]:
    """Fold the adapter (`name` or `name@N`) into the base; the result downloads from .../merged."""
    try:
        version = store(request).version(name)
        archive = await run_in_threadpool(_build_merged, request, version)
    except (AdapterError, UnknownAdapter) as exc:
        raise registry_error(exc) from exc
    return {
        "name": version.ref.name,
        "version": version.ref.version,
        "peft_type": version.ref.peft_type,
        "size_bytes": archive.stat().st_size,
        "sha256": sha256_file(archive),
        "download": f"/v1/adapters/{name}/merged",
    }


@router.get("/v1/adapters/{name}/merged", dependencies=[Depends(require_admin)])
async def download_merged(name: str, request: Request) -> FileResponse:
    try:
        version = store(request).version(name)
    except UnknownAdapter as exc:
        raise registry_error(exc) from exc
    _, archive = _merged_paths(request, version)
    if not archive.is_file():
        raise APIError(
            404, f"{name} has not been merged yet: POST /v1/adapters/{name}/merge first", param="name"
        )
    return FileResponse(archive, media_type="application/gzip", filename=f"{version.ref.name}-merged.tar.gz")
