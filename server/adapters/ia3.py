"""IA3: learned per-channel scales. Attention targets (k, v) scale a linear's output; feed-forward
targets (down_proj) scale its input. Batched by gathering each row's scale vector."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from server.adapters.common import (
    AdapterError,
    AdapterWeights,
    expect_shape,
    layer_module,
    module_path,
    target_list,
)
from server.adapters.method import AdapterInfo, Hook, Method, ParseContext, Site
from server.base_model import ModelShape

if TYPE_CHECKING:
    from server.adapters.slots import SlotTable

_TENSOR = re.compile(r"\.ia3_l$")


@dataclass
class IA3Site:
    scale: torch.Tensor  # (in,) when scaling the input, (out,) when scaling the output
    on_input: bool


@dataclass
class IA3Weights(AdapterWeights):
    sites: dict[tuple[int, str], IA3Site] = field(default_factory=dict)

    @property
    def target_modules(self) -> list[str]:
        return sorted({name for _, name in self.sites})

    def tensors(self) -> list[torch.Tensor]:
        return [site.scale for site in self.sites.values()]


def _is_feedforward(config: dict[str, Any], path: str) -> bool:
    """PEFT's rule: a string is a full-match regex, a list matches module names by suffix."""
    modules = config.get("feedforward_modules") or []
    if isinstance(modules, str):
        return re.fullmatch(modules, path) is not None
    return any(path == m or path.endswith(f".{m}") for m in modules)


def parse(config: dict[str, Any], tensors: dict[str, torch.Tensor], shape: ModelShape) -> IA3Weights:
    if config.get("modules_to_save"):
        raise AdapterError(
            "modules_to_save is not supported: only IA3 scales can be batched", "modules_to_save"
        )
    dims = shape.linear_dims()
    weights = IA3Weights(peft_type="IA3", config=config)
    for name, tensor in tensors.items():
        site = layer_module(name, shape.num_layers) if _TENSOR.search(name) else None
        if site is None:
            raise AdapterError(f"tensor {name} is not an IA3 scale of a decoder linear layer", name)
        layer, module = site
        if module not in dims:
            raise AdapterError(
                f"tensor {name} targets module {module!r}, which the base lacks; it has {', '.join(dims)}",
                name,
            )
        in_features, out_features = dims[module]
        on_input = _is_feedforward(config, module_path(layer, module))
        expect_shape(name, tensor, (1, in_features) if on_input else (out_features, 1))
        weights.sites[site] = IA3Site(scale=tensor.float().reshape(-1).contiguous(), on_input=on_input)
    if not weights.sites:
        raise AdapterError("adapter_model.safetensors holds no IA3 scales", "adapter_model.safetensors")
    return weights


class IA3(Method):
    """IA3: per-channel scales, of a linear's input (feed-forward targets) or its output."""

    name = "ia3"
    peft_types = ("IA3",)
    hooks = frozenset({Hook.INPUT_SCALE, Hook.OUTPUT_SCALE})

    def parse(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], ctx: ParseContext
    ) -> IA3Weights:
        return parse(config, tensors, ctx.shape)

    def describe(self, config: dict[str, Any]) -> AdapterInfo:
        return AdapterInfo("IA3", target_modules=target_list(config))

    def install(self, slots: SlotTable, slot: int, weights: IA3Weights) -> None:
        for site, w in weights.sites.items():
            slots.set_scale(slot, Hook.INPUT_SCALE if w.on_input else Hook.OUTPUT_SCALE, site, w.scale)

    def fold(
        self, weights: IA3Weights, site: Site, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        ia3 = weights.sites.get(site)
        if ia3 is None:
            return weight, bias
        scale = ia3.scale.to(weight)
        if ia3.on_input:
            return weight * scale.unsqueeze(0), bias
        return weight * scale.unsqueeze(1), None if bias is None else bias * scale


METHOD = IA3()
