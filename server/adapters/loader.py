"""Read an adapter folder into weights ready for a device slot, whatever its kind."""

from __future__ import annotations

from pathlib import Path

import torch

from server.adapters import bottleneck, ia3, lora, prefix, prompt
from server.adapters.common import (
    AdapterError,
    AdapterWeights,
    peft_type_of,
    positive_int,
    read_config,
    read_tensors,
)
from server.adapters.lora import BaseWeight
from server.base_model import ModelShape

ADAPTERHUB_WEIGHTS = "adapter.safetensors"


def load_adapter(
    folder: Path, shape: ModelShape, *, max_rank: int, dtype: torch.dtype, base_weight: BaseWeight
) -> AdapterWeights:
    """Parse and validate an adapter folder against the base model; raises AdapterError."""
    config = read_config(folder)
    if bottleneck.is_adapterhub(config):
        weights = bottleneck.parse_adapterhub(config, read_tensors(folder, ADAPTERHUB_WEIGHTS), shape)
    else:
        peft_type = peft_type_of(config)
        tensors = read_tensors(folder)
        if peft_type == "LORA":
            weights = lora.parse(config, tensors, shape, max_rank, base_weight)
        elif peft_type == "IA3":
            weights = ia3.parse(config, tensors, shape)
        elif peft_type in ("PROMPT_TUNING", "P_TUNING"):
            weights = prompt.parse(config, tensors, shape, peft_type)
        elif peft_type == "PREFIX_TUNING":
            weights = prefix.parse(config, tensors, shape)
        else:
            weights = bottleneck.parse(config, tensors, shape)
    if weights.peft_type == "BOTTLENECK" and weights.rank > max_rank:
        raise AdapterError(
            f"bottleneck size {weights.rank} is above --max-lora-rank {max_rank}", "bottleneck_size"
        )
    weights.cast(dtype)
    return weights


def describe(folder: Path) -> tuple[str, int]:
    """(peft_type, virtual tokens) from the config alone, without reading the weights."""
    config = read_config(folder)
    if bottleneck.is_adapterhub(config):
        return "BOTTLENECK", 0
    peft_type = peft_type_of(config)
    if peft_type in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"):
        return peft_type, positive_int(config, "num_virtual_tokens")
    return peft_type, 0
