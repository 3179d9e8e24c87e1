"""Prompt tuning and P-tuning: learned embeddings placed before the prompt at prefill.

PEFT saves both as their final `prompt_embeddings` (P-tuning's encoder already applied), so
serving needs no prompt encoder. The virtual tokens take cache positions 0..n-1 like real ones.
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
class PromptWeights(AdapterWeights):
    embeddings: torch.Tensor | None = None  # (n, hidden)

    @property
    def virtual_tokens(self) -> int:
        return self.embeddings.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [self.embeddings]


def parse(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], shape: ModelShape, peft_type: str
) -> PromptWeights:
    n, embeddings = prompt_embeddings(config, tensors, peft_type)
    expect_shape("prompt_embeddings", embeddings, (n, shape.hidden_size))
    return PromptWeights(peft_type=peft_type, config=config, embeddings=embeddings.float().contiguous())


class PromptTuning(Method):
    """Prompt tuning and P-tuning: a per-slot soft prompt in front of the input embeddings."""

    name = "prompt_tuning"
    peft_types = ("PROMPT_TUNING", "P_TUNING")
    hooks = frozenset({Hook.INPUT_EMBEDDINGS})
    merge_refusal = "it adds virtual tokens before the input; no weight can hold them"

    def parse(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], ctx: ParseContext
    ) -> PromptWeights:
        return parse(config, tensors, ctx.shape, str(config["peft_type"]).upper())

    def describe(self, config: dict[str, Any]) -> AdapterInfo:
        peft_type = str(config["peft_type"]).upper()
        return AdapterInfo(peft_type, virtual_tokens=positive_int(config, "num_virtual_tokens"))

    def install(self, slots: SlotTable, slot: int, weights: PromptWeights) -> None:
        slots.set_data(slot, Hook.INPUT_EMBEDDINGS, slots.keep(weights.embeddings))


METHOD = PromptTuning()
