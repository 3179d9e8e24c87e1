"""Where a GGUF file's dequantized safetensors copy is cached: one key, for server and trainer."""

from __future__ import annotations

import hashlib
from pathlib import Path


def gguf_cache_folder(gguf: Path, cache: Path) -> Path:
    """cache/models/<stem>-<hash of resolved path, size, mtime>: a changed file gets a new folder."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache / "models" / f"{gguf.stem}-{key}"
