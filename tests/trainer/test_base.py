import pytest
import torch

from trainer.base import base_name, load_base, resolve
from trainer.errors import UsageError


def test_base_must_be_a_local_model(tmp_path):
    with pytest.raises(UsageError, match="not a local model folder"):
        resolve(str(tmp_path))
    with pytest.raises(UsageError, match="no such file"):
        resolve(str(tmp_path / "model.gguf"))


def test_default_base_records_the_hub_name():
    assert base_name("default") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_name("/models/mine") == "/models/mine"


@pytest.mark.slow
def test_default_base_loads_from_a_plain_safetensors_copy():
    folder = resolve("default")
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    base = load_base("default")
    assert "quantization_config" not in base.model.config.to_dict()
    assert base.model.dtype == torch.float32 and base.model.config.num_hidden_layers == 30
    assert base.tokenizer.chat_template and base.tokenizer.pad_token_id is not None
