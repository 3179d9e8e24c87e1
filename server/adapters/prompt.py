"""Prompt tuning and P-tuning: learned embeddings placed before the prompt at prefill.

PEFT saves both as their final `prompt_embeddings` (P-tuning's encoder already applied), so
serving needs no prompt encoder. The virtual tokens take cache positions 0..n-1 like real ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from server.adapters.common import AdapterWeights, expect_shape, prompt_embeddings
from server.base_model import ModelShape


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
