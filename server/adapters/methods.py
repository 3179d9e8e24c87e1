"""Every adapter method the server serves, and lookups over them: the one list to extend."""

from __future__ import annotations

from typing import Any

from server.adapters import (
    adalora,
    bitfit,
    bottleneck,
    ia3,
    ln_tuning,
    lora,
    oft,
    prefix,
    prompt,
    trainable_tokens,
    vera,
)
from server.adapters.common import AdapterError, AdapterWeights
from server.adapters.method import Method
from server.adapters.refused import refusal

METHODS: tuple[Method, ...] = (
    lora.METHOD,
    ia3.METHOD,
    prompt.METHOD,
    prefix.METHOD,
    bottleneck.METHOD,
    ln_tuning.METHOD,
    bitfit.METHOD,
    trainable_tokens.METHOD,
    adalora.METHOD,
    vera.METHOD,
    oft.METHOD,
)
_BY_TYPE = {peft_type: m for m in METHODS for peft_type in m.peft_types}
SUPPORTED_TEXT = (
    "LORA (with rsLoRA, DoRA and their extras), IA3, PROMPT_TUNING, P_TUNING, PREFIX_TUNING, BOTTLENECK, "
    "LN_TUNING, BITFIT, TRAINABLE_TOKENS, ADALORA, VERA, OFT"
)


def method_for(config: dict[str, Any]) -> Method:
    """The method that reads this adapter_config.json; raises AdapterError for any other."""
    for method in METHODS:
        if method.claims(config):
            return method
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str):
        raise AdapterError("adapter_config.json has no peft_type", "peft_type")
    return method_by_type(peft_type)


def method_by_type(peft_type: str) -> Method:
    """The method of a PEFT type (e.g. "LORA", as the index records it); raises AdapterError for others."""
    method = _BY_TYPE.get(peft_type.upper())
    if method is None:
        refused = refusal(peft_type)
        if refused is not None:
            raise AdapterError(refused, "peft_type")
        raise AdapterError(
            f"peft_type {peft_type!r} is not supported; supported: {SUPPORTED_TEXT}", "peft_type"
        )
    return method


def method_of(weights: AdapterWeights) -> Method:
    """The method that parsed these weights."""
    return method_by_type(weights.peft_type)
