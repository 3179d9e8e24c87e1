"""The store's index: plain folders, numbered versions, --adapter folders, and what it ignores."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from server.adapters.loader import folder_loader
from server.config import AdapterSettings, EngineSettings
from server.engine.engine import Engine
from server.engine.sampler import SamplingParams
from server.registry import store as store_module
from server.registry.store import Store, StoreError, parse_adapter_flag
from tests.adapter_factory import make_peft_adapter
from tests.conftest import LiveServer, tiny_settings
from tests.helpers import run_until_done, wait_until


@pytest.fixture(scope="module")
def lora(tmp_path_factory, tiny_model_dir):
    return make_peft_adapter(tiny_model_dir, "lora", tmp_path_factory.mktemp("src") / "lora")


def test_plain_and_versioned_folders(tmp_path, lora, tiny_model_dir):
    shutil.copytree(lora, tmp_path / "plain")
    shutil.copytree(lora, tmp_path / "multi" / "1")
    make_peft_adapter(tiny_model_dir, "prompt", tmp_path / "multi" / "2")
    store = Store(tmp_path)
    assert [(r.name, r.version) for r in store.names()] == [("multi", 2), ("plain", 1)]
    assert store.resolve("multi").version == 2
    assert store.resolve("multi").virtual_tokens == 4
    assert store.resolve("multi@1").peft_type == "LORA"
    assert store.resolve("plain@1").path == tmp_path / "plain"
    for missing in ("nope", "multi@3", "plain@x"):
        with pytest.raises(KeyError):
            store.resolve(missing)


def test_bad_entries_are_skipped(tmp_path, lora, caplog):
    shutil.copytree(lora, tmp_path / "Bad Name")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text('{"peft_type": "LOHA"}')
    (tmp_path / ".staging").mkdir()
    store = Store(tmp_path)
    assert store.names() == []
    assert "LOHA" in caplog.text and "Bad Name" in caplog.text


def test_adapter_flag(tmp_path, lora):
    store = Store(tmp_path / "empty", {"mine": lora})
    assert store.resolve("mine").path == lora
    assert parse_adapter_flag("x=/a/b") == ("x", Path("/a/b"))
    for bad in ("noequals", "=path", "UPPER=/x", "x="):
        with pytest.raises(StoreError):
            parse_adapter_flag(bad)
    with pytest.raises(StoreError, match="not a servable"):
        Store(tmp_path, {"ghost": tmp_path / "missing"})


@pytest.fixture
def validated(tmp_path, tiny_model):
    return Store(tmp_path / "store", validate=folder_loader(tiny_model, 64))


def publish_copy(store: Store, name: str, source: Path):
    with store.staging() as folder:
        for path in source.glob("adapter*"):
            shutil.copy(path, folder / path.name)
        return store.publish(name, folder)


def leftovers(root: Path) -> list[str]:
    """What the store holds besides its publish lock file."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name != store_module.PUBLISH_LOCK)


def test_publish_versions_and_index_rebuild(validated, lora):
    assert [publish_copy(validated, "bot", lora).version for _ in range(2)] == [1, 2]
    rebuilt = Store(validated.root)
    assert [v.ref.version for v in rebuilt.versions("bot")] == [1, 2]
    assert rebuilt.resolve("bot").digest == validated.resolve("bot").digest
    assert not (validated.root / ".staging").exists()


def test_crash_between_write_and_publish_leaves_nothing(validated, lora, monkeypatch):
    # What an upload leaves when the process dies after writing, before the publishing rename.
    folder = validated.root / ".staging" / "interrupted"
    folder.mkdir(parents=True)
    for path in lora.glob("adapter*"):
        shutil.copy(path, folder / path.name)

    def killed(*args):
        raise OSError("the process died here")

    monkeypatch.setattr("server.registry.store.os.rename", killed)
    with pytest.raises(OSError):
        validated.publish("bot", folder)
    monkeypatch.undo()
    assert validated.names() == []
    restarted = Store(validated.root)
    assert restarted.names() == []
    # At most the name folder and the number the failed publish reserved.
    assert leftovers(validated.root) in ([], ["bot"], ["bot", "bot/LAST_VERSION"])


