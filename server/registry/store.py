"""The adapter store on disk and its in-memory index.

Layout of `--store`:

    <store>/<name>/adapter_config.json + weights     a plain adapter folder: version 1
    <store>/<name>/<N>/adapter_config.json + ...     managed versions 1, 2, ... (the registry writes these)

Adapters given as `--adapter NAME=PATH` are served from PATH as version 1 of NAME. The
index is rebuilt from disk at start; nothing else holds state.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from server.adapters.common import CONFIG_FILE, AdapterError, AdapterRef
from server.adapters.loader import describe

log = logging.getLogger("peftserve.registry")

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class StoreError(ValueError):
    """A bad adapter name or store entry."""


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise StoreError(
            f"adapter name {name!r} is invalid: use 1-64 characters of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit"
        )
    return name


def parse_adapter_flag(value: str) -> tuple[str, Path]:
    """`NAME=PATH` of --adapter."""
    name, sep, path = value.partition("=")
    if not sep or not path:
        raise StoreError(f"--adapter {value!r}: expected NAME=PATH")
    return check_name(name), Path(path).expanduser()


@dataclass
class Entry:
    """All versions of one adapter name, oldest first."""

    versions: list[AdapterRef] = field(default_factory=list)

    @property
    def latest(self) -> AdapterRef:
        return self.versions[-1]


class Store:
    def __init__(self, root: Path, extra: dict[str, Path] | None = None) -> None:
        self.root = root
        self.extra = extra or {}
        self._lock = threading.Lock()
        self._index: dict[str, Entry] = {}
        self.rebuild()

    def rebuild(self) -> None:
        """Scan the store folder (and the --adapter folders) into a fresh index."""
        index: dict[str, Entry] = {}
        if self.root.is_dir():
            for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
                versions = self._scan_name(folder)
                if versions:
                    index[folder.name] = Entry(versions)
        for name, path in self.extra.items():
            ref = _describe(name, 1, path)
            if ref is None:
                raise StoreError(f"--adapter {name}={path}: not a servable adapter folder (see the log)")
            index[name] = Entry([ref])
        with self._lock:
            self._index = index
        log.info("adapter store %s: %d adapters", self.root, len(index))

    def _scan_name(self, folder: Path) -> list[AdapterRef]:
        if not NAME.match(folder.name):
            log.warning("ignoring %s: not a valid adapter name", folder)
            return []
        if (folder / CONFIG_FILE).is_file():
            ref = _describe(folder.name, 1, folder)
            return [ref] if ref else []
        numbered = sorted((int(p.name), p) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
        return [ref for version, path in numbered if (ref := _describe(folder.name, version, path))]

    def resolve(self, model: str) -> AdapterRef:
        """`name` (its latest version) or `name@N`; KeyError if there is no such adapter."""
        name, _, version = model.partition("@")
        with self._lock:
            entry = self._index.get(name)
        if entry is None:
            raise KeyError(model)
        if not version:
            return entry.latest
        for ref in entry.versions:
            if str(ref.version) == version:
                return ref
        raise KeyError(model)

    def names(self) -> list[AdapterRef]:
        """The latest version of every adapter, by name."""
        with self._lock:
            return [entry.latest for _, entry in sorted(self._index.items())]


def _describe(name: str, version: int, path: Path) -> AdapterRef | None:
    try:
        peft_type, virtual = describe(path)
    except AdapterError as exc:
        log.warning("ignoring adapter %s at %s: %s", name, path, exc)
        return None
    return AdapterRef(name=name, version=version, path=path, peft_type=peft_type, virtual_tokens=virtual)
