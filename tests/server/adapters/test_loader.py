"""Adapters that cannot be served are refused at load with a message naming the problem."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.adapters.common import (
    AdapterError,
    module_path,
    read_tensors,
    read_tensors_reference,
)
from server.adapters.loader import describe, folder_loader, load_adapter, reference_folder_loader
from server.adapters.methods import SUPPORTED_TEXT
from server.base_model import ModelShape
from tests.adapter_factory import (
    PEFT_KINDS,
    make_bitfit_adapter,
    make_bottleneck_adapter,
    make_peft_adapter,
)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_model_dir) -> Path:
    return make_peft_adapter(tiny_model_dir, "lora", tmp_path_factory.mktemp("lora") / "a")


def load(folder: Path, model, max_rank: int = 64):
    return folder_loader(model, max_rank)(folder)


def copy_with(src: Path, dst: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    shutil.copytree(src, dst)
    if config is not None:
        merged = {**json.loads((src / "adapter_config.json").read_text()), **config}
        (dst / "adapter_config.json").write_text(json.dumps(merged))
    if tensors is not None:
        save_file(tensors, dst / "adapter_model.safetensors")
    return dst


def refused(folder: Path, model, match: str, **kwargs) -> AdapterError:
    with pytest.raises(AdapterError, match=match) as error:
        load(folder, model, **kwargs)
    return error.value


def test_a_good_lora_loads(lora_dir, tiny_model):
    weights = load(lora_dir, tiny_model)
    assert weights.rank == 8
    assert weights.target_modules == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    info = describe(lora_dir)
    assert (info.peft_type, info.virtual_tokens, info.rank) == ("LORA", 0, 8)
    assert set(info.target_modules) == set(weights.target_modules)


def test_unsupported_kind_lists_what_is(lora_dir, tiny_model, tmp_path):
    error = refused(
        copy_with(lora_dir, tmp_path / "x", {"peft_type": "NOT_A_PEFT_TYPE"}), tiny_model, "NOT_A"
    )
    assert SUPPORTED_TEXT in str(error) and error.field == "peft_type"


def test_rank_above_the_limit(lora_dir, tiny_model):
    assert refused(lora_dir, tiny_model, "rank 8, above --max-lora-rank 4", max_rank=4).field == "r"


def test_adapter_for_another_base(lora_dir, tiny_model, tmp_path):
    tensors = load_file(lora_dir / "adapter_model.safetensors")
    name = next(n for n in tensors if "q_proj.lora_A" in n)
    tensors[name] = torch.randn(8, 32)
    error = refused(copy_with(lora_dir, tmp_path / "x", tensors=tensors), tiny_model, "another base model")
    assert error.field == name


def test_module_the_base_lacks(lora_dir, tiny_model, tmp_path):
    tensors = load_file(lora_dir / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.mlp.fc9.lora_A.weight"] = torch.randn(8, 64)
    refused(copy_with(lora_dir, tmp_path / "x", tensors=tensors), tiny_model, "fc9")


def test_layer_the_base_lacks(lora_dir, tiny_model, tmp_path):
    tensors = load_file(lora_dir / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.randn(8, 64)
    refused(copy_with(lora_dir, tmp_path / "x", tensors=tensors), tiny_model, "layer 7")


def test_nan_and_inf(lora_dir, tiny_model, tmp_path):
    tensors = load_file(lora_dir / "adapter_model.safetensors")
    name = next(iter(tensors))
    tensors[name][0, 0] = float("nan")
    assert (
        refused(copy_with(lora_dir, tmp_path / "x", tensors=tensors), tiny_model, "NaN or Inf").field == name
    )


@pytest.mark.parametrize(
    "config, match",
    [
        ({"bias": "some"}, "bias='some'"),
        ({"lora_bias": True, "use_dora": True}, "lora_bias with use_dora"),
        ({"trainable_token_indices": {"lm_head": [1]}}, "only embed_tokens"),
        ({"lora_alpha": "big"}, "lora_alpha"),
    ],
)
def test_unsupported_lora_options(lora_dir, tiny_model, tmp_path, config, match):
    refused(copy_with(lora_dir, tmp_path / "x", config), tiny_model, match)


def test_a_whole_lm_head_copy_needs_the_size_flag(tiny_model, tiny_model_dir, tmp_path):
    folder = make_peft_adapter(tiny_model_dir, "modules_to_save", tmp_path / "mts")
    error = refused(folder, tiny_model, "--max-module-copy-bytes is 0")
    assert error.field == "modules_to_save"
    size = tiny_model.shape.vocab_size * tiny_model.shape.hidden_size * 4
    with pytest.raises(AdapterError, match=f"{size} bytes"):
        folder_loader(tiny_model, 64, max_copy_bytes=size - 1)(folder)
    weights = folder_loader(tiny_model, 64, max_copy_bytes=size)(folder)
    assert weights.extras.head_copy.shape == weights.extras.embed_copy.shape == (49152, 64)


def test_lora_extras_refused_where_they_do_not_fit(lora_dir, tiny_model, tmp_path):
    tensors = load_file(lora_dir / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers."

    def with_tensor(name: str, tensor: torch.Tensor, config: dict | None = None, match: str = "") -> None:
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder = copy_with(lora_dir, folder, config, {**tensors, name: tensor})
        refused(folder, tiny_model, match)

    with_tensor(f"{prefix}0.self_attn.q_proj.lora_B.bias", torch.zeros(64), None, "lora_bias is not set")
    bias = f"{prefix}0.self_attn.q_proj.base_layer.bias"
    with_tensor(bias, torch.zeros(64), {"bias": "all"}, "another base model")
    norm = {"modules_to_save": ["input_layernorm"]}
    with_tensor(f"{prefix}5.input_layernorm.weight", torch.ones(64), norm, "not a norm of a decoder layer")
    linear = {"modules_to_save": ["q_proj"]}
    copy = f"{prefix}0.self_attn.q_proj.weight"
    with_tensor(copy, torch.ones(64, 64), linear, "modules_to_save may name only")


def test_trainable_tokens_are_checked(tiny_model, tiny_model_dir, tmp_path):
    folder = make_peft_adapter(tiny_model_dir, "trainable_tokens", tmp_path / "tt")
    weights = load(folder, tiny_model)
    index, values = weights.extras.token_rows
    assert values.shape == (len(index), 64) and not weights.extras.tied  # the tiny base is untied
    refused(copy_with(folder, tmp_path / "a", {"token_indices": [1, 2]}), tiny_model, "another base model")
    past = {"token_indices": [49152, *index.tolist()[1:]]}
    refused(copy_with(folder, tmp_path / "b", past), tiny_model, "past the vocabulary")
    refused(copy_with(folder, tmp_path / "c", {"target_modules": ["lm_head"]}), tiny_model, "embed_tokens")


def test_bitfit_and_ln_tuning_are_checked(tiny_model, tiny_model_dir, tmp_path):
    bitfit = make_bitfit_adapter(tiny_model.shape, tmp_path / "bitfit")
    assert sorted(s for s, _ in load(bitfit, tiny_model).extras.biases.items()) == [
        (layer, module) for layer in (0, 1) for module in ("down_proj", "o_proj", "q_proj")
    ]
    refused(copy_with(bitfit, tmp_path / "a", {"target_modules": ["fc9"]}), tiny_model, "target_modules")
    only_q = copy_with(bitfit, tmp_path / "b", {"target_modules": ["q_proj"]})
    refused(only_q, tiny_model, "unexpected tensor")
    ln = make_peft_adapter(tiny_model_dir, "ln_tuning", tmp_path / "ln")
    assert len(load(ln, tiny_model).extras.norms) == 2 * 2 + 1  # two per layer and the final norm
    tensors = {**load_file(ln / "adapter_model.safetensors"), "model.norm.bias": torch.zeros(64)}
    refused(copy_with(ln, tmp_path / "c", tensors=tensors), tiny_model, "unexpected tensor model.norm.bias")


def test_pickle_weights_are_never_read(lora_dir, tiny_model, tmp_path):
    folder = copy_with(lora_dir, tmp_path / "x")
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    refused(folder, tiny_model, "pickle")


def test_broken_files(lora_dir, tiny_model, tmp_path):
    folder = copy_with(lora_dir, tmp_path / "x")
    (folder / "adapter_model.safetensors").write_bytes(b"not safetensors")
    refused(folder, tiny_model, "not a readable safetensors")
    (folder / "adapter_config.json").write_text("{nope")
    refused(folder, tiny_model, "not valid JSON")
    (folder / "adapter_config.json").unlink()
    refused(folder, tiny_model, "no adapter_config.json")


def test_prompt_for_another_width(tiny_model_dir, tiny_model, tmp_path):
    folder = make_peft_adapter(tiny_model_dir, "prompt", tmp_path / "p")
    save_file({"prompt_embeddings": torch.randn(4, 32)}, folder / "adapter_model.safetensors")
    refused(folder, tiny_model, "prompt_embeddings has shape")
    assert (describe(folder).peft_type, describe(folder).virtual_tokens) == ("PROMPT_TUNING", 4)


@pytest.mark.parametrize(
    "config, match",
    [
        ({"placement": "sideways"}, "placement"),
        ({"non_linearity": "softmax"}, "non_linearity"),
        ({"bottleneck_size": 0}, "bottleneck_size"),
        ({"adapter_input": "elsewhere"}, "adapter_input"),
    ],
)
def test_bad_bottleneck_configs(tiny_model, tmp_path, config, match):
    folder = make_bottleneck_adapter(tiny_model.shape, tmp_path / "b")
    merged = {**json.loads((folder / "adapter_config.json").read_text()), **config}
    (folder / "adapter_config.json").write_text(json.dumps(merged))
    refused(folder, tiny_model, match)


def test_bottleneck_missing_a_layer(tiny_model, tmp_path):
    folder = make_bottleneck_adapter(tiny_model.shape, tmp_path / "b")
    tensors = load_file(folder / "adapter_model.safetensors")
    del tensors["layers.1.mlp.up.bias"]
    save_file(tensors, folder / "adapter_model.safetensors")
    refused(folder, tiny_model, "layers.1.mlp.up.bias is missing")


def _as_adapterhub(ours: Path, dst: Path, shape: ModelShape, **options) -> Path:
    """Write our bottleneck adapter in AdapterHub's saved layout."""
    tensors = load_file(ours / "adapter_model.safetensors")
    config = json.loads((ours / "adapter_config.json").read_text())
    hub = {}
    for name, tensor in tensors.items():
        _, layer, block, part, kind = name.split(".")
        where = "attention_adapters" if block == "attn" else "output_adapters"
        part = "adapter_down.0" if part == "down" else "adapter_up"
        hub[f"model.layers.{layer}.{where}.adapters.demo.{part}.{kind}"] = tensor
    dst.mkdir()
    save_file(hub, dst / "adapter.safetensors")
    hub_config = {
        "mh_adapter": config["placement"] == "houlsby",
        "output_adapter": True,
        "reduction_factor": shape.hidden_size // config["bottleneck_size"],
        "non_linearity": config["non_linearity"],
        "original_ln_before": config["adapter_input"] == "residual_stream",
        "original_ln_after": True,
        "residual_before_ln": True,
        "ln_before": False,
        "ln_after": False,
        "scaling": config["scaling"],
        **options,
    }
    (dst / "adapter_config.json").write_text(
        json.dumps(
            {"config": hub_config, "hidden_size": shape.hidden_size, "name": "demo", "model_type": "llama"}
        )
    )
    return dst


