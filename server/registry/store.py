"""The adapter store on disk and its in-memory index.

Layout of `--store`:

    <store>/<name>/<N>/adapter_config.json        version N, written by the registry; with it
    <store>/<name>/<N>/adapter_model.safetensors  meta.json (kind, rank, size, sha256 of every
    <store>/<name>/<N>/meta.json                  file, created)
    <store>/<name>/<N>/DELETED                    present once the version is deleted
    <store>/<name>/LAST_VERSION                   the highest version number ever given to <name>
    <store>/<name>/adapter_config.json + weights  a plain adapter folder, served as version 1
    <store>/<name>/<N>/ without meta.json         a plain folder placed by hand, served as version N
    <store>/.staging/<host>-<pid>-<id>/           uploads being received and validated
    <store>/.publish.lock                         flock'd while a version number is taken

Every upload is written into `.staging`, validated there, and published by one atomic
rename into `<name>/<N>`: a crash at any point leaves no partial version visible. A delete
drops the name from the index at once and marks its versions DELETED; their files stay
until a start at least DELETED_GRACE later, so requests already admitted (here or on another
replica) can still load them. A version number is never given twice, even with several
processes publishing into one folder: numbering and the rename happen under an flock on
`.publish.lock`, and LAST_VERSION outlives deletes and restarts, so `name@N` always means the
same weights. At start the store removes staging leftovers of dead processes (of this host,
or older than STALE_STAGING from another) and deleted versions, and rebuilds the index from
disk (it holds no other state), reading only the small JSON files:
checksums are verified lazily, when a version is first loaded (`verified_path`), so a store
of thousands starts in seconds. A version whose files no longer match is dropped then.
Adapters given as `--adapter NAME=PATH` are served from PATH as version 1 of NAME.

Several replicas may share one store folder. Each sees the others' uploads, new versions
and deletes through `refresh` (run every --store-refresh seconds), and at once on a miss:
a name, or `name@N`, not in the index is looked up on disk before the answer is "unknown".
`--adapter-dir DIR` (vLLM's resolver layout) serves `DIR/<name>/` as version 1 of `<name>`,
looked up on the first request that names it.

The index lock guards only dictionary updates: hashing, fsync and copying of an upload run
before it is taken, so resolving a `model` name never waits for an upload.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
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
LAST_VERSION = "LAST_VERSION"
STAGING = ".staging"
PUBLISH_LOCK = ".publish.lock"
STALE_STAGING = 24 * 3600
"""Seconds after which another host's staging folder counts as abandoned."""
DELETED_GRACE = 600
"""Seconds a deleted version's files stay for requests other replicas admitted before the delete."""

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
    verified: bool = True
    """False until the files of a managed version are checked against meta.json's checksums."""


@dataclass(frozen=True)
class Entry:
    """The live versions of one adapter name, oldest first; replaced, never changed in place."""

    versions: tuple[Version, ...]

    @property
    def latest(self) -> Version:
        return self.versions[-1]


@dataclass(frozen=True)
class StoreStats:
    """The index at one moment, for the metrics."""

    adapters: int
    versions: int
    unverified: int
    index_bytes: int
    """Estimated memory the index holds (entries, metadata, paths)."""


