"""Upload an adapter folder to a running peftserve server through its registry API.

`POST {url}/v1/adapters`, multipart form: a `name` field and the files `adapter_config.json`
and `adapter_model.safetensors` (each a file field named by its file name), with
`Authorization: Bearer $PEFTSERVE_ADMIN_KEY` when that variable is set. The server answers 201
with the registered version, or an OpenAI-shaped error `{"error": {"message", ...}}`.
"""

import os
from pathlib import Path

import httpx

from trainer.errors import PushError

ADMIN_KEY_ENV = "PEFTSERVE_ADMIN_KEY"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def push_adapter(folder: Path, url: str, name: str, timeout: float = 120.0) -> dict:
    """Upload folder's adapter under name; return the server's description of the new version."""
    missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
    if missing:
        raise PushError(f"{folder} has no {', '.join(missing)}")
    headers = {}
    if key := os.environ.get(ADMIN_KEY_ENV):
        headers["Authorization"] = f"Bearer {key}"
    endpoint = url.rstrip("/") + "/v1/adapters"
    files = {f: (f, (folder / f).read_bytes(), "application/octet-stream") for f in ADAPTER_FILES}
    try:
        response = httpx.post(endpoint, data={"name": name}, files=files, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise PushError(f"cannot reach the server at {endpoint}: {exc}") from exc
    if response.status_code != 201:
        raise PushError(
            f"the server refused the adapter (HTTP {response.status_code}): {error_message(response)}"
        )
    try:
        return response.json()
    except ValueError as exc:
        raise PushError(f"the server answered 201 without JSON: {response.text[:200]!r}") from exc


def error_message(response: httpx.Response) -> str:
    """The message of an OpenAI-shaped error body, or the raw body when it has another shape."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text.strip()[:500] or response.reason_phrase
    return str(message)
