"""Merge for zero latency: fold a LoRA (rsLoRA, DoRA) or IA3 adapter into the base weights.

The merged weights start from what the server computes with: the served linear layers'
weights, dequantized when the base runs in 4 or 8 bits. The export is a plain HF model folder
(safetensors, config, generation config, tokenizer) that `from_pretrained` loads, saved in
16-bit when the base was quantized. Each method says whether and how it folds (`Method.fold`,
`merge_refusal`); folding runs on the base's device.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from server.adapters.common import AdapterError, AdapterWeights
from server.adapters.methods import method_of
from server.base_model import LoadedModel, dense_weight, linear_module


class MergeError(AdapterError):
    """This adapter (or base) cannot be merged; the message says why."""


def check_mergeable(weights: AdapterWeights) -> None:
    refusal = method_of(weights).merge_refusal
    if refusal is not None:
        raise MergeError(f"{weights.peft_type} adapters cannot be merged: {refusal}", "peft_type")


def _linears(model: LoadedModel):
    for layer in range(model.shape.num_layers):
        for name in model.shape.linear_dims():
            yield (layer, name), linear_module(model.hf, layer, name)


def export_merged(model: LoadedModel, weights: AdapterWeights, out: Path) -> Path:
    """Write the merged model to `out` (a new folder, published atomically)."""
    check_mergeable(weights)
    method = method_of(weights)
    merged = AutoModelForCausalLM.from_pretrained(model.hf.name_or_path, dtype=torch.float32)
    for (layer, name), served in _linears(model):
        bias = None if served.bias is None else served.bias.detach().float()
        weight, bias = method.fold(weights, (layer, name), dense_weight(served), bias)
        target = linear_module(merged, layer, name)
        target.weight.data = weight.cpu()
        if bias is not None:
            target.bias.data = bias.cpu()
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
    method = method_of(weights)
    if model.quantize != "none":
        raise MergeError(
            "--merge-adapter needs an unquantized base: merge offline with `peftserve merge` and serve the "
            "result with --quantize",
            "quantize",
        )
    with torch.no_grad():
        for site, served in _linears(model):
            bias = None if served.bias is None else served.bias.float()
            weight, bias = method.fold(weights, site, served.weight.float(), bias)
            served.weight.copy_(weight.to(served.weight.dtype))
            if bias is not None:
                served.bias.copy_(bias.to(served.bias.dtype))