class Store:
    def __init__(
        self,
        root: Path,
        extra: dict[str, Path] | None = None,
        validate: Validator | None = None,
        lookup: Path | None = None,
    ) -> None:
        self.root = root
        self.extra = extra or {}
        self.validate = validate
        self.lookup = lookup
        """--adapter-dir: names not in the store are looked up here as `<lookup>/<name>/`."""
        self._found: dict[str, Path] = {}  # names served from `lookup`, found on a miss
        self._lock = threading.Lock()  # the index: held only for dictionary reads and updates
        self._publish_lock = threading.Lock()  # version numbers and the publishing renames
        self._index: dict[str, Entry] = {}
        self._names: list[str] = []  # sorted, for pagination
        self._entry_bytes: dict[str, int] = {}
        self._bad: set[str] = set()  # keys of versions dropped for bad checksums: never found again
        self._seen: dict[str, tuple] = {}  # per name folder, the stats it had at the last rebuild
        self._changes = 0  # index updates made here, so a refresh never undoes one it did not see
        self._stop_refresh = threading.Event()
        self._refresher: threading.Thread | None = None
        self._clean()
        self.rebuild()

    # ---- start-up ----

    def _clean(self) -> None:
        """Remove what a crash or a delete left behind."""
        if not self.root.is_dir():
            return
        staging = self.root / STAGING
        for folder in staging.iterdir() if staging.is_dir() else ():
            if _abandoned(folder):
                shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            staging.rmdir()  # only when empty: no upload is in progress anywhere
        now = time.time()
        for mark in self.root.glob(f"*/*/{DELETED_MARK}"):
            if now - _mtime(mark) < DELETED_GRACE:
                continue  # another replica may still be loading it for a request it admitted
            log.info("removing deleted adapter version %s", mark.parent)
            shutil.rmtree(mark.parent, ignore_errors=True)
        for mark in self.root.glob(f"*/{DELETED_MARK}"):
            if now - _mtime(mark) < DELETED_GRACE:
                continue
            # A deleted plain folder: its own files go, versions uploaded since (and the mark) stay.
            log.info("removing deleted adapter files in %s", mark.parent)
            for path in mark.parent.iterdir():
                if path.is_file() and path.name != LAST_VERSION:
                    path.unlink()

    def rebuild(self, quiet: bool = False) -> None:
        """Scan the store folder (and the --adapter folders) into a fresh index.

        Versions already in the index keep their entry (and so their verified checksums). A
        `quiet` rebuild (the periodic refresh) reads again only the names whose folders changed.
        """
        started = time.perf_counter()
        changes = self._changes
        with self._lock:
            current = dict(self._index)
        index: dict[str, Entry] = {}
        seen: dict[str, tuple] = {}
        if self.root.is_dir():
            for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
                seen[folder.name] = mark = _signature(folder)
                if quiet and self._seen.get(folder.name) == mark and folder.name in current:
                    index[folder.name] = current[folder.name]
                    continue
                versions = self._scan_name(folder)
                if versions:
                    index[folder.name] = Entry(tuple(versions))
        for name, path in self.extra.items():
            version = _plain_version(name, path)
            if version is None:
                raise StoreError(f"--adapter {name}={path}: not a servable adapter folder (see the log)")
            index[name] = Entry((version,))
        for name, path in list(self._found.items()):
            version = _plain_version(name, path) if name not in index else None
            if version is None:
                self._found.pop(name, None)  # gone from --adapter-dir, or now in the store itself
            else:
                index[name] = Entry((version,))
        with self._lock:
            known = {v.ref.key: v for entry in self._index.values() for v in entry.versions}
        index = {name: Entry(tuple(known.get(v.ref.key, v) for v in e.versions)) for name, e in index.items()}
        sizes = {name: _entry_size(name, entry) for name, entry in index.items()}
        with self._lock:
            if quiet and self._changes != changes:
                return  # an upload or delete here since the scan began: the next refresh sees it
            self._seen = seen
            self._index = index
            self._names = sorted(index)
            self._entry_bytes = sizes
        stats = self.stats()
        (log.debug if quiet else log.info)(
            "adapter store %s: %d adapters, %d versions, index %.1f MiB, scanned in %.2f s "
            "(checksums are verified when a version is first loaded)",
            self.root,
            stats.adapters,
            stats.versions,
            stats.index_bytes / 2**20,
            time.perf_counter() - started,
        )

    def _scan_name(self, folder: Path) -> list[Version]:
        if not NAME.match(folder.name):
            log.warning("ignoring %s: not a valid adapter name", folder)
            return []
        return [v for v in self._scan_versions(folder) if v.ref.key not in self._bad]

    def _scan_versions(self, folder: Path) -> list[Version]:
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

    # ---- other replicas ----

    def watch(self, period: float) -> None:
        """Rebuild the index every `period` seconds in a background thread, until `close`."""
        if period <= 0 or self._refresher is not None:
            return

        def loop() -> None:
            while not self._stop_refresh.wait(period):
                try:
                    self.rebuild(quiet=True)
                except Exception:  # a refresh that fails keeps the index it had; the next one retries
                    log.exception("refreshing the adapter store index failed")

        self._refresher = threading.Thread(target=loop, name="peftserve-store-refresh", daemon=True)
        self._refresher.start()

    def close(self) -> None:
        self._stop_refresh.set()
        if self._refresher is not None:
            self._refresher.join(timeout=10)

    def _look_up(self, name: str) -> Entry | None:
        """A name's versions as on disk now (other replicas' uploads and deletes), into the index."""
        if not NAME.match(name) or name in self.extra or name in self._found:
            with self._lock:
                return self._index.get(name)
        try:
            versions = self._scan_name(self.root / name) if (self.root / name).is_dir() else []
        except OSError as exc:  # the folder changed while read (another replica): unknown for now
            log.warning("reading adapter %s from the store failed: %s", name, exc)
            return None
        if not versions and self.lookup is not None and (self.lookup / name / CONFIG_FILE).is_file():
            found = _plain_version(name, self.lookup / name)
            if found is not None:
                self._found[name] = self.lookup / name
                versions = [found]
        with self._lock:
            self._changes += 1
            old = self._index.get(name)
            if not versions:
                if old is not None:  # deleted by another replica since the last refresh
                    del self._index[name]
                    self._names.remove(name)
                    self._entry_bytes.pop(name, None)
                return None
            known = {v.ref.key: v for v in old.versions} if old else {}
            entry = Entry(tuple(known.get(v.ref.key, v) for v in versions))
            self._index[name] = entry
            if old is None:
                bisect.insort(self._names, name)
            self._entry_bytes[name] = _entry_size(name, entry)
        if old is None or old != entry:
            log.info("found adapter %s on disk (%d versions)", name, len(versions))
        return entry

    # ---- reading ----

    def resolve(self, model: str) -> AdapterRef:
        """`name` (its latest version) or `name@N`; UnknownAdapter (a KeyError) if there is none."""
        return self.version(model).ref

    def version(self, model: str) -> Version:
        """The version `model` names; on a miss, the store folder is read again before giving up."""
        name, _, wanted = model.partition("@")
        with self._lock:
            entry = self._index.get(name)
        found = _pick(entry, wanted) if entry is not None else None
        if found is None:
            entry = self._look_up(name)
            found = _pick(entry, wanted) if entry is not None else None
        if found is None:
            raise UnknownAdapter(model)
        return found

    def versions(self, name: str) -> list[Version]:
        with self._lock:
            entry = self._index.get(name)
        if entry is None:
            raise UnknownAdapter(name)
        return list(entry.versions)

    def names(self) -> list[AdapterRef]:
        """The latest version of every adapter, by name."""
        with self._lock:
            return [self._index[name].latest.ref for name in self._names]

    def page(self, after: str | None, limit: int) -> tuple[list[Entry], bool]:
        """Up to `limit` entries by name, starting after the name `after`; and whether more follow."""
        with self._lock:
            start = bisect.bisect_right(self._names, after) if after is not None else 0
            names = self._names[start : start + limit]
            more = start + limit < len(self._names)
            return [self._index[name] for name in names], more

    def stats(self) -> StoreStats:
        """Counts and estimated memory of the index (the metrics read it at every scrape)."""
        with self._lock:
            entries = list(self._index.values())
            index_bytes = sum(self._entry_bytes.values()) + sys.getsizeof(self._index)
        versions = [v for entry in entries for v in entry.versions]
        return StoreStats(
            adapters=len(entries),
            versions=len(versions),
            unverified=sum(not v.verified for v in versions),
            index_bytes=index_bytes + sys.getsizeof(self._names),
        )

    def verified_path(self, ref: AdapterRef) -> Path:
        """The folder to load `ref` from, its checksums verified on first use.

        A version whose files no longer match meta.json leaves the index, and StoreError says why.
        Called on the adapter loader thread, never on the event loop.
        """
        with self._lock:
            entry = self._index.get(ref.name)
        version = next((v for v in entry.versions if v.ref == ref), None) if entry else None
        if version is None or version.verified:
            return ref.path  # verified already, or deleted while waiting (its files stay until restart)
        for file, expected in version.meta.files.items():
            try:
                actual = sha256_file(ref.path / file)
            except OSError as exc:
                actual = f"unreadable ({exc.strerror})"
            if actual != expected:
                self._drop(ref)
                raise StoreError(
                    f"adapter {ref.name} version {ref.version}: {file} no longer matches its checksum "
                    "(changed on disk since it was published); it is no longer served"
                )
        version.verified = True
        return ref.path

    # ---- writing ----

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh folder to receive an upload; removed afterwards unless it was published."""
        folder = self.root / STAGING / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
        folder.mkdir(parents=True)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def publish(self, name: str, folder: Path) -> VersionMeta:
        """Validate a staged adapter and make it the newest version of `name`, atomically.

        Slow and blocking (parse, hash, fsync): call it off the event loop. Only the final
        index update holds the index lock.
        """
        check_name(name)
        if name in self.extra or name in self._found:
            raise StoreError(f"{name} is served from --adapter or --adapter-dir; it cannot take uploads")
        if self.validate is None:
            raise StoreError("this store has no validator; it cannot take uploads")
        weights = self.validate(folder)  # AdapterError for anything that cannot be served
        info = describe(folder)
        files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}
        weights_file = next(n for n in files if n.endswith(".safetensors"))
        _fsync_tree(folder)
        target_dir = self.root / name
        with self._publishing():
            target_dir.mkdir(parents=True, exist_ok=True)
            number = _next_version(target_dir)
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
            _write_durably(folder / META_FILE, json.dumps(asdict(meta), indent=2))
            _write_durably(target_dir / LAST_VERSION, str(number))  # reserved even if the rename fails
            final = target_dir / str(number)
            os.rename(folder, final)  # the publish: one atomic rename
            _fsync_dir(target_dir)
            ref = AdapterRef(name, number, final, info.peft_type, info.virtual_tokens, meta.sha256)
            self._put(name, Version(ref, meta))
        log.info("published %s version %d (%s, %d bytes)", name, number, meta.peft_type, meta.size_bytes)
        return meta

    def delete(self, name: str) -> None:
        """Hide every version of `name` now; their files go at a later start (see DELETED_GRACE)."""
        self._look_up(name)  # as on disk now: other replicas may have published or deleted since
        with self._lock:
            entry = self._index.pop(name, None)
            self._changes += 1
            if entry is not None:
                self._names.remove(name)
                self._entry_bytes.pop(name, None)
        if entry is None:
            raise UnknownAdapter(name)
        if name in self.extra:
            return
        if self._found.pop(name, None) is not None:
            return  # served from --adapter-dir, whose folders are not ours to mark
        with self._publishing():
            folder = self.root / name
            highest = max([v.ref.version for v in entry.versions] + [_next_version(folder) - 1])
            _write_durably(folder / LAST_VERSION, str(highest))  # outlives the files deleted at restart
            # Versions another replica published since this one last looked go too.
            published = [p for p in folder.glob("*") if p.is_dir() and p.name.isdigit()]
            for path in {*published, *(v.ref.path for v in entry.versions)}:
                (path / DELETED_MARK).touch()
        log.info("deleted %s (%d versions)", name, len(entry.versions))

    @contextmanager
    def _publishing(self) -> Iterator[None]:
        """Exclusive numbering and renames: among this process's threads, and other processes."""
        with self._publish_lock:
            self.root.mkdir(parents=True, exist_ok=True)
            with (self.root / PUBLISH_LOCK).open("a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def _put(self, name: str, version: Version) -> None:
        with self._lock:
            self._changes += 1
            old = self._index.get(name)
            entry = Entry((*old.versions, version) if old else (version,))
            self._index[name] = entry
            if old is None:
                bisect.insort(self._names, name)
            self._entry_bytes[name] = _entry_size(name, entry)

    def _drop(self, ref: AdapterRef) -> None:
        """Take one version out of the index (its files stay)."""
        with self._lock:
            self._changes += 1
            self._bad.add(ref.key)
            entry = self._index.get(ref.name)
            if entry is None:
                return
            rest = tuple(v for v in entry.versions if v.ref != ref)
            if rest:
                self._index[ref.name] = Entry(rest)
                self._entry_bytes[ref.name] = _entry_size(ref.name, self._index[ref.name])
            else:
                del self._index[ref.name]
                self._names.remove(ref.name)
                self._entry_bytes.pop(ref.name, None)
        log.error("adapter %s version %d dropped from the index", ref.name, ref.version)


def _pick(entry: Entry, wanted: str) -> Version | None:
    """The latest version, or the one numbered `wanted`."""
    if not wanted:
        return entry.latest
    return next((v for v in entry.versions if str(v.ref.version) == wanted), None)


def _signature(folder: Path) -> tuple:
    """What changes when a version is published, deleted or replaced in a name's folder."""
    try:
        subfolders = tuple(sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_dir()))
        return folder.stat().st_mtime_ns, subfolders
    except OSError:
        return (time.monotonic_ns(),)  # changing under us: never equal, so read it again next time


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _abandoned(folder: Path) -> bool:
    """A staging folder no live upload owns: its process (on this host) is gone, or it is stale."""
    parts = folder.name.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return True  # not named by a process of ours
    host, pid = parts[0], int(parts[1])
    if host != socket.gethostname():
        return time.time() - _mtime(folder) > STALE_STAGING
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def _next_version(folder: Path) -> int:
    """One above every number `folder` has used: its version folders, a plain adapter (1), LAST_VERSION."""
    if not folder.is_dir():
        return 1
    taken = [int(p.name) for p in folder.iterdir() if p.name.isdigit()]
    plain = 1 if (folder / CONFIG_FILE).is_file() else 0
    try:
        last = int((folder / LAST_VERSION).read_text().strip())
    except (OSError, ValueError):
        last = 0
    return max([*taken, plain, last]) + 1


