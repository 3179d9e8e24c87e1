"""Bottleneck adapters (Houlsby, Pfeiffer): o' = o + s * (up(act(down(x) + bd)) + bu) after a block.

`x` is the block's output `o`, or `o + h` (the residual stream) when the config says
`"adapter_input": "residual_stream"`. Our format is defined once in peftserve_formats/bottleneck.py
(docs/adapter-format.md), shared with the trainer; AdapterHub's saved bottleneck adapters are
read too when their options map onto it. The batched math is the shared low-rank apply;
`BottleneckReference` is the plain, unbatched reference.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from peftserve_formats import bottleneck as fmt
from server.adapters.common import AdapterError, AdapterWeights, expect_shape
from server.adapters.method import AdapterInfo, Hook, Method, ParseContext
from server.base_model import ModelShape

if TYPE_CHECKING:
    from server.adapters.slots import SlotTable

ADAPTERHUB_WEIGHTS = "adapter.safetensors"
_HUB = re.compile(
    r"(?:^|\.)layers\.(\d+)\.(attention|output)_adapters\.adapters\.[^.]+\.adapter_(down\.0|up)\.(weight|bias)$"
)
_HUB_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "swish": "silu", "silu": "silu", "tanh": "tanh"}
# AdapterHub options and the only value each may have for its adapter to mean what ours means.
_HUB_REQUIRED = {
    "is_parallel": False,
    "phm_layer": False,
    "use_gating": False,
    "ln_before": False,
    "ln_after": False,
    "residual_before_ln": True,
    "original_ln_after": True,
}


@dataclass
class BottleneckSite:
    down: torch.Tensor  # (m, hidden)
    down_bias: torch.Tensor  # (m,)
    up: torch.Tensor  # (m, hidden): up.weight transposed, scaling folded in
    up_bias: torch.Tensor  # (hidden,), scaling folded in


@dataclass
class BottleneckWeights(AdapterWeights):
    activation: str = "relu"
    reads_residual: bool = False
    sites: dict[tuple[int, str], BottleneckSite] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return next(iter(self.sites.values())).down.shape[0]

    @property
    def target_modules(self) -> list[str]:
        return sorted({site for _, site in self.sites})

    def tensors(self) -> list[torch.Tensor]:
        return [t for s in self.sites.values() for t in (s.down, s.down_bias, s.up, s.up_bias)]


def _site(parts: dict[str, torch.Tensor], where: str, hidden: int, scaling: float) -> BottleneckSite:
    for key in fmt.PARTS:
        if key not in parts:
            raise AdapterError(f"{where}.{key} is missing", f"{where}.{key}")
    m = parts["down.weight"].shape[0]
    expect_shape(f"{where}.down.weight", parts["down.weight"], (m, hidden))
    expect_shape(f"{where}.down.bias", parts["down.bias"], (m,))
    expect_shape(f"{where}.up.weight", parts["up.weight"], (hidden, m))
    expect_shape(f"{where}.up.bias", parts["up.bias"], (hidden,))
    return BottleneckSite(
        down=parts["down.weight"].float().contiguous(),
        down_bias=parts["down.bias"].float().contiguous(),
        up=(parts["up.weight"].float() * scaling).t().contiguous(),
        up_bias=(parts["up.bias"].float() * scaling).contiguous(),
    )


def parse(config: dict[str, Any], tensors: dict[str, torch.Tensor], shape: ModelShape) -> BottleneckWeights:
    """Our format (peftserve_formats.bottleneck)."""
    try:
        options = fmt.check_config(config)
    except fmt.FormatError as exc:
        raise AdapterError(str(exc), exc.field) from exc
    size, placement, activation = options.bottleneck_size, options.placement, options.non_linearity
    scaling = options.scaling
    grouped: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = fmt.TENSOR.match(name)
        if match is None or match.group(2) not in options.sites:
            raise AdapterError(f"unexpected tensor {name} for a {placement} bottleneck adapter", name)
        grouped.setdefault((int(match.group(1)), match.group(2)), {})[
            f"{match.group(3)}.{match.group(4)}"
        ] = tensor
    weights = BottleneckWeights(
        peft_type="BOTTLENECK",
        config=config,
        activation=activation,
        reads_residual=options.reads_residual,
    )
    for layer in range(shape.num_layers):
        for block in options.sites:
            where = f"layers.{layer}.{block}"
            site = _site(grouped.pop((layer, block), {}), where, shape.hidden_size, scaling)
            if site.down.shape[0] != size:
                raise AdapterError(
                    f"{where}.down.weight has {site.down.shape[0]} rows, bottleneck_size is {size}", where
                )
            weights.sites[(layer, block)] = site
    if grouped:
        (layer, block), _ = grouped.popitem()
        raise AdapterError(
            f"tensors for layer {layer}, but the base model has {shape.num_layers} layers", "layers"
        )
    return weights


def is_adapterhub(config: dict[str, Any]) -> bool:
    return isinstance(config.get("config"), dict) and "peft_type" not in config


def parse_adapterhub(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], shape: ModelShape
) -> BottleneckWeights:
    """An adapter saved by AdapterHub's `adapters` library, where its options map onto our format."""
    options = config["config"]
    if options.get("architecture", "bottleneck") != "bottleneck":
        raise AdapterError(
            f"AdapterHub architecture {options.get('architecture')!r} is not supported", "architecture"
        )
    for key, required in _HUB_REQUIRED.items():
        if options.get(key, required) != required:
            raise AdapterError(
                f"AdapterHub option {key}={options[key]!r} is not supported (needs {required!r})", key
            )
    activation = _HUB_ACTIVATIONS.get(str(options.get("non_linearity", "relu")).lower())
    if activation is None:
        raise AdapterError(
            f"AdapterHub non_linearity {options.get('non_linearity')!r} is not supported", "non_linearity"
        )
    scaling = options.get("scaling", 1.0)
    if isinstance(scaling, bool) or not isinstance(scaling, int | float):
        raise AdapterError(f"AdapterHub scaling {scaling!r} is not supported (only a number)", "scaling")
    grouped: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _HUB.search(name)
        if match is None:
            raise AdapterError(f"unexpected tensor {name} in an AdapterHub bottleneck adapter", name)
        layer = int(match.group(1))
        if layer >= shape.num_layers:
            raise AdapterError(
                f"tensor {name} names layer {layer}; the base has {shape.num_layers} layers", name
            )
        block = "attn" if match.group(2) == "attention" else "mlp"
        part = "down" if match.group(3) == "down.0" else "up"
        grouped.setdefault((layer, block), {})[f"{part}.{match.group(4)}"] = tensor
    if not grouped:
        raise AdapterError("the AdapterHub adapter holds no bottleneck weights", "adapter_model.safetensors")
    weights = BottleneckWeights(
        peft_type="BOTTLENECK",
        config=config,
        activation=activation,
        reads_residual=bool(options.get("original_ln_before", False)),
    )
    for (layer, block), parts in sorted(grouped.items()):
        weights.sites[(layer, block)] = _site(
            parts, f"layers.{layer}.{block}", shape.hidden_size, float(scaling)
        )
    return weights


