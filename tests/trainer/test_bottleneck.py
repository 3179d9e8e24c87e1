import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from trainer.bottleneck import (
    AdaptedProjection,
    BottleneckConfig,
    apply_bottleneck,
    load_bottleneck,
    save_bottleneck,
)
from trainer.errors import AdapterFormatError


@pytest.fixture
def model(tiny_base: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_base).eval()


def randomize(adapters) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for adapter in adapters.values():
            for p in adapter.parameters():
                p.normal_(0, 0.2)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.arange(5, 25).unsqueeze(0)).logits


def test_fresh_adapter_is_the_identity(model):
    before = logits(model)
    apply_bottleneck(model, BottleneckConfig(bottleneck_size=8))
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("placement", "wrapped"),
    [("houlsby", {"self_attn.o_proj", "mlp.down_proj"}), ("pfeiffer", {"mlp.down_proj"})],
)
def test_placement_wraps_the_documented_sites(model, placement, wrapped):
    adapters = apply_bottleneck(model, BottleneckConfig(bottleneck_size=8, placement=placement))
    for layer in model.model.layers:
        found = {
            name
            for name in ("self_attn.o_proj", "mlp.down_proj")
            if isinstance(layer.get_submodule(name), AdaptedProjection)
        }
        assert found == wrapped
    assert len(adapters) == len(model.model.layers) * len(wrapped)


ACTIVATIONS = {
    "relu": lambda z: z.clamp(min=0),
    "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2))),
    "silu": lambda z: z * torch.sigmoid(z),
    "tanh": torch.tanh,
}


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_site_computes_the_documented_formula(model, act):
    config = BottleneckConfig(bottleneck_size=8, non_linearity=act, scaling=0.5)
    adapters = apply_bottleneck(model, config)
    randomize(adapters)
    wrapped = model.model.layers[1].mlp.down_proj
    adapter = adapters["layers.1.mlp"]
    x = torch.randn(3, model.config.intermediate_size)
    o = x @ wrapped.projection.weight.T
    hidden = ACTIVATIONS[act](o @ adapter.down.weight.T + adapter.down.bias)
    expected = o + 0.5 * (hidden @ adapter.up.weight.T + adapter.up.bias)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), expected)


@pytest.mark.parametrize(("placement", "sites"), [("houlsby", ("attn", "mlp")), ("pfeiffer", ("mlp",))])
def test_saved_files_follow_the_format(model, tmp_path, placement, sites):
    config = BottleneckConfig(base_model_name_or_path="tiny", bottleneck_size=8, placement=placement)
    save_bottleneck(tmp_path, config, apply_bottleneck(model, config))
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == {
        "peft_type": "BOTTLENECK",
        "base_model_name_or_path": "tiny",
        "bottleneck_size": 8,
        "placement": placement,
        "non_linearity": "relu",
        "scaling": 1.0,
        "adapter_input": "block_output",
    }
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    h = model.config.hidden_size
    expected = {}
    for i in range(model.config.num_hidden_layers):
        for s in sites:
            expected |= {
                f"layers.{i}.{s}.down.weight": (8, h),
                f"layers.{i}.{s}.down.bias": (8,),
                f"layers.{i}.{s}.up.weight": (h, 8),
                f"layers.{i}.{s}.up.bias": (h,),
            }
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected


def test_load_applies_a_saved_adapter(model, tiny_base, tmp_path):
    config = BottleneckConfig(bottleneck_size=8, non_linearity="gelu", scaling=2.0)
    adapters = apply_bottleneck(model, config)
    randomize(adapters)
    save_bottleneck(tmp_path, config, adapters)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    before = logits(fresh)
    load_bottleneck(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh), logits(model), atol=0, rtol=0)
    assert not torch.allclose(logits(fresh), before, atol=1e-3)


def saved(model, folder: Path) -> Path:
    config = BottleneckConfig(bottleneck_size=4)
    save_bottleneck(folder, config, apply_bottleneck(model, config))
    return folder


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda t: t.pop("layers.0.mlp.up.bias"), "missing"),
        (lambda t: t.update({"layers.0.extra": torch.zeros(1)}), "unexpected"),
        (lambda t: t.update({"layers.1.attn.down.weight": torch.zeros(5, 64)}), "has shape (5, 64)"),
    ],
)
def test_load_rejects_wrong_tensors(model, tiny_base, tmp_path, damage, message):
    folder = saved(model, tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    damage(tensors)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_bottleneck(AutoModelForCausalLM.from_pretrained(tiny_base), folder)


@pytest.mark.parametrize(
    "change",
    [{"peft_type": "LORA"}, {"bottleneck_size": 0}, {"placement": "middle"}, {"unknown_field": 1}],
)
def test_load_rejects_bad_configs(model, tiny_base, tmp_path, change):
    folder = saved(model, tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text()) | change
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError, match="not a bottleneck adapter config"):
        load_bottleneck(AutoModelForCausalLM.from_pretrained(tiny_base), folder)


def test_applying_twice_is_refused(model):
    apply_bottleneck(model, BottleneckConfig(bottleneck_size=4))
    with pytest.raises(AdapterFormatError, match="already has a bottleneck adapter"):
        apply_bottleneck(model, BottleneckConfig(bottleneck_size=4))


def test_trainer_and_server_read_the_same_config_checks(model, tmp_path):
    """One format, checked in one place: a config the shared checks refuse, the trainer refuses too,
    and a residual_stream adapter (served, not trainable here) is refused by the trainer's loader."""
    from peftserve_formats import bottleneck as fmt
    from trainer.bottleneck import load_bottleneck
    from trainer.errors import AdapterFormatError

    config = BottleneckConfig(bottleneck_size=4, placement="pfeiffer")
    save_bottleneck(tmp_path, config, apply_bottleneck(model, config))
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert fmt.check_config(raw).reads_residual is False
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw | {"adapter_input": "residual_stream"}))
    with pytest.raises(AdapterFormatError, match="block_output adapters only"):
        load_bottleneck(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw | {"adapter_input": "sideways"}))
    with pytest.raises(AdapterFormatError, match="adapter_input must be one of"):
        load_bottleneck(model, tmp_path)