def test_checksums_are_verified_at_first_load(validated, lora, caplog, monkeypatch):
    publish_copy(validated, "bot", lora)
    publish_copy(validated, "bot", lora)
    weights = validated.root / "bot" / "2" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    hashed = []
    real_sha = store_module.sha256_file
    monkeypatch.setattr(store_module, "sha256_file", lambda path: hashed.append(path) or real_sha(path))
    restarted = Store(validated.root)
    assert hashed == [], "start-up reads no weights"
    assert [v.ref.version for v in restarted.versions("bot")] == [1, 2]
    assert restarted.stats().unverified == 2
    good, bad = (restarted.resolve(f"bot@{n}") for n in (1, 2))
    assert restarted.verified_path(good) == good.path
    with pytest.raises(StoreError, match="no longer matches its checksum"):
        restarted.verified_path(bad)
    assert [v.ref.version for v in restarted.versions("bot")] == [1]
    assert "dropped from the index" in caplog.text
    count = len(hashed)
    restarted.verified_path(good)
    assert len(hashed) == count, "a version is verified once"
    assert restarted.stats().unverified == 0


def test_a_corrupt_version_fails_its_request_not_the_server(validated, lora, tiny_model):
    publish_copy(validated, "bot", lora)
    weights = validated.root / "bot" / "1" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    restarted = Store(validated.root, validate=validated.validate)
    engine = Engine(tiny_model, EngineSettings(), AdapterSettings(), restarted)
    handle = engine.submit([1, 2, 3], SamplingParams(max_tokens=2), restarted.resolve("bot"))
    (events,) = run_until_done(engine, [handle])
    assert events[-1].reason == "error" and "checksum" in events[-1].error
    with pytest.raises(KeyError):
        restarted.resolve("bot")


def test_version_numbers_are_never_reused(validated, lora, tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "DELETED_GRACE", 0)  # deleted files go at the next start
    assert [publish_copy(validated, "bot", lora).version for _ in range(2)] == [1, 2]
    validated.delete("bot")
    restarted = Store(validated.root, validate=validated.validate)  # deleted files go now
    assert not (validated.root / "bot" / "2").exists()
    assert publish_copy(restarted, "bot", lora).version == 3
    # A plain folder is version 1 of its name; deleting it does not free the number either.
    plain = tmp_path / "plain-store"
    shutil.copytree(lora, plain / "hand")
    store = Store(plain, validate=validated.validate)
    store.delete("hand")
    store = Store(plain, validate=validated.validate)
    assert store.names() == []
    assert publish_copy(store, "hand", lora).version == 2


def fake_store(root: Path, config: str, count: int) -> list[str]:
    """`count` published-looking adapters whose weights are never read (nor valid)."""
    weights = b"not read at start"
    digest = store_module.hashlib.sha256(weights).hexdigest()
    names = [f"a{i:05d}" for i in range(count)]
    for name in names:
        folder = root / name / "1"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(config)
        (folder / "adapter_model.safetensors").write_bytes(weights)
        meta = {
            "name": name,
            "version": 1,
            "peft_type": "LORA",
            "rank": 8,
            "target_modules": ["q_proj"],
            "size_bytes": 1,
            "sha256": digest,
            "created": 0,
            "files": {"adapter_model.safetensors": digest},
        }
        (folder / "meta.json").write_text(json.dumps(meta))
    return names


def test_a_store_of_thousands_starts_lazily_and_pages(tmp_path, lora, monkeypatch):
    names = fake_store(tmp_path, (lora / "adapter_config.json").read_text(), 3000)
    monkeypatch.setattr(store_module, "sha256_file", lambda path: pytest.fail("hashed at start-up"))
    store = Store(tmp_path)
    stats = store.stats()
    assert (stats.adapters, stats.versions, stats.unverified) == (3000, 3000, 3000)
    assert stats.index_bytes > 3000 * 100
    seen, after = [], None
    while True:
        page, more = store.page(after, 1000)
        seen += [e.latest.ref.name for e in page]
        if not more:
            break
        after = seen[-1]
    assert seen == names
    assert [e.latest.ref.name for e in store.page("a02998", 10)[0]] == ["a02999"]
    assert store.page("a02999", 10) == ([], False)


def test_thousands_of_adapters_over_http(tmp_path, lora, tiny_model_dir, tiny_model):
    names = fake_store(tmp_path / "store", (lora / "adapter_config.json").read_text(), 2000)
    with LiveServer(tiny_settings(tiny_model_dir, store=tmp_path / "store"), tiny_model) as live:
        http = httpx.Client(base_url=live.url, timeout=60)
        first = http.get("/v1/adapters").json()
        assert len(first["data"]) == 100 and first["has_more"] and first["last_id"] == names[99]
        listed, after = [], None
        while True:
            page = http.get(
                "/v1/adapters", params={"limit": 1000, **({"after": after} if after else {})}
            ).json()
            listed += [a["name"] for a in page["data"]]
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert listed == names
        models = http.get("/v1/models").json()["data"]
        assert [m["id"] for m in models[1:]] == names
        some = http.get("/v1/models", params={"limit": 10, "after": names[-5]}).json()
        assert [m["id"] for m in some["data"]] == names[-4:] and not some["has_more"]
        metrics = http.get("/metrics").text
        assert "peftserve_store_adapters 2000.0" in metrics
        assert "peftserve_store_unverified_versions 2000.0" in metrics