def _activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    return {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}[activation](x)


def adapter_delta(site: BottleneckSite, x: torch.Tensor, activation: str) -> torch.Tensor:
    """The plain formula for one site: (..., hidden) -> (..., hidden), in float32."""
    h = _activate(x.float() @ site.down.t() + site.down_bias, activation)
    return h @ site.up + site.up_bias


class BottleneckReference:
    """Applies one bottleneck adapter to an HF Llama-style model with forward hooks, unbatched.

    The slow reference the batched engine is tested against: use it as a context manager
    around `model.generate(...)`.
    """

    def __init__(self, model: nn.Module, weights: BottleneckWeights) -> None:
        self.model, self.weights = model, weights

    @contextmanager
    def applied(self) -> Iterator[None]:
        handles = []
        residual: dict[tuple[int, str], torch.Tensor] = {}
        for index, layer in enumerate(self.model.model.layers):
            for block, norm, module in (
                ("attn", layer.input_layernorm, layer.self_attn),
                ("mlp", layer.post_attention_layernorm, layer.mlp),
            ):
                site = self.weights.sites.get((index, block))
                if site is None:
                    continue
                key = (index, block)
                handles.append(norm.register_forward_pre_hook(self._remember(residual, key)))
                handles.append(module.register_forward_hook(self._adapt(residual, key, site)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _remember(store: dict, key: tuple[int, str]):
        def hook(_module, args):
            store[key] = args[0]

        return hook

    def _adapt(self, store: dict, key: tuple[int, str], site: BottleneckSite):
        def hook(_module, _args, output):
            out = output[0] if isinstance(output, tuple) else output
            x = out + store[key] if self.weights.reads_residual else out
            adapted = out + adapter_delta(site, x, self.weights.activation).to(out.dtype)
            return (adapted, *output[1:]) if isinstance(output, tuple) else adapted

        return hook


class Bottleneck(Method):
    """Bottleneck adapters: a stacked low-rank non-linear delta on a block's output."""

    name = "bottleneck"
    peft_types = (fmt.PEFT_TYPE,)
    hooks = frozenset({Hook.BLOCK_OUTPUT})
    merge_refusal = (
        "it adds a non-linear block after attention or the MLP; it cannot be folded into linear weights"
    )

    def claims(self, config: dict[str, Any]) -> bool:
        return is_adapterhub(config)

    def weights_file(self, config: dict[str, Any]) -> str:
        return ADAPTERHUB_WEIGHTS if is_adapterhub(config) else fmt.WEIGHTS_FILE

    def parse(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], ctx: ParseContext
    ) -> BottleneckWeights:
        hub = is_adapterhub(config)
        weights = parse_adapterhub(config, tensors, ctx.shape) if hub else parse(config, tensors, ctx.shape)
        if weights.rank > ctx.max_rank:
            raise AdapterError(
                f"bottleneck size {weights.rank} is above --max-lora-rank {ctx.max_rank}", "bottleneck_size"
            )
        return weights

    def describe(self, config: dict[str, Any]) -> AdapterInfo:
        if is_adapterhub(config):
            return AdapterInfo(fmt.PEFT_TYPE)
        rank = config.get("bottleneck_size")
        return AdapterInfo(fmt.PEFT_TYPE, rank=rank if isinstance(rank, int) else None)

    def install(self, slots: SlotTable, slot: int, weights: BottleneckWeights) -> None:
        hidden = slots.shape.hidden_size
        for site, w in weights.sites.items():
            slots.set_lowrank(
                slot, Hook.BLOCK_OUTPUT, site, (hidden, hidden), w.down, w.up, w.down_bias, w.up_bias
            )
        slots.set_data(slot, Hook.BLOCK_OUTPUT, (weights.activation, weights.reads_residual))

    def reference(self, model: nn.Module, weights: BottleneckWeights):
        return BottleneckReference(model, weights).applied()


METHOD = Bottleneck()
