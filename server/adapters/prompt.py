"""Prompt tuning and P-tuning: learned embeddings placed before the prompt at prefill.

PEFT saves both as their final `prompt_embeddings` (P-tuning's encoder already applied), so
serving needs no prompt encoder. The virtual tokens take cache positions 0..n-1 like real ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from server.adapters.common import AdapterError, AdapterWeights, expect_shape, positive_int
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
    embeddings = tensors["prompt_embeddings"]
    expect_shape("prompt_embeddings", embeddings, (n, shape.hidden_size))
    return PromptWeights(peft_type=peft_type, config=config, embeddings=embeddings.float().contiguous())
