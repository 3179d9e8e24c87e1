"""peftserve's BitFit adapter format (only biases trained), documented in docs/adapter-format.md.

A folder holds `adapter_config.json` (`peft_type: "BITFIT"`, `target_modules`: the decoder
linears whose biases it trains) and `adapter_model.safetensors` with `layers.{i}.{module}.bias`,
shape (out_features,), for every decoder layer i and every target module. Each tensor is the
linear's whole bias: it replaces the base's bias, and on a base whose linears have no bias it
adds one (the trainer starts those from zero). The server parses it (server/adapters/bitfit.py),
the trainer writes it (trainer/bitfit.py); both check configs here.
"""

from __future__ import annotations

import re
from typing import Any

PEFT_TYPE = "BITFIT"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The decoder linears of a Llama-style block, the modules target_modules may name."""
TENSOR = re.compile(r"^layers\.(\d+)\.(\w+)\.bias$")


class FormatError(ValueError):
    """A BitFit config or tensor that does not follow the format; `field` names the culprit."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def tensor_name(layer: int, module: str) -> str:
    return f"layers.{layer}.{module}.bias"


def check_config(config: dict[str, Any]) -> tuple[str, ...]:
    """The target modules of a BitFit adapter_config.json, checked; raises FormatError."""
    if config.get("peft_type", PEFT_TYPE) != PEFT_TYPE:
        raise FormatError(f"peft_type must be {PEFT_TYPE}, got {config.get('peft_type')!r}", "peft_type")
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not targets or not all(t in LINEARS for t in targets):
        raise FormatError(
            f"target_modules must be a non-empty list of {', '.join(LINEARS)}, got {targets!r}",
            "target_modules",
        )
    if len(set(targets)) != len(targets):
        raise FormatError("target_modules names a module twice", "target_modules")
    return tuple(targets)


def to_config(targets: tuple[str, ...] | list[str], base_model: str | None = None) -> dict[str, Any]:
    return {
        "peft_type": PEFT_TYPE,
        "base_model_name_or_path": base_model,
        "target_modules": list(targets),
    }


def expected_names(targets: tuple[str, ...], num_layers: int) -> list[str]:
    """Every tensor name the format requires for this config and base."""
    return [tensor_name(layer, module) for layer in range(num_layers) for module in targets]
