"""Random, non-zero adapters of every kind for a base model folder, and their references."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import (
    IA3Config,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from server.adapters.bottleneck import BottleneckReference, parse
from server.base_model import ModelShape, model_shape
from tests.helpers import reference_greedy, reference_steps

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
}


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
            else:
                param.copy_(noise * param.std().clamp(min=0.05))


def make_peft_adapter(base_dir: Path, kind: str, out: Path, seed: int = 0) -> Path:
    config = PEFT_KINDS[kind]()
    config.task_type = "CAUSAL_LM"
    torch.manual_seed(seed)
    model = get_peft_model(load_base(base_dir), config)
    _randomize(model, kind, seed)
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


@contextlib.contextmanager
def reference_model(
    base_dir: Path, adapter_dir: Path | None, quantize: str = "none", device: str = "cpu"
) -> Iterator[torch.nn.Module]:
    """The float32 reference model for one adapter (None: the base alone), on `device`: PEFT for
    PEFT kinds, our reference module for bottleneck ones. With `quantize` the base's linear layers
    are bitsandbytes-quantized as the server quantizes them, computing in float32."""
    if quantize == "none":
        base = load_base(base_dir).to(device)
    else:
        bnb = (
            BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
            )
            if quantize == "nf4"
            else BitsAndBytesConfig(load_in_8bit=True)
        )
        base = AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=torch.float32, quantization_config=bnb, device_map=device
        ).eval()
    if adapter_dir is None:
        yield base
        return
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config["peft_type"] != "BOTTLENECK":
        yield PeftModel.from_pretrained(base, adapter_dir).eval().to(device)
        return
    weights = parse(config, load_file(adapter_dir / "adapter_model.safetensors"), model_shape(base.config))
    for key, site in weights.sites.items():
        moved = {f.name: getattr(site, f.name) for f in dataclasses.fields(site)}
        weights.sites[key] = type(site)(
            **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()}
        )
    with BottleneckReference(base, weights).applied():
        yield base


def reference_steps_for(
    base_dir: Path,
    adapter_dir: Path | None,
    prompt_ids: list[int],
    max_new_tokens: int,
    quantize: str = "none",
    device: str = "cpu",
) -> list[tuple[int | None, float, float]]:
    """`reference_steps` (tokens with their float32 margins) of one adapter alone, or of the base."""
    with reference_model(base_dir, adapter_dir, quantize, device) as model:
        return reference_steps(model, prompt_ids, max_new_tokens)