@pytest.mark.parametrize(
    "placement, adapter_input", [("houlsby", "block_output"), ("pfeiffer", "residual_stream")]
)
def test_adapterhub_layout_reads_as_ours(tiny_model, tmp_path, placement, adapter_input):
    ours = make_bottleneck_adapter(
        tiny_model.shape, tmp_path / "ours", placement=placement, adapter_input=adapter_input
    )
    hub = _as_adapterhub(ours, tmp_path / "hub", tiny_model.shape)
    a, b = load(ours, tiny_model), load(hub, tiny_model)
    assert a.sites.keys() == b.sites.keys()
    assert (a.activation, a.reads_residual) == (b.activation, b.reads_residual)
    for x, y in zip(a.tensors(), b.tensors(), strict=True):
        torch.testing.assert_close(x, y)
    assert describe(hub).peft_type == "BOTTLENECK"


@pytest.mark.parametrize("option", [{"ln_after": True}, {"use_gating": True}, {"scaling": "learned"}])
def test_adapterhub_options_we_cannot_reproduce(tiny_model, tmp_path, option):
    ours = make_bottleneck_adapter(tiny_model.shape, tmp_path / "ours")
    hub = _as_adapterhub(ours, tmp_path / "hub", tiny_model.shape, **option)
    refused(hub, tiny_model, next(iter(option)))


