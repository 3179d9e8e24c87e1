"""Read an adapter folder into weights ready for a device slot, whatever its kind."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from server.adapters import bottleneck, ia3, lora, prefix, prompt
from server.adapters.common import (
    WEIGHTS_FILE,
    AdapterError,
    AdapterWeights,
    peft_type_of,
    positive_int,
    read_config,
    read_tensors,
    read_tensors_reference,
    target_list,
)
from server.adapters.lora import BaseWeight
from server.base_model import LoadedModel, ModelShape, dense_weight, linear_module

ADAPTERHUB_WEIGHTS = "adapter.safetensors"
# (folder, file name) -> the file's tensors, checked; read_tensors or read_tensors_reference.
Reader = Callable[[Path, str], dict[str, torch.Tensor]]


def load_adapter(
    folder: Path,
    shape: ModelShape,
    *,
    max_rank: int,
    dtype: torch.dtype,
    base_weight: BaseWeight,
    read: Reader = read_tensors,
) -> AdapterWeights:
    """Parse and validate an adapter folder against the base model; raises AdapterError.

    Runs on the loader thread: the result is in `dtype`, in memory of its own, ready for a slot.
    """
    config = read_config(folder)
    if bottleneck.is_adapterhub(config):
        weights = bottleneck.parse_adapterhub(config, read(folder, ADAPTERHUB_WEIGHTS), shape)
    else:
        peft_type = peft_type_of(config)
        tensors = read(folder, WEIGHTS_FILE)
        if peft_type == "LORA":
            return lora.parse(config, tensors, shape, max_rank, base_weight, dtype)  # packed in dtype
        if peft_type == "IA3":
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
    weights.own(dtype)
    return weights


def folder_loader(
    model: LoadedModel, max_rank: int, read: Reader = read_tensors
) -> Callable[[Path], AdapterWeights]:
    """Load (and so validate) adapter folders against this base model, in its dtype."""
    hf = model.hf

    def load(folder: Path) -> AdapterWeights:
        return load_adapter(
            folder,
            model.shape,
            max_rank=max_rank,
            dtype=model.dtype,
            base_weight=lambda layer, name: dense_weight(linear_module(hf, layer, name)),
            read=read,
        )

    return load


def reference_folder_loader(model: LoadedModel, max_rank: int) -> Callable[[Path], AdapterWeights]:
    """`folder_loader` reading files through the safetensors library: the reference for tests and bench."""
    return folder_loader(model, max_rank, read_tensors_reference)


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter's config says, read without its weights."""

    peft_type: str
    virtual_tokens: int = 0
    rank: int | None = None
    target_modules: tuple[str, ...] = ()


def describe(folder: Path) -> AdapterInfo:
    """Kind, virtual tokens, rank and targets from the config alone; raises AdapterError."""
    config = read_config(folder)
    if bottleneck.is_adapterhub(config):
        return AdapterInfo("BOTTLENECK")
    peft_type = peft_type_of(config)
    if peft_type in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"):
        return AdapterInfo(peft_type, virtual_tokens=positive_int(config, "num_virtual_tokens"))
    rank = config.get("bottleneck_size") if peft_type == "BOTTLENECK" else config.get("r")
    rank = rank if isinstance(rank, int) and not isinstance(rank, bool) else None
    return AdapterInfo(peft_type, rank=rank, target_modules=target_list(config))
