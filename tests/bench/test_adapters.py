"""The bench's fast adapter writer produces adapters the server and PEFT's own reader accept."""

from __future__ import annotations

import argparse
import gc
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from bench.adapters import write_lora_store, zipf_choices
from bench.bench_adapters import NEW_METHODS, engine_median, report
from server.adapters.common import read_tensors_reference
from server.adapters.loader import describe, folder_loader, reference_folder_loader
from server.base_model import linear_module
from server.config import AdapterSettings
from server.engine.engine import Engine
from server.registry.merge import export_merged
from tests.adapter_factory import load_base


def test_a_store_of_many_loras_written_directly(tiny_model, tmp_path):
    names = write_lora_store(tmp_path, tiny_model.shape, 40, distinct=8)
    assert names == [f"t{i:05d}" for i in range(40)]
    load, reference = folder_loader(tiny_model, 64), reference_folder_loader(tiny_model, 64)
    ranks = set()
    for name in names:
        folder = tmp_path / name
        config = json.loads((folder / "adapter_config.json").read_text())
        info = describe(folder)
        assert info.peft_type == "LORA" and 8 <= info.rank <= 16 and info.rank == config["r"]
        assert info.target_modules == ("q_proj", "v_proj")
        weights = load(folder)
        assert weights.rank == info.rank and len(weights.sites) == 2 * tiny_model.shape.num_layers
        for x, y in zip(weights.tensors(), reference(folder).tensors(), strict=True):
            assert x.equal(y)
        ranks.add(info.rank)
    assert len(ranks) > 1
    first = read_tensors_reference(tmp_path / names[0])
    second = read_tensors_reference(tmp_path / names[1])
    assert any(not first[k].equal(second[k]) for k in first), "distinct files hold distinct weights"


def test_zipf_choices_favour_the_first_ranks():
    picks = zipf_choices(5000, 1000, 1.0, seed=0)
    assert all(0 <= p < 1000 for p in picks)
    assert picks.count(0) > picks.count(1) > picks.count(50)
    uniform = zipf_choices(5000, 10, 0.0, seed=0)
    assert min(uniform.count(i) for i in range(10)) > 350


@pytest.mark.parametrize("kind", list(NEW_METHODS))
def test_new_method_writers_load_here_and_in_peft_alike(kind, tiny_model, tiny_model_dir, tmp_path):
    """Each writer's adapter loads in our loader; merged by us, it gives PEFT's logits (BitFit is
    our format, which PEFT does not read: there the merged model's biases are the file's)."""
    folder = NEW_METHODS[kind](tmp_path / kind, tiny_model.shape, 3)
    weights = folder_loader(tiny_model, 64)(folder)
    merged = load_base(export_merged(tiny_model, weights, tmp_path / "merged"))
    trained = json.loads((folder / "adapter_config.json").read_text()).get("token_indices", [])
    ids = torch.tensor([tiny_model.tokenizer("The cat sat on the mat").input_ids + trained[:4]])
    with torch.no_grad():
        if kind == "bitfit":
            saved = load_file(folder / "adapter_model.safetensors")
            for layer in range(tiny_model.shape.num_layers):
                for name in tiny_model.shape.linear_dims():
                    bias = linear_module(merged, layer, name).bias
                    assert bias.equal(saved[f"layers.{layer}.{name}.bias"])
            expected = load_base(tiny_model_dir)(input_ids=ids).logits
            assert not torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-4)
            return
        peft = PeftModel.from_pretrained(load_base(tiny_model_dir), folder).eval()
        expected = peft(input_ids=ids).logits
        assert not torch.allclose(load_base(tiny_model_dir)(input_ids=ids).logits, expected, atol=1e-4)
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_report_leaves_out_targets_of_configurations_not_run(tiny_model):
    """`--ks 64` runs no K=1, which the merged target divides by: the report skips that target."""
    results = {
        "engine, no adapters": 10.0,
        "engine K=64": 9.0,
        "engine, all kinds": 8.0,
        "engine, lora-00 merged (--merge-adapter)": 10.0,
        "adapter load (s, median)": 0.05,
        "PEFT set_adapter + generate": 1.0,
        "PEFT adapter_names batch": 2.0,
    }
    args = argparse.Namespace(
        requests=4, new_tokens=2, zipf_s=1.0, ks="64", lowrank_path="auto", decode_graphs="auto"
    )
    ratios = report(results, args, tiny_model)["ratios"]
    assert ratios == pytest.approx(
        {
            "engine K=64 / engine, no adapters": 0.9,
            "engine K=64 / PEFT set_adapter + generate": 9.0,
            "engine K=64 / PEFT adapter_names batch": 4.5,
            "engine, all kinds / engine, no adapters": 0.8,
        }
    )


def test_engine_median_frees_its_engine_before_returning(tiny_model, tmp_path):
    """A bench of many engines must not wait on the cycle collector to free each one's memory (a
    long run held 24 GB and slowed down configuration by configuration)."""

    def engines() -> int:
        return sum(isinstance(o, Engine) for o in gc.get_objects())

    gc.disable()
    try:
        before = engines()
        rate = engine_median(tiny_model, tmp_path, [[5, 6, 7]], [None], 2, 1, AdapterSettings())
        assert rate > 0
        assert engines() == before
    finally:
        gc.enable()
