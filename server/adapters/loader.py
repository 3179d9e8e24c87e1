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
    base_tensor: Callable[[str], torch.Tensor] | None = None,
    tied_embeddings: bool = False,
    max_copy_bytes: int = 0,
) -> AdapterWeights:
    """Parse and validate an adapter folder against the base model; raises AdapterError.

    Runs on the loader thread. With `own`, the result is in `dtype`, in memory of its own;
    without, it may still view the file's mapping: the server installs it into a slot straight
    from there, then calls `own` for its CPU cache.
    """
    config = read_config(folder)
    method = method_for(config)
    tensors = read(folder, method.weights_file(config))
    ctx = ParseContext(shape, max_rank, dtype, base_weight, base_tensor, tied_embeddings, max_copy_bytes)
    weights = method.parse(config, tensors, ctx)
    if own:
        weights.own(dtype)
    return weights


def folder_loader(
    model: LoadedModel,
    max_rank: int,
    read: Reader = read_tensors,
    *,
    own: bool = True,
    max_copy_bytes: int = 0,
) -> Callable[[Path], AdapterWeights]:
    """Load (and so validate) adapter folders against this base model, in its dtype (see `load_adapter`).

    max_copy_bytes: --max-module-copy-bytes (0 refuses whole copies of embed_tokens or lm_head).
    """
    hf = model.hf
    tied = hf.get_output_embeddings().weight is hf.get_input_embeddings().weight

    def load(folder: Path) -> AdapterWeights:
        return load_adapter(
            folder,
            model.shape,
            max_rank=max_rank,
            dtype=model.dtype,
            base_weight=lambda layer, name: dense_weight(linear_module(hf, layer, name)),
            read=read,
            own=own,
            base_tensor=lambda name: hf.get_parameter(name).detach().float(),
            tied_embeddings=tied,
            max_copy_bytes=max_copy_bytes,
        )

    return load


def reference_folder_loader(model: LoadedModel, max_rank: int) -> Callable[[Path], AdapterWeights]:
    """`folder_loader` reading files through the safetensors library: the reference for tests and bench."""
    return folder_loader(model, max_rank, read_tensors_reference)


def describe(folder: Path) -> AdapterInfo:
    """Kind, virtual tokens, rank and targets from the config alone; raises AdapterError."""
    config = read_config(folder)
    return method_for(config).describe(config)
