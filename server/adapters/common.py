"""What every adapter method shares: reading a checkpoint folder, errors, and the parsed result's base."""

from __future__ import annotations

import json
import math
import mmap
import re
import struct
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT names decoder linears `...layers.<i>.<self_attn|mlp>.<name>...`.
LAYER_MODULE = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.")


class AdapterError(ValueError):
    """An adapter that cannot be served; the message names the field or tensor at fault."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class AdapterWeights:
    """A parsed adapter, ready to be placed into a device slot."""

    peft_type: str
    config: dict[str, Any]

    @property
    def virtual_tokens(self) -> int:
        """Cache positions the adapter occupies before the prompt (prompt and prefix kinds)."""
        return 0

    @property
    def rank(self) -> int | None:
        return None

    @property
    def target_modules(self) -> list[str]:
        return []

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def own(self, dtype: torch.dtype) -> None:
        """Copy every tensor into memory of its own, in the dtype the server computes in.

        Parsers may leave views of the file's mapping (`read_tensors`); after this call the
        adapter no longer depends on the file.
        """
        _own(self, dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _own(obj: Any, dtype: torch.dtype) -> None:
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            setattr(obj, f.name, value.to(dtype, copy=True, memory_format=torch.contiguous_format))
        elif isinstance(value, dict):
            for item in value.values():
                if is_dataclass(item):
                    _own(item, dtype)


@dataclass(frozen=True)
class AdapterRef:
    """One servable version of an adapter, as the engine schedules it."""

    name: str
    version: int
    path: Path
    peft_type: str
    virtual_tokens: int = 0
    digest: str = ""
    """Identifies the files' contents: a slot never mistakes one upload for another."""

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}#{self.digest[:12]}"


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"the adapter has no {CONFIG_FILE}", CONFIG_FILE)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{CONFIG_FILE} is not valid JSON: {exc}", CONFIG_FILE) from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_FILE} must hold a JSON object", CONFIG_FILE)
    return config


# safetensors dtype names -> torch dtypes (the ones torch can view bytes as).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024
"""safetensors' own limit on the JSON header."""


def _weights_path(folder: Path, file: str) -> Path:
    path = folder / file
    if not path.is_file():
        pickled = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        hint = f" ({', '.join(pickled)} are pickle files, which are never loaded)" if pickled else ""
        raise AdapterError(f"the adapter has no {file}{hint}", file)
    return path