@pytest.mark.parametrize("kind", [*PEFT_KINDS, "bottleneck"])
def test_mapped_reader_equals_the_library_reader(kind, tiny_model_dir, tiny_model, tmp_path):
    if kind == "bottleneck":
        folder = make_bottleneck_adapter(tiny_model.shape, tmp_path / kind)
    else:
        folder = make_peft_adapter(tiny_model_dir, kind, tmp_path / kind)
    fast = folder_loader(tiny_model, 64)(folder)
    reference = reference_folder_loader(tiny_model, 64)(folder)
    assert type(fast) is type(reference) and fast.config == reference.config
    assert len(fast.tensors()) == len(reference.tensors()) > 0
    for x, y in zip(fast.tensors(), reference.tensors(), strict=True):
        assert x.dtype == y.dtype == tiny_model.dtype and x.shape == y.shape and torch.equal(x, y)


def _raw_file(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize(
    "header, data, match",
    [
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(12), "after the last tensor"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "holes"),
        (
            {
                "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "y": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            bytes(8),
            "overlap",
        ),
        ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "do not match"),
        ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8), "do not match"),
        ({"x": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "unknown dtype"),
        ({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "malformed"),
        ({"x": {"dtype": "F32", "shape": [2]}}, bytes(8), "malformed"),
        ({"__metadata__": {"a": 1}}, b"", "__metadata__"),
    ],
)
def test_malformed_safetensors_are_refused(tmp_path, header, data, match):
    _raw_file(tmp_path / "adapter_model.safetensors", header, data)
    with pytest.raises(AdapterError, match=match):
        read_tensors(tmp_path)
    with pytest.raises(AdapterError):  # the library refuses them too
        read_tensors_reference(tmp_path)


