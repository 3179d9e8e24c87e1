from pathlib import Path

import pytest

from trainer.config import DEFAULT_LR, METHODS, make_config
from trainer.errors import UsageError


def cfg(tmp_path: Path, **values):
    return make_config(data=tmp_path / "d.jsonl", out=tmp_path / "shout", **values)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_has_a_default_learning_rate(method, tmp_path):
    assert cfg(tmp_path, method=method).learning_rate == DEFAULT_LR[method]
    assert cfg(tmp_path, method=method, lr=0.5).learning_rate == 0.5


def test_adapter_name_defaults_to_the_out_folder(tmp_path):
    assert cfg(tmp_path, method="lora", push="http://x").adapter_name == "shout"
    assert cfg(tmp_path, method="lora", push="http://x", name="loud").adapter_name == "loud"


def test_errors_name_the_flag(tmp_path):
    with pytest.raises(UsageError, match="--batch-size: Input should be greater than or equal to 1"):
        cfg(tmp_path, method="lora", batch_size=0)
    with pytest.raises(UsageError, match="--num-virtual-tokens applies to --method prefix/prompt/ptuning"):
        cfg(tmp_path, method="lora", num_virtual_tokens=4)
