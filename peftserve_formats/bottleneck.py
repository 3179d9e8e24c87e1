"""peftserve's bottleneck adapter format (Houlsby / Pfeiffer), documented in docs/adapter-format.md.

A folder holds `adapter_config.json` (`peft_type: "BOTTLENECK"`, the options below) and
`adapter_model.safetensors` with `layers.{i}.{site}.{down,up}.{weight,bias}` for every decoder
layer i and every site the placement names. At a site the block's output o becomes
`o + scaling * (up(act(down(x))))`, x = o, or o + the residual stream entering the block when
`adapter_input` is "residual_stream". The server parses it (server/adapters/bottleneck.py), the
trainer writes and reads it (trainer/bottleneck.py); both check configs here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

PEFT_TYPE = "BOTTLENECK"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PLACEMENTS: dict[str, tuple[str, ...]] = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",)}
"""placement -> the sites (blocks) it adapts, in layer order."""
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
"""non_linearity values; gelu is the exact (erf) form."""
INPUTS = ("block_output", "residual_stream")
"""adapter_input values: what the adapter reads, the block's output or that plus its residual."""
PARTS = ("down.weight", "down.bias", "up.weight", "up.bias")
TENSOR = re.compile(r"^layers\.(\d+)\.(attn|mlp)\.(down|up)\.(weight|bias)$")


class FormatError(ValueError):
    """A bottleneck config or tensor that does not follow the format; `field` names the culprit."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class BottleneckOptions:
    """The checked options of an adapter_config.json."""

    bottleneck_size: int
    placement: str = "houlsby"
    non_linearity: str = "relu"
    scaling: float = 1.0
    adapter_input: str = "block_output"

    @property
    def sites(self) -> tuple[str, ...]:
        return PLACEMENTS[self.placement]

    @property
    def reads_residual(self) -> bool:
        return self.adapter_input == "residual_stream"

    def to_config(self, base_model_name_or_path: str | None = None) -> dict[str, Any]:
        return {
            "peft_type": PEFT_TYPE,
            "base_model_name_or_path": base_model_name_or_path,
            "bottleneck_size": self.bottleneck_size,
            "placement": self.placement,
            "non_linearity": self.non_linearity,
            "scaling": self.scaling,
            "adapter_input": self.adapter_input,
        }


def _choice(config: dict[str, Any], key: str, allowed: tuple[str, ...], default: str | None) -> str:
    value = config.get(key, default)
    if value not in allowed:
        raise FormatError(f"{key} must be one of {', '.join(allowed)}, got {value!r}", key)
    return value


def check_config(config: dict[str, Any]) -> BottleneckOptions:
    """The options of a bottleneck adapter_config.json, checked; raises FormatError."""
    if config.get("peft_type", PEFT_TYPE) != PEFT_TYPE:
        raise FormatError(f"peft_type must be {PEFT_TYPE}, got {config.get('peft_type')!r}", "peft_type")
    size = config.get("bottleneck_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise FormatError(f"bottleneck_size must be a positive integer, got {size!r}", "bottleneck_size")
    scaling = config.get("scaling", 1.0)
    if scaling is None:
        scaling = 1.0
    if isinstance(scaling, bool) or not isinstance(scaling, int | float) or not math.isfinite(scaling):
        raise FormatError(f"scaling must be a finite number, got {scaling!r}", "scaling")
    return BottleneckOptions(
        bottleneck_size=size,
        placement=_choice(config, "placement", tuple(PLACEMENTS), None),
        non_linearity=_choice(config, "non_linearity", ACTIVATIONS, "relu"),
        scaling=float(scaling),
        adapter_input=_choice(config, "adapter_input", INPUTS, "block_output"),
    )


def expected_shapes(options: BottleneckOptions, num_layers: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """Every tensor name the format requires for this config and base, with its shape."""
    m = options.bottleneck_size
    shapes = {"down.weight": (m, hidden), "down.bias": (m,), "up.weight": (hidden, m), "up.bias": (hidden,)}
    return {
        f"layers.{i}.{site}.{part}": shapes[part]
        for i in range(num_layers)
        for site in options.sites
        for part in PARTS
    }
