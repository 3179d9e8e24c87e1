"""Merge for zero latency: fold a LoRA (rsLoRA, DoRA) or IA3 adapter into the base weights.

The merged weights start from what the server computes with: the served linear layers'
weights, dequantized when the base runs in 4 or 8 bits. The export is a plain HF model folder
(safetensors, config, generation config, tokenizer) that `from_pretrained` loads, saved in
16-bit when the base was quantized. Prompt, prefix and bottleneck adapters change the input
or add a non-linear block, so there is nothing to fold them into; they are refused.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from server.adapters.common import AdapterError, AdapterWeights
from server.adapters.ia3 import IA3Weights
from server.adapters.lora import LoraWeights
from server.base_model import LoadedModel, dense_weight, linear_module

NOT_MERGEABLE = {
    "prompt_tuning": "prompt tuning adds virtual tokens before the input; no weight can hold them",
    "p_tuning": "P-tuning adds virtual tokens before the input; no weight can hold them",
    "prefix_tuning": "prefix tuning adds keys and values to the attention cache; no weight can hold them",
    "bottleneck": "a bottleneck adapter adds a non-linear block after attention or the MLP; "
    "it cannot be folded into linear weights",
}


class MergeError(AdapterError):
    """This adapter (or base) cannot be merged; the message says why."""


def check_mergeable(weights: AdapterWeights) -> None:
    if weights.kind in NOT_MERGEABLE:
        raise MergeError(
            f"{weights.peft_type} adapters cannot be merged: {NOT_MERGEABLE[weights.kind]}", "peft_type"
        )


def _fold(weight: torch.Tensor, bias: torch.Tensor | None, weights: AdapterWeights, site) -> tuple:
    """(out, in) float32 weight and its bias, with one site of the adapter folded in."""
    if isinstance(weights, LoraWeights) and site in weights.sites:
        lora = weights.sites[site]
        weight = weight + lora.b.float().t() @ lora.a.float()  # b carries the scaling
        if lora.dora_scale is not None:
            weight = lora.dora_scale.float().unsqueeze(1) * weight  # DoRA rescales rows, not the bias
    elif isinstance(weights, IA3Weights) and site in weights.sites:
        ia3 = weights.sites[site]
        scale = ia3.scale.float()
        if ia3.on_input:
            weight = weight * scale.unsqueeze(0)
        else:
            weight = weight * scale.unsqueeze(1)
            bias = None if bias is None else bias * scale
    return weight, bias


def _linears(model: LoadedModel):
    for layer in range(model.shape.num_layers):
        for name in model.shape.linear_dims():
            yield (layer, name), linear_module(model.hf, layer, name)


def export_merged(model: LoadedModel, weights: AdapterWeights, out: Path) -> Path:
    """Write the merged model to `out` (a new folder, published atomically)."""
    check_mergeable(weights)
    merged = AutoModelForCausalLM.from_pretrained(model.hf.name_or_path, dtype=torch.float32)
    for (layer, name), served in _linears(model):
        bias = None if served.bias is None else served.bias.detach().float()
        weight, bias = _fold(dense_weight(served), bias, weights, (layer, name))
        target = linear_module(merged, layer, name)
        target.weight.data = weight
        if bias is not None:
            target.bias.data = bias
    dtype = torch.bfloat16 if model.quantize != "none" and model.dtype == torch.float32 else model.dtype
    merged.to(dtype)
    if getattr(merged.config, "quantization_config", None) is not None:
        del merged.config.quantization_config
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    model.tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out


def fold_into(model: LoadedModel, weights: AdapterWeights) -> None:
    """Fold the adapter into the served weights in place (for `serve --merge-adapter`)."""
    check_mergeable(weights)
    if model.quantize != "none":
        raise MergeError(
            "--merge-adapter needs an unquantized base: merge offline with `peftserve merge` and serve the "
            "result with --quantize",
            "quantize",
        )
    with torch.no_grad():
        for site, served in _linears(model):
            bias = None if served.bias is None else served.bias.float()
            weight, bias = _fold(served.weight.float(), bias, weights, site)
            served.weight.copy_(weight.to(served.weight.dtype))
            if bias is not None:
                served.bias.copy_(bias.to(served.bias.dtype))
