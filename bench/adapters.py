"""Random adapters in PEFT's saved format, written directly (no PEFT model needed), for benchmarks
and load tests. Weights are small random values: they change the output but keep it sane."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from server.base_model import ModelShape

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _peft_name(layer: int, module: str) -> str:
    block = "mlp" if module in MLP else "self_attn"
    return f"base_model.model.model.layers.{layer}.{block}.{module}"


def _write(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"task_type": "CAUSAL_LM", **config}, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    return folder


def write_lora(folder: Path, shape: ModelShape, rank: int = 16, seed: int = 0, dora: bool = False) -> Path:
    """LoRA (or DoRA) of `rank` on every linear layer."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shape.num_layers):
        for module, (fan_in, fan_out) in shape.linear_dims().items():
            name = _peft_name(layer, module)
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
            tensors[f"{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.01
            if dora:
                tensors[f"{name}.lora_magnitude_vector"] = 1 + 0.05 * torch.randn(fan_out, generator=gen)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(ALL_LINEAR)}
    if dora:
        config["use_dora"] = True
    return _write(folder, config, tensors)


def write_ia3(folder: Path, shape: ModelShape, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    dims = shape.linear_dims()
    tensors = {}
    for layer in range(shape.num_layers):
        for module in ("k_proj", "v_proj"):
            tensors[f"{_peft_name(layer, module)}.ia3_l"] = 1 + 0.1 * torch.randn(
                dims[module][1], 1, generator=gen
            )
        tensors[f"{_peft_name(layer, 'down_proj')}.ia3_l"] = 1 + 0.1 * torch.randn(
            1, dims["down_proj"][0], generator=gen
        )
    config = {
        "peft_type": "IA3",
        "target_modules": ["k_proj", "v_proj", "down_proj"],
        "feedforward_modules": ["down_proj"],
    }
    return _write(folder, config, tensors)


def write_prompt(
    folder: Path, shape: ModelShape, tokens: int = 16, seed: int = 0, prefix: bool = False
) -> Path:
    """Prompt tuning, or prefix tuning with `prefix=True`."""
    gen = torch.Generator().manual_seed(seed)
    if prefix:
        width = shape.num_layers * 2 * shape.kv_dim
        config = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": tokens, "token_dim": shape.kv_dim}
    else:
        width = shape.hidden_size
        config = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": tokens, "token_dim": width}
    return _write(folder, config, {"prompt_embeddings": torch.randn(tokens, width, generator=gen) * 0.05})


def write_bottleneck(folder: Path, shape: ModelShape, size: int = 64, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    hidden = shape.hidden_size
    tensors = {}
    for layer in range(shape.num_layers):
        for block in ("attn", "mlp"):
            tensors[f"layers.{layer}.{block}.down.weight"] = (
                torch.randn(size, hidden, generator=gen) / hidden**0.5
            )
            tensors[f"layers.{layer}.{block}.down.bias"] = torch.zeros(size)
            tensors[f"layers.{layer}.{block}.up.weight"] = torch.randn(hidden, size, generator=gen) * 0.01
            tensors[f"layers.{layer}.{block}.up.bias"] = torch.zeros(hidden)
    config = {
        "peft_type": "BOTTLENECK",
        "bottleneck_size": size,
        "placement": "houlsby",
        "non_linearity": "relu",
    }
    return _write(folder, config, tensors)


def zipf_choices(count: int, population: int, s: float, seed: int) -> list[int]:
    """`count` ranks in 0..population-1 with P(rank k) proportional to 1/(k+1)^s (s = 0 is uniform)."""
    weights = torch.tensor([1.0 / (k + 1) ** s for k in range(population)])
    return torch.multinomial(
        weights, count, replacement=True, generator=torch.Generator().manual_seed(seed)
    ).tolist()