def read_tensors(folder: Path, file: str = WEIGHTS_FILE) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, checked (float, finite), as views of a private mapping.

    The file is mapped copy-on-write, its header parsed and checked as strictly as the
    safetensors library does (dtypes, shapes, offsets that cover the data exactly), and every
    tensor is a view into the mapping: nothing is copied here. Parsers copy what they keep
    (`AdapterWeights.own`), so a parsed adapter never reads a file that changes later.
    """
    path = _weights_path(folder, file)
    try:
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
        raise AdapterError(f"{file} is not a readable safetensors file: {exc}", file) from exc
    raw = torch.frombuffer(mapped, dtype=torch.uint8)  # (file bytes,)
    entries, data_start = _header(mapped, file)
    tensors = _views(raw, entries, data_start)
    _check_values(tensors, raw, entries, data_start)
    return tensors


def _header(mapped: mmap.mmap, file: str) -> tuple[list[tuple[str, torch.dtype, list[int], int, int]], int]:
    """(name, dtype, shape, begin, end) of every tensor, offsets into the data; and where data starts."""

    def broken(why: str) -> AdapterError:
        return AdapterError(f"{file} is not a readable safetensors file: {why}", file)

    size = len(mapped)
    if size < 8:
        raise broken("shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", mapped[:8])
    if length > MAX_HEADER_BYTES or 8 + length > size:
        raise broken(f"header length {length} does not fit the file of {size} bytes")
    try:
        header = json.loads(mapped[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise broken(f"header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise broken("header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise broken("__metadata__ must map strings to strings")
    data_bytes = size - 8 - length
    entries = []
    for name, info in header.items():
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape, (begin, end) = list(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise broken(f"tensor {name} has an unknown dtype or a malformed entry ({exc!r})") from exc
        if not all(type(d) is int and d >= 0 for d in (*shape, begin, end)):
            raise broken(f"tensor {name} has a malformed shape or offsets")
        if end - begin != math.prod(shape) * dtype.itemsize or end > data_bytes:
            raise broken(f"tensor {name}: offsets {begin}..{end} do not match its shape and dtype")
        entries.append((name, dtype, shape, begin, end))
    covered = 0
    for _, _, _, begin, end in sorted(entries, key=lambda e: (e[3], e[4])):
        if begin != covered:
            raise broken("tensors overlap or leave holes in the data")
        covered = end
    if covered != data_bytes:
        raise broken(f"{data_bytes - covered} bytes after the last tensor")
    return entries, 8 + length


def _views(raw: torch.Tensor, entries: list, data_start: int) -> dict[str, torch.Tensor]:
    """One view per tensor; an unaligned one (legal, but rare) is copied instead."""
    typed: dict[torch.dtype, torch.Tensor] = {}
    tensors = {}
    for name, dtype, shape, begin, end in entries:
        start = data_start + begin
        if start % dtype.itemsize:
            tensors[name] = raw[start : data_start + end].clone().view(dtype).view(shape)
            continue
        if dtype not in typed:  # (file bytes // itemsize,) the whole mapping as this dtype
            usable = raw.numel() // dtype.itemsize * dtype.itemsize
            typed[dtype] = raw[:usable].view(dtype)
        tensors[name] = typed[dtype].as_strided(shape, _contiguous_strides(shape), start // dtype.itemsize)
    return tensors


def _contiguous_strides(shape: list[int]) -> list[int]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= max(dim, 1)
    return strides[::-1]


def _check_values(
    tensors: dict[str, torch.Tensor], raw: torch.Tensor, entries: list, data_start: int
) -> None:
    """Float tensors only, all values finite; one pass over the data when it holds one dtype."""
    for name, dtype, *_ in entries:
        if not dtype.is_floating_point:
            raise AdapterError(f"tensor {name} has dtype {dtype}; adapters hold float tensors", name)
    dtypes = {dtype for _, dtype, *_ in entries}
    whole = len(dtypes) == 1 and data_start % next(iter(dtypes)).itemsize == 0 and raw.numel() > data_start
    if whole and _finite(raw[data_start:].view(dtypes.pop())):
        return
    for name, tensor in tensors.items():
        if tensor.numel() and not _finite(tensor):
            raise AdapterError(f"tensor {name} holds NaN or Inf values", name)


def _finite(values: torch.Tensor) -> bool:
    # aminmax propagates NaN and reaches +-Inf, in one pass without a boolean copy.
    low, high = torch.aminmax(values.reshape(-1))
    return bool(torch.isfinite(low) and torch.isfinite(high))


def read_tensors_reference(folder: Path, file: str = WEIGHTS_FILE) -> dict[str, torch.Tensor]:
    """`read_tensors` through the safetensors library, tensor by tensor: its reference in tests."""
    path = _weights_path(folder, file)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{file} is not a readable safetensors file: {exc}", file) from exc
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise AdapterError(f"tensor {name} has dtype {tensor.dtype}; adapters hold float tensors", name)
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"tensor {name} holds NaN or Inf values", name)
    return tensors


def expect_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise AdapterError(
            f"tensor {name} has shape {tuple(tensor.shape)} but the base model needs {shape}; "
            "was this adapter trained for another base model?",
            name,
        )


def positive_int(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AdapterError(f"{key} must be a positive integer, got {value!r}", key)
    return value


def target_list(config: dict[str, Any]) -> tuple[str, ...]:
    """PEFT's target_modules, checked: one pattern string or a list of module names, sorted."""
    value = config.get("target_modules")
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(sorted(value))
    raise AdapterError(
        f"target_modules must be a string or a list of strings, got {value!r}", "target_modules"
    )


def is_targeted(config: dict[str, Any], path: str) -> bool:
    """Whether target_modules names the module at `path` (PEFT's rule: a string is a regular
    expression the whole path must match, list items match the path or its last parts)."""
    value = config.get("target_modules")
    if value is None or value == "all-linear":
        return True
    if isinstance(value, str):
        try:
            return re.fullmatch(value, path) is not None
        except re.error as exc:
            message = f"target_modules {value!r} is not a valid pattern: {exc}"
            raise AdapterError(message, "target_modules") from exc
    return any(path == t or path.endswith("." + t) for t in target_list(config))


def finite_number(config: dict[str, Any], key: str, default: float) -> float:
    value = config.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AdapterError(f"{key} must be a finite number, got {value!r}", key)
    return float(value)


MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


def module_path(layer: int, module: str) -> str:
    """The HF path of a decoder linear, as PEFT names it (without PEFT's own prefix)."""
    block = "mlp" if module in MLP_MODULES else "self_attn"
    return f"model.layers.{layer}.{block}.{module}"


def prompt_embeddings(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], peft_type: str
) -> tuple[int, torch.Tensor]:
    """(num_virtual_tokens, the prompt_embeddings tensor) of a prompt-learning adapter, checked."""
    n = positive_int(config, "num_virtual_tokens")
    if config.get("num_transformer_submodules", 1) != 1:
        raise AdapterError(
            "num_transformer_submodules must be 1 for a decoder-only model", "num_transformer_submodules"
        )
    extra = sorted(set(tensors) - {"prompt_embeddings"})
    if extra:
        raise AdapterError(
            f"unexpected tensor {extra[0]}: a {peft_type} adapter holds only prompt_embeddings", extra[0]
        )
    if "prompt_embeddings" not in tensors:
        raise AdapterError(f"a {peft_type} adapter needs a prompt_embeddings tensor", "prompt_embeddings")
    return n, tensors["prompt_embeddings"]


def layer_module(name: str, num_layers: int) -> tuple[int, str] | None:
    """(layer index, module name) of a decoder linear named in a PEFT tensor name, else None."""
    match = LAYER_MODULE.search(name)
    if match is None:
        return None
    layer = int(match.group(1))
    if layer >= num_layers:
        raise AdapterError(
            f"tensor {name} names layer {layer}, but the base model has {num_layers} layers", name
        )
    return layer, match.group(3)