def test_header_longer_than_the_file(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(AdapterError, match="does not fit"):
        read_tensors(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("mixed", [False, True])
def test_a_non_finite_value_anywhere_is_found_and_named(tmp_path, bad, mixed):
    tensors = {f"t{i}": torch.randn(300, 70) for i in range(5)}
    if mixed:  # several dtypes: checked tensor by tensor
        tensors["t0"] = tensors["t0"].to(torch.bfloat16)
    tensors["t3"][211, 17] = bad
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="t3 holds NaN or Inf") as error:
        read_tensors(tmp_path)
    assert error.value.field == "t3"


def test_integer_tensors_are_refused(tmp_path):
    save_file({"x": torch.ones(3), "n": torch.arange(4)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"n has dtype torch\.int64"):
        read_tensors(tmp_path)


def test_tensors_read_equal_the_library_s_whatever_their_dtypes_and_alignment(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),  # 14 bytes: what follows is not 4-aligned
        "c": torch.randn(2, 2, 3),
        "d": torch.randn(5).to(torch.float16),
        "e": torch.randn(0, 4),
        "f": torch.tensor(2.5, dtype=torch.float64),
    }
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    fast, reference = read_tensors(tmp_path), read_tensors_reference(tmp_path)
    assert fast.keys() == reference.keys() == tensors.keys()
    for name, tensor in reference.items():
        assert fast[name].dtype == tensor.dtype and fast[name].shape == tensor.shape
        assert torch.equal(fast[name], tensor)


@pytest.mark.parametrize("kind", ["lora", "dora", "prompt", "prefix"])
def test_a_parsed_adapter_does_not_depend_on_its_file(kind, tiny_model_dir, tiny_model, tmp_path):
    folder = make_peft_adapter(tiny_model_dir, kind, tmp_path / kind)
    weights = load(folder, tiny_model)
    before = [t.clone() for t in weights.tensors()]
    (folder / "adapter_model.safetensors").write_bytes(b"")  # truncated in place, as a rewrite would
    for old, now in zip(before, weights.tensors(), strict=True):
        assert torch.equal(old, now)


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_lora_packed_in_the_model_dtype_equals_the_plain_formula(
    lora_dir, tiny_model, tmp_path, file_dtype, model_dtype
):
    tensors = {k: v.to(file_dtype) for k, v in load_file(lora_dir / "adapter_model.safetensors").items()}
    pattern = {"alpha_pattern": {"v_proj": 3.0}, "use_rslora": True}
    folder = copy_with(lora_dir, tmp_path / "x", pattern, tensors=tensors)
    config = json.loads((folder / "adapter_config.json").read_text())
    weights = load_adapter(
        folder, tiny_model.shape, max_rank=64, dtype=model_dtype, base_weight=lambda *_: None
    )
    for (layer, module), site in weights.sites.items():
        prefix = f"base_model.model.{module_path(layer, module)}"
        a, b = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
        alpha = 3.0 if module == "v_proj" else config["lora_alpha"]
        scale = alpha / a.shape[0] ** 0.5
        assert site.a.dtype == site.b.dtype == model_dtype
        assert torch.equal(site.a, a.float().to(model_dtype))
        assert torch.equal(site.b, (b.float() * scale).t().to(model_dtype))
    storage = {t.untyped_storage().data_ptr() for t in weights.tensors()}
    assert len(storage) == 1, "one buffer for the whole adapter"
