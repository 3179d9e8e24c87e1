"""The settings tree and the CLI generated from it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.cli import build_parser, main, settings_from_args
from server.config import Settings


def test_every_field_has_a_docstring_and_a_unique_name():
    for name, (_, info) in Settings.fields().items():
        assert info.description, f"{name} has no docstring"


def help_text(capsys, *command: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_help_lists_every_field(capsys):
    serve = help_text(capsys, "serve")
    client = help_text(capsys, "adapters", "list")
    for name, (section, _) in Settings.fields().items():
        text = client if section == "client" else serve
        assert "--" + name.replace("_", "-") in text
        assert f"PEFTSERVE_{name.upper()}" in text
    assert "--admin-key" in client and "--max-batch-size" not in client
    merge = help_text(capsys, "merge")
    assert "--adapter" in merge and "--out" in merge and "--quantize" in merge


def test_environment_then_flags(monkeypatch):
    monkeypatch.setenv("PEFTSERVE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("PEFTSERVE_PORT", "9001")
    args = build_parser().parse_args(["serve", "--port", "9002", "--dtype", "float32"])
    settings = settings_from_args(args)
    assert settings.engine.max_batch_size == 7
    assert settings.server.port == 9002
    assert settings.model.dtype == "float32"
    assert settings.model.quantize == "none"


def test_cache_folder_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTSERVE_CACHE", str(tmp_path))
    assert Settings.load().model.cache == tmp_path


def test_invalid_values_are_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--quantize", "fp3"])
    assert main(["serve", "--max-batch-size", "0"]) == 2
    assert "--max-batch-size" in capsys.readouterr().err
    with pytest.raises(ValidationError):
        Settings.load({"port": 70000})
    with pytest.raises(ValueError, match="unknown settings"):
        Settings.load({"no_such_field": 1})


def test_cpu_adapter_memory_takes_bytes_or_units(monkeypatch):
    assert Settings.load().adapters.cpu_adapter_memory == 2 * 1024**3
    assert Settings.load({"cpu_adapter_memory": "500MB"}).adapters.cpu_adapter_memory == 500 * 10**6
    assert Settings.load({"cpu_adapter_memory": 12345}).adapters.cpu_adapter_memory == 12345
    monkeypatch.setenv("PEFTSERVE_CPU_ADAPTER_MEMORY", "1.5GiB")
    args = build_parser().parse_args(["serve"])
    assert settings_from_args(args).adapters.cpu_adapter_memory == 3 * 1024**3 // 2
    args = build_parser().parse_args(["serve", "--cpu-adapter-memory", "64MiB"])
    assert settings_from_args(args).adapters.cpu_adapter_memory == 64 * 1024**2
    with pytest.raises(ValidationError):
        Settings.load({"cpu_adapter_memory": "lots"})
