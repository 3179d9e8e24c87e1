from pathlib import Path

import pytest

from trainer.config import make_config
from trainer.errors import UsageError
from trainer.output import hyperparameters, staged_folder


def test_staged_folder_publishes_on_success(tmp_path):
    out = tmp_path / "a" / "adapter"
    with staged_folder(out, overwrite=False) as staging:
        (staging / "x").write_text("1")
        assert not out.exists()
    assert (out / "x").read_text() == "1"
    assert [p.name for p in out.parent.iterdir()] == ["adapter"]


def test_staged_folder_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "adapter"
    with pytest.raises(RuntimeError), staged_folder(out, overwrite=False) as staging:
        (staging / "x").write_text("1")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_staged_folder_replaces_only_with_overwrite(tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(UsageError, match="already exists"), staged_folder(out, overwrite=False):
        pass
    with staged_folder(out, overwrite=True) as staging:
        (staging / "new").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_hyperparameters_resolve_defaults_and_skip_other_methods(tmp_path: Path):
    cfg = make_config(data=tmp_path / "d", out=tmp_path / "o", method="bottleneck", placement="pfeiffer")
    values = hyperparameters(cfg)
    assert values["learning_rate"] == 1e-3
    assert values["placement"] == "pfeiffer" and values["bottleneck_size"] == 64
    assert "r" not in values and "num_virtual_tokens" not in values and "data" not in values
