"""--push against a tiny in-test registry server that records and checks what arrives, and once
against peftserve itself."""

from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer, tiny_settings
from trainer.cli import main
from trainer.errors import PushError
from trainer.push import ADMIN_KEY_ENV, push_adapter


@pytest.fixture
def adapter_folder(tmp_path: Path) -> Path:
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00weights\xff")
    (tmp_path / "README.md").write_text("card")
    return tmp_path


def test_push_sends_name_files_and_admin_key(registry, adapter_folder, monkeypatch):
    monkeypatch.setenv(ADMIN_KEY_ENV, "s3cret")
    answer = push_adapter(adapter_folder, registry.url + "/", "shout")
    assert answer["name"] == "shout" and answer["version"] == 1
    got = registry.received[-1]
    assert got["name"] == "shout"
    assert got["auth"] == "Bearer s3cret"
    assert got["files"] == {
        "adapter_config.json": ("adapter_config.json", b'{"peft_type": "LORA"}'),
        "adapter_model.safetensors": ("adapter_model.safetensors", b"\x00weights\xff"),
    }


def test_push_without_admin_key_sends_no_authorization(registry, adapter_folder, monkeypatch):
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    push_adapter(adapter_folder, registry.url, "quiet")
    assert registry.received[-1]["auth"] is None


def test_refusal_shows_the_servers_message(registry, adapter_folder):
    with pytest.raises(PushError, match=r"HTTP 409\): adapter 'taken' already has this content as version 1"):
        push_adapter(adapter_folder, registry.url, "taken")


def test_unreachable_server_is_a_push_error(adapter_folder):
    with pytest.raises(PushError, match="cannot reach the server"):
        push_adapter(adapter_folder, "http://127.0.0.1:9", "x", timeout=2)


def test_incomplete_folder_is_not_sent(registry, tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    before = len(registry.received)
    with pytest.raises(PushError, match=r"no adapter_model\.safetensors"):
        push_adapter(tmp_path, registry.url, "x")
    assert len(registry.received) == before


def test_trained_adapter_pushed_to_a_real_server_is_served(
    tiny_base, chat_data, tiny_model_dir, tiny_model, tmp_path, monkeypatch, capsys
):
    """peftserve-train --push into peftserve's own registry, then a chat request names it."""
    settings = tiny_settings(tiny_model_dir, store=tmp_path / "store", admin_key="adm")
    with LiveServer(settings, tiny_model) as live:
        argv = ["--data", str(chat_data), "--method", "lora", "--base", str(tiny_base), "--max-steps", "2"]
        argv += ["--out", str(tmp_path / "counter"), "--push", live.url, "--name", "counter"]
        monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
        assert main(argv) == 1
        error = capsys.readouterr().err
        assert "HTTP 401" in error and f"the adapter is saved in {tmp_path / 'counter'}" in error
        assert not (tmp_path / "store" / "counter").exists()

        monkeypatch.setenv(ADMIN_KEY_ENV, "adm")
        assert main([*argv, "--overwrite"]) == 0
        assert "pushed to" in capsys.readouterr().out
        question = [{"role": "user", "content": "Count to 3."}]
        body = {"model": "counter", "messages": question, "max_tokens": 4}
        reply = httpx.post(live.url + "/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == "counter"
        assert reply.json()["usage"]["completion_tokens"] >= 1
