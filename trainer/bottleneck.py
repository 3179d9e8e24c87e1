"""Bottleneck adapters (Houlsby / Pfeiffer) in peftserve's format, on HF Llama-family models.

The format is defined once in peftserve_formats/bottleneck.py (docs/adapter-format.md), which
the server reads with the same checks. At a site, the block's output `o` (of `self_attn.o_proj`
or `mlp.down_proj`) becomes `o + scaling * up(act(down(o)))` before the residual add. The
trainer trains and applies `adapter_input: "block_output"` adapters only; it refuses to load a
"residual_stream" one (the server serves both).

`apply_bottleneck` wraps those projections of a model in place (for training, with `up` at
zero so the adapter starts as the identity); `load_bottleneck` applies a saved folder, which is
the reference the server's batched implementation is checked against.
"""

import json
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from peftserve_formats import bottleneck as fmt
from trainer.errors import AdapterFormatError

CONFIG_FILE = fmt.CONFIG_FILE
WEIGHTS_FILE = fmt.WEIGHTS_FILE

# site name -> (block attribute, projection attribute) inside a decoder layer
SITES: dict[str, tuple[str, str]] = {"attn": ("self_attn", "o_proj"), "mlp": ("mlp", "down_proj")}
PLACEMENT_SITES = fmt.PLACEMENTS
ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact erf form
    "silu": F.silu,
    "tanh": torch.tanh,
}


class BottleneckConfig(BaseModel):
    """adapter_config.json of a bottleneck adapter."""

    model_config = ConfigDict(extra="forbid")

    peft_type: Literal["BOTTLENECK"] = "BOTTLENECK"
    base_model_name_or_path: str | None = None
    bottleneck_size: int = Field(ge=1)
    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    scaling: float = 1.0
    adapter_input: Literal["block_output", "residual_stream"] = "block_output"

    @property
    def sites(self) -> tuple[str, ...]:
        return PLACEMENT_SITES[self.placement]


class Bottleneck(nn.Module):
    """`o -> o + scaling * up(act(down(o)))`."""

    def __init__(self, hidden_size: int, config: BottleneckConfig) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, config.bottleneck_size)
        self.up = nn.Linear(config.bottleneck_size, hidden_size)
        self.act = ACTIVATIONS[config.non_linearity]
        self.scaling = config.scaling
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        return o + self.scaling * self.up(self.act(self.down(o)))


class AdaptedProjection(nn.Module):
    """A block's output projection followed by its bottleneck adapter."""

    def __init__(self, projection: nn.Module, adapter: Bottleneck) -> None:
        super().__init__()
        self.projection = projection
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.projection(x))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of an HF Llama-family causal LM (each with self_attn.o_proj and mlp.down_proj)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(
        hasattr(getattr(layer, block, None), proj) for layer in layers for block, proj in SITES.values()
    ):
        raise AdapterFormatError(
            f"{type(model).__name__} is not a Llama-family model "
            "(model.layers[i].self_attn.o_proj and .mlp.down_proj), so bottleneck adapters cannot be applied"
        )
    return layers


def apply_bottleneck(model: nn.Module, config: BottleneckConfig) -> dict[str, Bottleneck]:
    """Wrap every site of every layer with a fresh identity adapter; return them by `layers.{i}.{site}`."""
    layers = decoder_layers(model)
    reference = model.get_input_embeddings().weight
    adapters = {}
    for i, layer in enumerate(layers):
        for site in config.sites:
            block_name, proj_name = SITES[site]
            block = getattr(layer, block_name)
            projection = getattr(block, proj_name)
            if isinstance(projection, AdaptedProjection):
                raise AdapterFormatError("this model already has a bottleneck adapter")
            adapter = Bottleneck(model.config.hidden_size, config).to(reference.device, reference.dtype)
            setattr(block, proj_name, AdaptedProjection(projection, adapter))
            adapters[f"layers.{i}.{site}"] = adapter
    return adapters


def adapter_tensors(adapters: dict[str, Bottleneck]) -> dict[str, torch.Tensor]:
    """The safetensors content: `layers.{i}.{site}.{down,up}.{weight,bias}`."""
    return {
        f"{prefix}.{name}": tensor.detach().to("cpu").contiguous()
        for prefix, adapter in adapters.items()
        for name, tensor in adapter.state_dict().items()
    }


def save_bottleneck(folder: Path, config: BottleneckConfig, adapters: dict[str, Bottleneck]) -> None:
    """Write adapter_config.json and adapter_model.safetensors into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(config.model_dump(), indent=2) + "\n")
    save_file(adapter_tensors(adapters), folder / WEIGHTS_FILE, metadata={"format": "pt"})


def read_config(folder: Path) -> BottleneckConfig:
    """Parse and check a bottleneck adapter_config.json (the shared checks, then the trainer's own)."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterFormatError(f"{folder}: no {CONFIG_FILE}")
    try:
        raw = json.loads(path.read_text())
        fmt.check_config(raw if isinstance(raw, dict) else {})
        return BottleneckConfig.model_validate(raw)
    except (json.JSONDecodeError, fmt.FormatError, ValidationError) as exc:
        raise AdapterFormatError(f"{path}: not a bottleneck adapter config: {exc}") from None


def load_bottleneck(model: nn.Module, folder: Path) -> dict[str, Bottleneck]:
    """Apply a saved bottleneck adapter folder to model in place, checking every tensor name and shape."""
    config = read_config(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise AdapterFormatError(f"{folder}: no {WEIGHTS_FILE}")
    if config.adapter_input != "block_output":
        raise AdapterFormatError(
            f"{folder}: adapter_input {config.adapter_input!r}: "
            "the trainer applies block_output adapters only"
        )
    tensors = load_file(folder / WEIGHTS_FILE)
    n_layers = len(decoder_layers(model))
    options = fmt.check_config(config.model_dump())
    expected = fmt.expected_shapes(options, n_layers, model.config.hidden_size)
    missing, extra = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or extra:
        raise AdapterFormatError(f"{folder}: tensors missing {missing[:4]}, unexpected {extra[:4]}")
    wrong = [k for k, shape in expected.items() if tuple(tensors[k].shape) != shape]
    if wrong:
        raise AdapterFormatError(
            f"{folder}: {wrong[0]} has shape {tuple(tensors[wrong[0]].shape)}, expected {expected[wrong[0]]}"
        )
    adapters = apply_bottleneck(model, config)
    for prefix, adapter in adapters.items():
        adapter.load_state_dict({k: tensors[f"{prefix}.{k}"] for k in adapter.state_dict()})
    return adapters
