"""What AdaLoRA and VeRA share: both are served as plain LoRA, folded into `a` (r, in) and `b` (r, out).

Their parsers compute each site's float32 factors and hand them here to be checked against
--max-lora-rank and packed, in the server's dtype, into one buffer of the adapter's own (the
layout `lora.LoraWeights` uses), so installing, batching and merging are LoRA's.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from server.adapters.common import AdapterError, is_targeted, layer_module, module_path
from server.adapters.lora import LoraSite, LoraWeights
from server.base_model import ModelShape

_REFUSED = {
    "bias": ("none", "trained biases are not supported"),
    "fan_in_fan_out": (False, "fan_in_fan_out is for Conv1D models, not Llama-style linears"),
    "modules_to_save": (None, "modules_to_save is not supported with this method"),
    "trainable_token_indices": (None, "trainable_token_indices is not supported with this method"),
    "target_parameters": (None, "target_parameters is not supported"),
}


def check_options(config: dict[str, Any], peft_type: str) -> None:
    """Refuse the options of a LoRA-like config that change more than the low-rank factors."""
    for key, (allowed, why) in _REFUSED.items():
        value = config.get(key, allowed)
        if value not in (allowed, None) and value != [] and value != {}:
            raise AdapterError(f"{peft_type} {key}={value!r}: {why}", key)


def group_by_site(
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    shape: ModelShape,
    suffixes: re.Pattern[str],
    peft_type: str,
) -> dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]]:
    """{(layer, module): {suffix: (tensor name, tensor)}} of every tensor whose name ends with a suffix."""
    dims = shape.linear_dims()
    sites: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for name, tensor in tensors.items():
        kind = suffixes.search(name)
        site = layer_module(name, shape.num_layers) if kind else None
        if kind is None or site is None:
            raise AdapterError(f"tensor {name} is not a {peft_type} weight of a decoder linear layer", name)
        if site[1] not in dims:
            raise AdapterError(
                f"tensor {name} targets module {site[1]!r}, which the base lacks; it has {', '.join(dims)}",
                name,
            )
        if not is_targeted(config, module_path(*site)):
            raise AdapterError(
                f"tensor {name} has weights but target_modules does not name it", "target_modules"
            )
        sites.setdefault(site, {})[kind.group(1)] = (name, tensor)
    return sites


def pack(
    peft_type: str,
    config: dict[str, Any],
    factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
    max_rank: int,
    dtype: torch.dtype,
) -> LoraWeights:
    """LoRA weights from float32 (a (r, in), b (r, out)) per site, the scaling already in b."""
    if not factors:
        raise AdapterError(f"this {peft_type} adapter changes nothing: it has no non-zero factors", peft_type)
    for (layer, module), (a, _) in factors.items():
        if a.shape[0] > max_rank:
            raise AdapterError(
                f"{peft_type} layer {layer} {module} has rank {a.shape[0]}, "
                f"above --max-lora-rank {max_rank}; start the server with "
                f"--max-lora-rank {a.shape[0]} or more to serve it",
                "r",
            )
    total = sum(a.numel() + b.numel() for a, b in factors.values())
    buffer = torch.empty(total, dtype=dtype)
    weights = LoraWeights(peft_type=peft_type, config=config, packed=True)
    offset = 0
    for site, (a, b) in sorted(factors.items()):
        rank = a.shape[0]
        packed = LoraSite(
            a=buffer.as_strided(tuple(a.shape), (a.shape[1], 1), offset),
            b=buffer.as_strided(tuple(b.shape), (b.shape[1], 1), offset + a.numel()),
        )
        offset += rank * (a.shape[1] + b.shape[1])
        packed.a.copy_(a)
        packed.b.copy_(b)
        weights.sites[site] = packed
    return weights
