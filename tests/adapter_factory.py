"""Random, non-zero adapters of every kind for a base model folder, and their references."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import (
    AdaLoraConfig,
    IA3Config,
    LoraConfig,
    OFTConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    VeraConfig,
    get_peft_model,
)
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from server.adapters.bottleneck import BottleneckReference, parse
from server.base_model import ModelShape
from tests.helpers import reference_greedy

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PEFT_KINDS = {
    "lora": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR, init_lora_weights=False),
    "rslora": lambda: LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
    ),
    "dora": lambda: LoraConfig(
        r=4,
        lora_alpha=8,
        use_dora=True,
        target_modules=["q_proj", "o_proj", "up_proj"],
        init_lora_weights=False,
    ),
    "ia3": lambda: IA3Config(init_ia3_weights=False),
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=4),
    "ptuning": lambda: PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=32),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=5),
    # issue 15, methods-b: served as LoRA (AdaLoRA, VeRA) or as an input rotation (OFT)
    "adalora": lambda: AdaLoraConfig(
        init_r=6,
        target_r=4,
        total_step=10,
        lora_alpha=12,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        init_lora_weights=False,
    ),
    "vera": lambda: VeraConfig(
        r=16,
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        save_projection=False,  # the harder case: the server regenerates the projections from the key
        projection_prng_key=7,
        init_weights=False,
    ),
    "oft": lambda: OFTConfig(
        oft_block_size=16, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], init_weights=False
    ),
    # issue 15, methods-a: add its kinds here
}
ADALORA_PRUNED = {"model.layers.0.self_attn.q_proj.lora_E": [True, False, True, True, False, True]}
"""A rank_pattern as AdaLoRA's budget leaves it: PEFT drops the masked ranks when it saves."""


def load_base(base_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def _randomize(peft_model: PeftModel, kind: str, seed: int) -> None:
    """Make every trainable tensor random and large enough to change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=generator)
            if "magnitude" in name:
                param.mul_(1 + 0.3 * noise)  # DoRA: move m away from ||W + sBA|| so the rescale matters
            elif kind == "ia3":
                param.copy_(1 + 0.5 * noise)
            elif kind == "vera" and "lambda_b" in name:
                param.copy_(0.3 * noise)
            elif kind == "adalora" and "lora_E" in name:
                kept = torch.arange(param.shape[0]) % 3 != 2  # as the budget prunes: zeros in E
                param.copy_(noise * kept.unsqueeze(1))
            else:
                param.copy_(noise * param.std().clamp(min=0.05))


def make_peft_adapter(base_dir: Path, kind: str, out: Path, seed: int = 0) -> Path:
    config = PEFT_KINDS[kind]()
    config.task_type = "CAUSAL_LM"
    torch.manual_seed(seed)
    model = get_peft_model(load_base(base_dir), config)
    _randomize(model, kind, seed)
    if kind == "adalora":
        model.peft_config["default"].rank_pattern = dict(ADALORA_PRUNED)
    model.save_pretrained(out)
    return out


def make_bottleneck_adapter(
    shape: ModelShape,
    out: Path,
    seed: int = 0,
    placement: str = "houlsby",
    activation: str = "gelu",
    adapter_input: str = "block_output",
    size: int = 8,
) -> Path:
    generator = torch.Generator().manual_seed(seed)
    hidden = shape.hidden_size
    blocks = ("attn", "mlp") if placement == "houlsby" else ("mlp",)
    tensors = {}
    for layer in range(shape.num_layers):
        for block in blocks:
            tensors[f"layers.{layer}.{block}.down.weight"] = (
                torch.randn(size, hidden, generator=generator) * 0.3
            )
            tensors[f"layers.{layer}.{block}.down.bias"] = torch.randn(size, generator=generator) * 0.1
            tensors[f"layers.{layer}.{block}.up.weight"] = (
                torch.randn(hidden, size, generator=generator) * 0.3
            )
            tensors[f"layers.{layer}.{block}.up.bias"] = torch.randn(hidden, generator=generator) * 0.1
    config = {
        "peft_type": "BOTTLENECK",
        "bottleneck_size": size,
        "placement": placement,
        "non_linearity": activation,
        "scaling": 0.5,
        "adapter_input": adapter_input,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, out / "adapter_model.safetensors")
    return out


def reference_tokens(
    base_dir: Path, adapter_dir: Path, prompt_ids: list[int], max_new_tokens: int, stop_at_eos: bool = True
) -> list[int]:
    """Greedy tokens of one adapter alone, over full forwards without a KV cache (`reference_greedy`):
    PEFT for PEFT kinds, our reference module for bottleneck ones."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = load_base(base_dir)
    if config["peft_type"] == "BOTTLENECK":
        from safetensors.torch import load_file

        from server.base_model import model_shape

        weights = parse(
            config, load_file(adapter_dir / "adapter_model.safetensors"), model_shape(base.config)
        )
        with BottleneckReference(base, weights).applied():
            return reference_greedy(base, prompt_ids, max_new_tokens, stop_at_eos)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    return reference_greedy(model, prompt_ids, max_new_tokens, stop_at_eos)
