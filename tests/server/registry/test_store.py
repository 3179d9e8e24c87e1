"""The store's index: plain folders, numbered versions, --adapter folders, and what it ignores."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.adapters.loader import folder_loader
from server.registry.store import Store, StoreError, parse_adapter_flag
from tests.adapter_factory import make_peft_adapter
from tests.helpers import wait_until


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
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


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
    assert leftovers(validated.root) in ([], ["bot"])  # at most the empty name folder


def test_checksums_are_verified_at_start(validated, lora, caplog):
    publish_copy(validated, "bot", lora)
    publish_copy(validated, "bot", lora)
    weights = validated.root / "bot" / "2" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    restarted = Store(validated.root)
    assert [v.ref.version for v in restarted.versions("bot")] == [1]
    assert "checksum mismatch" in caplog.text


def test_deleted_versions_go_at_the_next_start(validated, lora):
    publish_copy(validated, "bot", lora)
    path = validated.resolve("bot").path
    validated.delete("bot")
    assert path.exists(), "files stay while requests may still load them"
    with pytest.raises(KeyError):
        validated.resolve("bot")
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
