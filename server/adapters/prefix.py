"""Prefix tuning: learned keys and values in every layer, written into a row's cache at prefill.

PEFT saves the final `prompt_embeddings` (n, layers * 2 * kv_dim); layer l's keys are slice 2l
and its values slice 2l + 1 of the (layers * 2) axis. The prompt then starts at position n.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from server.adapters.common import AdapterWeights, expect_shape, positive_int, prompt_embeddings
from server.adapters.method import AdapterInfo, Hook, Method, ParseContext
from server.base_model import ModelShape

if TYPE_CHECKING:
    from server.adapters.slots import SlotTable


@dataclass
class PrefixWeights(AdapterWeights):
    keys: torch.Tensor | None = None  # (layers, kv_heads, n, head_dim)
    values: torch.Tensor | None = None  # (layers, kv_heads, n, head_dim)

    @property
    def virtual_tokens(self) -> int:
        return self.keys.shape[2]

    def tensors(self) -> list[torch.Tensor]:
        return [self.keys, self.values]


def parse(config: dict[str, Any], tensors: dict[str, torch.Tensor], shape: ModelShape) -> PrefixWeights:
    n, embeddings = prompt_embeddings(config, tensors, "PREFIX_TUNING")
    layers, heads, dim = shape.num_layers, shape.num_kv_heads, shape.head_dim
    expect_shape("prompt_embeddings", embeddings, (n, layers * 2 * heads * dim))
    # (n, layers*2*kv_dim) -> (layers*2, kv_heads, n, head_dim)
    stacked = embeddings.float().view(n, layers * 2, heads, dim).permute(1, 2, 0, 3)
    return PrefixWeights(
        peft_type="PREFIX_TUNING",
        config=config,
        keys=stacked[0::2].contiguous(),
        values=stacked[1::2].contiguous(),
    )


class PrefixTuning(Method):
    """Prefix tuning: per-slot keys and values written at the start of every layer's cache."""

    name = "prefix_tuning"
    peft_types = ("PREFIX_TUNING",)
    hooks = frozenset({Hook.KV_PREFIX})
    merge_refusal = "it adds keys and values to the attention cache; no weight can hold them"

    def parse(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], ctx: ParseContext
    ) -> PrefixWeights:
        return parse(config, tensors, ctx.shape)

    def describe(self, config: dict[str, Any]) -> AdapterInfo:
        return AdapterInfo("PREFIX_TUNING", virtual_tokens=positive_int(config, "num_virtual_tokens"))

    def install(self, slots: SlotTable, slot: int, weights: PrefixWeights) -> None:
        slots.set_data(slot, Hook.KV_PREFIX, (slots.keep(weights.keys), slots.keep(weights.values)))


METHOD = PrefixTuning()
