"""The adapter store on disk and its in-memory index.

Layout of `--store`:

    <store>/<name>/<N>/adapter_config.json        version N, written by the registry; with it
    <store>/<name>/<N>/adapter_model.safetensors  meta.json (kind, rank, size, sha256 of every
    <store>/<name>/<N>/meta.json                  file, created)
    <store>/<name>/<N>/DELETED                    present once the version is deleted
    <store>/<name>/adapter_config.json + weights  a plain adapter folder, served as version 1
    <store>/<name>/<N>/ without meta.json         a plain folder placed by hand, served as version N
    <store>/.staging/<id>/                        uploads being received and validated

Every upload is written into `.staging`, validated there, and published by one atomic
rename into `<name>/<N>`: a crash at any point leaves no partial version visible. A delete
drops the name from the index at once and marks its versions DELETED; their files stay
until the next start, so requests already admitted can still load them. At start the store
removes staging leftovers and deleted versions, verifies every checksum, and rebuilds the
index from disk (it holds no other state). Adapters given as `--adapter NAME=PATH` are
served from PATH as version 1 of NAME.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from server.adapters.common import CONFIG_FILE, AdapterError, AdapterRef, AdapterWeights
from server.adapters.loader import describe

log = logging.getLogger("peftserve.registry")

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
META_FILE = "meta.json"
DELETED_MARK = "DELETED"
STAGING = ".staging"

# folder -> parsed weights; raises AdapterError. Checks the adapter against the base model.
Validator = Callable[[Path], AdapterWeights]


class StoreError(ValueError):
    """A bad adapter name or store entry."""


class UnknownAdapter(KeyError):
    """No adapter of that name (or version) in the store."""


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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class VersionMeta:
    """What the registry answers about one version; stored as meta.json beside its files."""

    name: str
    version: int
    peft_type: str
    rank: int | None
    target_modules: list[str]
    size_bytes: int
    sha256: str
    """sha256 of the weights file."""
    created: int
    files: dict[str, str] = field(default_factory=dict)
    """sha256 of every file of the version, by file name."""

    def public(self) -> dict:
        body = asdict(self)
        del body["files"]
        return body


@dataclass
class Version:
    ref: AdapterRef
    meta: VersionMeta


@dataclass
class Entry:
    """The live versions of one adapter name, oldest first."""

    versions: list[Version] = field(default_factory=list)

    @property
    def latest(self) -> Version:
        return self.versions[-1]


class Store:
    def __init__(
        self, root: Path, extra: dict[str, Path] | None = None, validate: Validator | None = None
    ) -> None:
        self.root = root
        self.extra = extra or {}
        self.validate = validate
        self._lock = threading.Lock()
        self._index: dict[str, Entry] = {}
        self._clean()
        self.rebuild()

    # ---- start-up ----

    def _clean(self) -> None:
        """Remove what a crash or a delete left behind."""
        if not self.root.is_dir():
            return
        shutil.rmtree(self.root / STAGING, ignore_errors=True)
        for mark in self.root.glob(f"*/*/{DELETED_MARK}"):
            log.info("removing deleted adapter version %s", mark.parent)
            shutil.rmtree(mark.parent, ignore_errors=True)
        for mark in self.root.glob(f"*/{DELETED_MARK}"):
            # A deleted plain folder: its own files go, versions uploaded since stay.
            log.info("removing deleted adapter files in %s", mark.parent)
            for path in mark.parent.iterdir():
                if path.is_file():
                    path.unlink()

    def rebuild(self) -> None:
        """Scan the store folder (and the --adapter folders) into a fresh index."""
        index: dict[str, Entry] = {}
        if self.root.is_dir():
            for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
                versions = self._scan_name(folder)
                if versions:
                    index[folder.name] = Entry(versions)
        for name, path in self.extra.items():
            version = _plain_version(name, path)
            if version is None:
                raise StoreError(f"--adapter {name}={path}: not a servable adapter folder (see the log)")
            index[name] = Entry([version])
        with self._lock:
            self._index = index
        log.info("adapter store %s: %d adapters", self.root, len(index))

    def _scan_name(self, folder: Path) -> list[Version]:
        if not NAME.match(folder.name):
            log.warning("ignoring %s: not a valid adapter name", folder)
            return []
        versions = []
        if (folder / CONFIG_FILE).is_file() and not (folder / DELETED_MARK).exists():
            plain = _plain_version(folder.name, folder)
            versions += [plain] if plain else []
        for path in sorted(
            (p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
        ):
            managed = _managed_version(folder.name, path)
            versions += [managed] if managed else []
        return sorted(versions, key=lambda v: v.ref.version)

    # ---- reading ----

    def resolve(self, model: str) -> AdapterRef:
        """`name` (its latest version) or `name@N`; UnknownAdapter (a KeyError) if there is none."""
        return self.version(model).ref

    def version(self, model: str) -> Version:
        name, _, wanted = model.partition("@")
        with self._lock:
            entry = self._index.get(name)
        if entry is None:
            raise UnknownAdapter(model)
        if not wanted:
            return entry.latest
        for version in entry.versions:
            if str(version.ref.version) == wanted:
                return version
        raise UnknownAdapter(model)

    def versions(self, name: str) -> list[Version]:
        with self._lock:
            entry = self._index.get(name)
        if entry is None:
            raise UnknownAdapter(name)
        return list(entry.versions)

    def names(self) -> list[AdapterRef]:
        """The latest version of every adapter, by name."""
        with self._lock:
            return [entry.latest.ref for _, entry in sorted(self._index.items())]

    def latest(self) -> list[Version]:
        with self._lock:
            return [entry.latest for _, entry in sorted(self._index.items())]

    # ---- writing ----

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh folder to receive an upload; removed afterwards unless it was published."""
        folder = self.root / STAGING / uuid.uuid4().hex
        folder.mkdir(parents=True)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def publish(self, name: str, folder: Path) -> VersionMeta:
        """Validate a staged adapter and make it the newest version of `name`, atomically."""
        check_name(name)
        if name in self.extra:
            raise StoreError(f"{name} is served from --adapter {self.extra[name]}; it cannot take uploads")
        if self.validate is None:
            raise StoreError("this store has no validator; it cannot take uploads")
        weights = self.validate(folder)  # AdapterError for anything that cannot be served
        files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}
        weights_file = next(n for n in files if n.endswith(".safetensors"))
        with self._lock:
            target_dir = self.root / name
            target_dir.mkdir(parents=True, exist_ok=True)
            taken = [int(p.name) for p in target_dir.iterdir() if p.name.isdigit()]
            plain = 1 if (target_dir / CONFIG_FILE).is_file() else 0
            number = max([*taken, plain]) + 1  # never reused while old files exist
            meta = VersionMeta(
                name=name,
                version=number,
                peft_type=weights.peft_type,
                rank=weights.rank,
                target_modules=weights.target_modules,
                size_bytes=sum((folder / n).stat().st_size for n in files),
                sha256=files[weights_file],
                created=int(time.time()),
                files=files,
            )
            (folder / META_FILE).write_text(json.dumps(asdict(meta), indent=2))
            _fsync_tree(folder)
            os.rename(folder, target_dir / str(number))  # the publish: one atomic rename
            _fsync_dir(target_dir)
            version = _managed_version(name, target_dir / str(number))
            assert version is not None
            entry = self._index.setdefault(name, Entry())
            entry.versions.append(version)
        log.info("published %s version %d (%s, %d bytes)", name, number, meta.peft_type, meta.size_bytes)
        return meta

    def delete(self, name: str) -> None:
        """Hide every version of `name` now; their files go at the next start."""
        with self._lock:
            entry = self._index.pop(name, None)
        if entry is None:
            raise UnknownAdapter(name)
        if name in self.extra:
            return
        for version in entry.versions:
            (version.ref.path / DELETED_MARK).touch()
        log.info("deleted %s (%d versions)", name, len(entry.versions))


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with path.open("rb") as f:
            os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stat_digest(folder: Path) -> str:
    """Identity of a plain folder's files without reading them (they are not ours to checksum)."""
    parts = [
        f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(folder.iterdir()) if p.is_file()
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _plain_version(name: str, path: Path, number: int = 1) -> Version | None:
    try:
        info = describe(path)
    except AdapterError as exc:
        log.warning("ignoring adapter %s at %s: %s", name, path, exc)
        return None
    weights = sorted(path.glob("*.safetensors"))
    meta = VersionMeta(
        name=name,
        version=number,
        peft_type=info.peft_type,
        rank=info.rank,
        target_modules=list(info.target_modules),
        size_bytes=sum(p.stat().st_size for p in path.iterdir() if p.is_file()),
        sha256=sha256_file(weights[0]) if weights else "",
        created=int(path.stat().st_mtime),
    )
    ref = AdapterRef(name, number, path, info.peft_type, info.virtual_tokens, _stat_digest(path))
    return Version(ref, meta)


def _managed_version(name: str, path: Path) -> Version | None:
    if (path / DELETED_MARK).exists():
        return None
    if not (path / META_FILE).exists():
        return _plain_version(name, path, int(path.name))  # placed by hand: no checksums to verify
    try:
        meta = VersionMeta(**json.loads((path / META_FILE).read_text()))
        for file, expected in meta.files.items():
            if sha256_file(path / file) != expected:
                raise StoreError(f"checksum mismatch for {file}")
        info = describe(path)
    except (OSError, ValueError, TypeError) as exc:
        log.error("ignoring adapter %s version %s: %s", name, path.name, exc)
        return None
    return Version(
        AdapterRef(name, int(path.name), path, info.peft_type, info.virtual_tokens, meta.sha256), meta
    )
