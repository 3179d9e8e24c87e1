"""The store's index: plain folders, numbered versions, --adapter folders, and what it ignores."""

from __future__ import annotations

import shutil

import pytest

from server.registry.store import Store, StoreError, parse_adapter_flag
from tests.adapter_factory import make_peft_adapter


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
    assert parse_adapter_flag("x=/a/b") == ("x", __import__("pathlib").Path("/a/b"))
    for bad in ("noequals", "=path", "UPPER=/x", "x="):
        with pytest.raises(StoreError):
            parse_adapter_flag(bad)
    with pytest.raises(StoreError, match="not a servable"):
        Store(tmp_path, {"ghost": tmp_path / "missing"})
