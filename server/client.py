"""A thin HTTP client for the adapter registry, used by `peftserve adapters ...`."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from server.registry.uploads import is_archive


class ClientError(RuntimeError):
    """The server refused the request or could not be reached; the message says why."""


class RegistryClient:
    def __init__(self, url: str, key: str | None = None, timeout: float = 600.0) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kwargs) -> Any:
        try:
            reply = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach {self.http.base_url}: {exc}") from exc
        if reply.is_success:
            return reply.json()
        try:
            message = reply.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = reply.text[:500]
        raise ClientError(f"{reply.status_code}: {message}")

    def upload(self, name: str, path: Path) -> dict[str, Any]:
        """Upload an adapter folder (its adapter_config.json and .safetensors files) or an archive."""
        if path.is_dir():
            files = sorted(
                p for p in path.iterdir() if p.name == "adapter_config.json" or p.suffix == ".safetensors"
            )
        elif path.is_file() and is_archive(path.name):
            files = [path]
        else:
            raise ClientError(f"{path}: expected an adapter folder or a .tar.gz, .tgz or .zip archive")
        if not files:
            raise ClientError(f"{path} has no adapter_config.json or .safetensors files")
        with ExitStack() as stack:
            parts = [("file", (p.name, stack.enter_context(p.open("rb")))) for p in files]
            return self._call("POST", "/v1/adapters", data={"name": name}, files=parts)

    def list(self) -> dict[str, Any]:
        """Every adapter, following the server's pages."""
        data: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 1000}
        while True:
            page = self._call("GET", "/v1/adapters", params=params)
            data += page["data"]
            if not page.get("has_more") or not page["data"]:
                return {"object": "list", "data": data}
            params["after"] = page["last_id"]

    def show(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/adapters/{name}")

    def delete(self, name: str) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/adapters/{name}")
