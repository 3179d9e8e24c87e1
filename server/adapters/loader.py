"""Read an adapter folder into weights ready for a device slot, whatever its method."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from server.adapters.common import (
    AdapterError,
    AdapterWeights,
    read_config,
    read_tensors,
    read_tensors_reference,
)
from server.adapters.method import AdapterInfo, BaseWeight, ParseContext
from server.adapters.methods import method_for
from server.base_model import LoadedModel, ModelShape, dense_weight, linear_module

__all__ = [
    "AdapterError",
    "AdapterInfo",
    "describe",
    "folder_loader",
    "load_adapter",
    "reference_folder_loader",
]

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
    own: bool = True,
) -> AdapterWeights:
    """Parse and validate an adapter folder against the base model; raises AdapterError.

    Runs on the loader thread. With `own`, the result is in `dtype`, in memory of its own;
    without, it may still view the file's mapping: the server installs it into a slot straight
    from there, then calls `own` for its CPU cache.
    """
    config = read_config(folder)
    method = method_for(config)
    tensors = read(folder, method.weights_file(config))
    weights = method.parse(config, tensors, ParseContext(shape, max_rank, dtype, base_weight))
    if own:
        weights.own(dtype)
    return weights


def folder_loader(
    model: LoadedModel, max_rank: int, read: Reader = read_tensors, own: bool = True
) -> Callable[[Path], AdapterWeights]:
    """Load (and so validate) adapter folders against this base model, in its dtype (see `load_adapter`)."""
    hf = model.hf

    def load(folder: Path) -> AdapterWeights:
        return load_adapter(
            folder,
            model.shape,
            max_rank=max_rank,
            dtype=model.dtype,
            base_weight=lambda layer, name: dense_weight(linear_module(hf, layer, name)),
            read=read,
            own=own,
        )

    return load


def reference_folder_loader(model: LoadedModel, max_rank: int) -> Callable[[Path], AdapterWeights]:
    """`folder_loader` reading files through the safetensors library: the reference for tests and bench."""
    return folder_loader(model, max_rank, read_tensors_reference)


def describe(folder: Path) -> AdapterInfo:
    """Kind, virtual tokens, rank and targets from the config alone; raises AdapterError."""
    config = read_config(folder)
    return method_for(config).describe(config)
