"""Trainable tokens (PEFT's TRAINABLE_TOKENS): per-adapter embeddings of a few token ids.

Served through the EMBEDDING hook (each row's tokens among the adapter's ids take its rows)
and, on a base whose lm_head shares the embedding matrix, the LOGITS hook: PEFT 0.21's
uncached forward then computes those tokens' logits from the new rows too. LoRA's
`trainable_token_indices` is the same edit, parsed by lora.py.
"""

from __future__ import annotations

from typing import Any

import torch

from server.adapters.common import AdapterError
from server.adapters.extras import ExtrasMethod, ExtrasWeights, no_rest, parse_extras, token_indices
from server.adapters.method import AdapterInfo, Hook, ParseContext

_TARGETS = (None, "embed_tokens", "model.embed_tokens")


class TrainableTokens(ExtrasMethod):
    """Per-adapter rows of the embedding (and of a tied lm_head)."""

    name = "trainable_tokens"
    peft_types = ("TRAINABLE_TOKENS",)
    hooks = frozenset({Hook.EMBEDDING, Hook.LOGITS})

    def parse(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], ctx: ParseContext
    ) -> ExtrasWeights:
        _check_target(config)
        indices = token_indices(config.get("token_indices"), "token_indices")
        extras, rest = parse_extras(tensors, ctx, token_indices=indices)
        no_rest(rest, "TRAINABLE_TOKENS")
        return ExtrasWeights(peft_type="TRAINABLE_TOKENS", config=config, extras=extras)

    def describe(self, config: dict[str, Any]) -> AdapterInfo:
        _check_target(config)
        return AdapterInfo("TRAINABLE_TOKENS", target_modules=("embed_tokens",))


def _check_target(config: dict[str, Any]) -> None:
    target = config.get("target_modules")
    if isinstance(target, list) and len(target) == 1:
        target = target[0]
    if target not in _TARGETS:
        message = f"target_modules must be the embedding (embed_tokens), got {target!r}"
        raise AdapterError(message, "target_modules")


METHOD = TrainableTokens()
