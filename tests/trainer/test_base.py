import pytest
import torch
from transformers import AutoModelForCausalLM

from trainer.base import base_name, default_gguf, load_base, resolve
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
def test_cached_default_base_equals_the_gguf_weights():
    folder = resolve("default")
    assert not (folder / "pytorch_model.bin").exists() and (folder / "model.safetensors").is_file()
    cached = load_base("default")
    assert "quantization_config" not in cached.model.config.to_dict()
    assert cached.tokenizer.chat_template
    gguf = default_gguf()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cached_weights = cached.model.state_dict()
    for name, tensor in direct.state_dict().items():
        assert torch.equal(cached_weights[name], tensor), name
