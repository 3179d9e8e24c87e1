"""BitFit adapters (only linear biases trained) in peftserve's format, on HF Llama-family models.

The format is defined once in peftserve_formats/bitfit.py (docs/adapter-format.md), which the
server reads with the same checks. `apply_bitfit` freezes the model and makes the chosen
linears' biases trainable, adding zero biases where the base has none; `load_bitfit` applies a
saved folder (the served adapter is checked against it).
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peftserve_formats import bitfit as fmt
from trainer.bottleneck import decoder_layers
from trainer.errors import AdapterFormatError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MLP = ("gate_proj", "up_proj", "down_proj")


def _linear(layer: nn.Module, module: str) -> nn.Linear:
    return getattr(layer.mlp if module in MLP else layer.self_attn, module)


def apply_bitfit(model: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Parameter]:
    """Freeze the model; return the trainable biases of the target linears by format tensor name."""
    model.requires_grad_(False)
    reference = model.get_input_embeddings().weight
    biases = {}
    for i, layer in enumerate(decoder_layers(model)):
        for module in targets:
            linear = _linear(layer, module)
            if linear.bias is None:  # the adapter adds the bias, starting from zero
                linear.bias = nn.Parameter(torch.zeros(linear.out_features, device=reference.device))
            linear.bias.requires_grad_(True)
            biases[fmt.tensor_name(i, module)] = linear.bias
    return biases


def save_bitfit(folder: Path, targets: tuple[str, ...], biases: dict[str, nn.Parameter], base: str) -> None:
    """Write adapter_config.json and adapter_model.safetensors into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(fmt.to_config(targets, base), indent=2) + "\n")
    tensors = {name: bias.detach().float().cpu().contiguous() for name, bias in biases.items()}
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})


def load_bitfit(model: nn.Module, folder: Path) -> dict[str, nn.Parameter]:
    """Apply a saved BitFit folder to model in place, checking every tensor name and shape."""
    try:
        targets = fmt.check_config(json.loads((folder / CONFIG_FILE).read_text()))
    except (OSError, json.JSONDecodeError, fmt.FormatError) as exc:
        raise AdapterFormatError(f"{folder}: not a BitFit adapter config: {exc}") from None
    tensors = load_file(folder / WEIGHTS_FILE)
    expected = fmt.expected_names(targets, len(decoder_layers(model)))
    if sorted(expected) != sorted(tensors):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise AdapterFormatError(f"{folder}: tensors missing {missing[:4]}, unexpected {extra[:4]}")
    biases = apply_bitfit(model, targets)
    with torch.no_grad():
        for name, bias in biases.items():
            if tensors[name].shape != bias.shape:
                raise AdapterFormatError(f"{folder}: {name} has shape {tuple(tensors[name].shape)}")
            bias.copy_(tensors[name])
    return biases