def test_deleted_versions_go_at_the_next_start(validated, lora):
    publish_copy(validated, "bot", lora)
    path = validated.resolve("bot").path
    validated.delete("bot")
    assert path.exists(), "files stay while requests may still load them"
    with pytest.raises(KeyError):
        validated.resolve("bot")
    Store(validated.root)
    assert path.exists(), "another replica may still be loading it: it stays for DELETED_GRACE"
    aged = time.time() - store_module.DELETED_GRACE - 1
    os.utime(path / store_module.DELETED_MARK, (aged, aged))
    Store(validated.root)
    assert not path.exists()


@pytest.mark.slow
def test_kill_9_mid_upload_leaves_no_partial_adapter(tmp_path, tiny_model_dir, lora):
    root = tmp_path / "store"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--model",
            str(tiny_model_dir),
            "--dtype",
            "float32",
            "--store",
            str(root),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _healthy(port), timeout=120)
        weights = (lora / "adapter_model.safetensors").read_bytes()
        head = (
            b'--x\r\nContent-Disposition: form-data; name="name"\r\n\r\nhalf\r\n'
            b'--x\r\nContent-Disposition: form-data; name="file"; '
            b'filename="adapter_model.safetensors"\r\n\r\n'
        )
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"POST /v1/adapters HTTP/1.1\r\nhost: x\r\ncontent-type: multipart/form-data; boundary=x\r\n"
                + f"content-length: {len(head) + len(weights) + 100}\r\n\r\n".encode()
                + head
                + weights[: len(weights) // 2]
            )
            time.sleep(0.5)
            server.send_signal(signal.SIGKILL)
            server.wait(timeout=30)
    finally:
        server.kill()
    restarted = Store(root)
    assert restarted.names() == []
    assert leftovers(root) == []


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_resolving_never_waits_for_an_upload(validated, lora, monkeypatch):
    publish_copy(validated, "live", lora)
    in_fsync, release = threading.Event(), threading.Event()
    real_fsync = store_module._fsync_tree

    def slow_fsync(folder):
        in_fsync.set()
        release.wait(timeout=60)
        real_fsync(folder)

    monkeypatch.setattr(store_module, "_fsync_tree", slow_fsync)
    uploader = threading.Thread(target=publish_copy, args=(validated, "new", lora))
    uploader.start()
    try:
        assert in_fsync.wait(timeout=60)
        resolved = threading.Event()
        threading.Thread(target=lambda: validated.resolve("live") and resolved.set(), daemon=True).start()
        assert resolved.wait(timeout=30), "resolve waited for the upload's fsync"
        assert [r.name for r in validated.names()] == ["live"]
    finally:
        release.set()
        uploader.join()
    assert [r.name for r in validated.names()] == ["live", "new"]


PUBLISHER = """
import shutil, sys, time, types
from pathlib import Path
from server.registry.store import Store

root, source, count, go = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
# Numbering is under test, not validation: a stand-in validator keeps the processes light.
weights = types.SimpleNamespace(peft_type="LORA", rank=8, target_modules=[])
store = Store(root, validate=lambda folder: weights)
print("ready", flush=True)
while not go.exists():  # both start publishing together, so their numbering races
    time.sleep(0.001)
for _ in range(count):
    with store.staging() as folder:
        for path in source.glob("adapter*"):
            shutil.copy(path, folder / path.name)
        print(store.publish("same", folder).version, flush=True)
"""


def test_two_processes_publishing_one_name_get_distinct_versions(tmp_path, lora):
    root, count, go = tmp_path / "store", 40, tmp_path / "go"
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", PUBLISHER, str(root), str(lora), str(count), str(go)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    assert all(w.stdout.readline().strip() == "ready" for w in writers)
    go.touch()
    numbers = [[int(line) for line in w.communicate(timeout=300)[0].split()] for w in writers]
    assert all(w.returncode == 0 for w in writers)
    assert sorted(numbers[0] + numbers[1]) == list(range(1, 2 * count + 1))
    assert [v.ref.version for v in Store(root).versions("same")] == list(range(1, 2 * count + 1))
