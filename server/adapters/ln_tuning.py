"""LN tuning (PEFT's LN_TUNING): each adapter has its own weights for the chosen norms.

Served through the NORM_WEIGHT hook: every targeted norm's site table holds each slot's weight
and, for rows without one, the base's; the norm is computed once and each row multiplies by
its own weight. Merging replaces the base's norm weights.
"""

from __future__ import annotations

from typing import Any

import torch

from server.adapters.common import AdapterError, target_list
from server.adapters.extras import ExtrasMethod, ExtrasWeights, no_rest, parse_extras
from server.adapters.method import AdapterInfo, Hook, ParseContext


class LnTuning(ExtrasMethod):
    """Per-adapter norm weights, selected per row."""

    name = "ln_tuning"
    peft_types = ("LN_TUNING",)
    hooks = frozenset({Hook.NORM_WEIGHT})

    def parse(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], ctx: ParseContext
    ) -> ExtrasWeights:
        extras, rest = parse_extras(tensors, ctx, norms=True, copies=bool(config.get("modules_to_save")))
        no_rest(rest, "LN_TUNING")
        if not extras.norms:
            raise AdapterError("adapter_model.safetensors holds no norm weights", "adapter_model.safetensors")
        return ExtrasWeights(peft_type="LN_TUNING", config=config, extras=extras)

    def describe(self, config: dict[str, Any]) -> AdapterInfo:
        return AdapterInfo("LN_TUNING", target_modules=target_list(config))


METHOD = LnTuning()
