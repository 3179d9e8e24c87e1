"""The settings tree and the CLI generated from it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.cli import build_parser, main, settings_from_args
from server.config import Settings


def test_every_field_has_a_docstring_and_a_unique_name():
    for name, (_, info) in Settings.fields().items():
        assert info.description, f"{name} has no docstring"


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in Settings.fields():
        assert "--" + name.replace("_", "-") in out
        assert f"PEFTSERVE_{name.upper()}" in out


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
