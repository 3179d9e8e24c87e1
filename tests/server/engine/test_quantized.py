"""A 4-bit or 8-bit base (bitsandbytes, on CPU) serves like PEFT on the same quantized model."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from server.base_model import load_base_model
from server.config import AdapterSettings, EngineSettings, Settings
from server.engine.engine import Engine
from server.engine.sampler import SamplingParams
from server.registry.store import Store
from tests.adapter_factory import make_peft_adapter
from tests.helpers import reference_greedy, run_until_done, token_ids

CONFIGS = {
    "nf4": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    ),
    "int8": BitsAndBytesConfig(load_in_8bit=True),
}


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_quantized_base_with_an_adapter_equals_peft(quantize, tiny_model_dir, tmp_path):
    make_peft_adapter(tiny_model_dir, "lora", tmp_path / "bot", seed=3)
    model = load_base_model(
        Settings.load({"model": str(tiny_model_dir), "dtype": "float32", "quantize": quantize}).model
    )
    assert type(model.hf.model.layers[0].self_attn.q_proj).__name__ in ("Linear4bit", "Linear8bitLt")
    engine = Engine(model, EngineSettings(), AdapterSettings(), Store(tmp_path))
    prompt = model.tokenizer("The quick brown fox").input_ids
    params = SamplingParams(max_tokens=8, temperature=0.0)
    handles = [engine.submit(prompt, params, engine.resolve_model("bot")), engine.submit(prompt, params)]
    served = [token_ids(events) for events in run_until_done(engine, handles)]
    base = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=CONFIGS[quantize], device_map="cpu"
    )
    expected_base = reference_greedy(base, prompt, 8)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "bot").eval()
    assert served == [reference_greedy(peft_model, prompt, 8), expected_base]