def _write_durably(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def _deep_size(obj: object, seen: set[int]) -> int:
    """Bytes held by an index object and what it references (strings, lists, dataclasses, paths)."""
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(_deep_size(k, seen) + _deep_size(v, seen) for k, v in obj.items())
    elif isinstance(obj, list | tuple):
        size += sum(_deep_size(item, seen) for item in obj)
    elif isinstance(obj, Path):
        size += _deep_size(str(obj), seen)
    elif hasattr(obj, "__dataclass_fields__"):
        size += sum(_deep_size(getattr(obj, f), seen) for f in obj.__dataclass_fields__)
    return size


def _entry_size(name: str, entry: Entry) -> int:
    return _deep_size(name, set()) + _deep_size(entry, set())


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
    files = [p for p in path.iterdir() if p.is_file()]
    digest = _stat_digest(path)
    meta = VersionMeta(
        name=name,
        version=number,
        peft_type=info.peft_type,
        rank=info.rank,
        target_modules=list(info.target_modules),
        size_bytes=sum(p.stat().st_size for p in files),
        sha256="",  # not ours to read at start: a plain folder is identified by its files' stat
        created=int(path.stat().st_mtime),
    )
    ref = AdapterRef(name, number, path, info.peft_type, info.virtual_tokens, digest)
    return Version(ref, meta)


def _managed_version(name: str, path: Path) -> Version | None:
    if (path / DELETED_MARK).exists():
        return None
    if not (path / META_FILE).exists():
        return _plain_version(name, path, int(path.name))  # placed by hand: no checksums to verify
    try:
        meta = VersionMeta(**json.loads((path / META_FILE).read_text()))
        info = describe(path)
    except (OSError, ValueError, TypeError) as exc:
        log.error("ignoring adapter %s version %s: %s", name, path.name, exc)
        return None
    ref = AdapterRef(name, int(path.name), path, info.peft_type, info.virtual_tokens, meta.sha256)
    return Version(ref, meta, verified=False)
