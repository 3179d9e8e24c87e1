"""AdaLoRA, VeRA and OFT: what their parsers honour and refuse, and OFT's served rotation against
PEFT's own layer and against the per-row reference. (Greedy tokens in a mixed batch against PEFT:
test_batched_reference.py; merge: tests/server/registry/test_merge.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import OFTConfig, PeftModel, VeraConfig, get_peft_model
from safetensors.torch import load_file

from server.adapters.common import AdapterError
from server.adapters.context import BatchContext
from server.adapters.loader import folder_loader
from server.adapters.method import Hook
from server.adapters.rotation import RotationRows, RotationTable, rotate_rows, rotate_rows_reference
from server.adapters.slots import SlotTable
from server.base_model import linear_module
from tests.adapter_factory import ADALORA_PRUNED, load_base, make_peft_adapter


def load(folder: Path, model, max_rank: int = 64):
    return folder_loader(model, max_rank)(folder)


def with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return dst


def peft_adapter(base_dir: Path, config, out: Path, seed: int = 0) -> Path:
    config.task_type = "CAUSAL_LM"
    torch.manual_seed(seed)
    model = get_peft_model(load_base(base_dir), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape) * (0.3 if "lambda" in name else 0.2))
    model.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------- AdaLoRA


def test_adalora_keeps_only_the_singular_values_the_budget_kept(tiny_model, tiny_model_dir, tmp_path):
    folder = make_peft_adapter(tiny_model_dir, "adalora", tmp_path / "a")
    tensors = load_file(folder / "adapter_model.safetensors")
    weights = load(folder, tiny_model)
    for (layer, module), site in weights.sites.items():
        e = next(t for n, t in tensors.items() if f"layers.{layer}." in n and f"{module}.lora_E" in n)
        assert site.a.shape[0] == int((e != 0).sum()), (layer, module)
    # layer 0 q_proj: rank_pattern kept 4 of init_r 6 in the file, and 2 of those 4 are zero in E
    q_a = next(t for n, t in tensors.items() if "layers.0.self_attn.q_proj.lora_A" in n)
    assert q_a.shape[0] == sum(next(iter(ADALORA_PRUNED.values()))) == 4
    assert weights.sites[(0, "q_proj")].a.shape[0] == 2
    assert weights.rank == 4  # every other layer: 6 minus its 2 zeros in E


def test_adalora_above_max_lora_rank_names_the_flag(tiny_model, tiny_model_dir, tmp_path):
    folder = make_peft_adapter(tiny_model_dir, "adalora", tmp_path / "a")
    with pytest.raises(AdapterError, match="--max-lora-rank 2; start the server with --max-lora-rank 4"):
        load(folder, tiny_model, max_rank=2)


def test_adalora_ranks_must_match_init_r(tiny_model, tiny_model_dir, tmp_path):
    folder = make_peft_adapter(tiny_model_dir, "adalora", tmp_path / "a")
    with pytest.raises(AdapterError, match="shape"):
        load(with_config(folder, tmp_path / "b", init_r=5), tiny_model)


# ---------------------------------------------------------------------------- VeRA


def test_vera_regenerated_projections_equal_the_saved_ones(tiny_model, tiny_model_dir, tmp_path):
    def config(save: bool) -> VeraConfig:
        return VeraConfig(
            r=8, target_modules=["q_proj", "down_proj"], projection_prng_key=11, save_projection=save
        )

    saved = peft_adapter(tiny_model_dir, config(True), tmp_path / "saved")
    regenerated = peft_adapter(tiny_model_dir, config(False), tmp_path / "regenerated")
    assert any("vera_A" in n for n in load_file(saved / "adapter_model.safetensors"))
    assert not any("vera_A" in n for n in load_file(regenerated / "adapter_model.safetensors"))
    a, b = load(saved, tiny_model), load(regenerated, tiny_model)
    assert a.sites.keys() == b.sites.keys()
    for site in a.sites:
        torch.testing.assert_close(a.sites[site].a, b.sites[site].a, rtol=0, atol=0)
        torch.testing.assert_close(a.sites[site].b, b.sites[site].b, rtol=0, atol=0)


def test_vera_without_projections_or_key_is_refused(tiny_model, tiny_model_dir, tmp_path):
    folder = make_peft_adapter(tiny_model_dir, "vera", tmp_path / "v")
    config = json.loads((folder / "adapter_config.json").read_text())
    del config["projection_prng_key"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="save_projection=True") as error:
        load(folder, tiny_model)
    assert error.value.field == "projection_prng_key"


def test_vera_rank_above_max_lora_rank_names_the_flag(tiny_model, tiny_model_dir, tmp_path):
    folder = make_peft_adapter(tiny_model_dir, "vera", tmp_path / "v")
    with pytest.raises(AdapterError, match=r"r=16 is above --max-lora-rank 8.*--max-lora-rank 16") as error:
        load(folder, tiny_model, max_rank=8)
    assert error.value.field == "r"


# ---------------------------------------------------------------------------- OFT

OFT_VARIANTS = {
    "neumann": dict(oft_block_size=16),
    "exact cayley": dict(oft_block_size=8, use_cayley_neumann=False),
    "coft": dict(oft_block_size=16, coft=True, eps=1e-2),
    "block share": dict(oft_block_size=16, block_share=True),
    "r instead of block size": dict(r=4, oft_block_size=0),
}


@pytest.mark.parametrize("variant", list(OFT_VARIANTS))
def test_oft_served_rows_equal_peft_layer(variant, tiny_model, tiny_model_dir, tmp_path):
    config = OFTConfig(target_modules=["q_proj", "down_proj"], **OFT_VARIANTS[variant])
    folder = peft_adapter(tiny_model_dir, config, tmp_path / "oft")
    peft = PeftModel.from_pretrained(load_base(tiny_model_dir), folder).eval()
    slots = SlotTable(3, tiny_model.shape, torch.float32, torch.device("cpu"), max_rank=8)
    slots.install(1, load(folder, tiny_model))
    row_slots = [1, -1, 1, 1, 1, 1, -1, 1]  # slot 1: a group (>= 4 rows)
    context = BatchContext(slots, row_slots)
    for layer, name in ((0, "q_proj"), (1, "down_proj")):
        base = linear_module(tiny_model.hf, layer, name)
        x = torch.randn(len(row_slots), base.in_features)
        with torch.no_grad():
            served = context.linear(layer, name, base, x)
            expected = linear_module(peft.get_base_model(), layer, name)(x)
            plain = base(x)
        for row, slot in enumerate(row_slots):
            want = expected[row] if slot == 1 else plain[row]
            torch.testing.assert_close(served[row], want, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(served[0], plain[0], atol=1e-3), "the rotation should change the output"


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"oft_block_size": None}, "predates PEFT 0.14"),
        ({"peft_version": "0.17.1"}, "PEFT changed that series in 0.18.0"),
        ({"bias": "oft_only"}, "biases"),
    ],
)
def test_oft_checkpoints_it_cannot_reproduce_are_refused(
    changes, match, tiny_model, tiny_model_dir, tmp_path
):
    folder = make_peft_adapter(tiny_model_dir, "oft", tmp_path / "o")
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update({k: v for k, v in changes.items() if v is not None})
    for key in (k for k, v in changes.items() if v is None):
        del config[key]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=match):
        load(folder, tiny_model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_rows_matches_the_per_row_reference(dtype):
    generator = torch.Generator().manual_seed(0)
    small = RotationTable(6, 4, 8, dtype, torch.device("cpu"))  # in = 32 as 4 blocks of 8
    for slot in (0, 2, 5):
        q = torch.randn(4, 8, 8, generator=generator)
        small.set(slot, torch.linalg.matrix_exp(q - q.transpose(1, 2)).to(dtype))
    slot_of = [2, -1, 0, 2, 2, 2, 5, 3, 2, 0]  # slot 2: a group; 0 and 5: gathered rows; 3: none here
    x = torch.randn(len(slot_of), 32, generator=generator).to(dtype)
    rows = RotationRows.build(slot_of, small.slots & set(slot_of), torch.device("cpu"))
    assert [s for s, _ in rows.groups] == [2] and rows.rows.tolist() == [2, 9, 6]
    got = rotate_rows(x, small, rows)
    want = rotate_rows_reference(x, small, slot_of)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    assert torch.equal(got[[1, 7]], x[[1, 7]]), "rows without a rotation here pass unchanged"


def test_two_block_sizes_at_one_site_and_clear(tiny_model, tiny_model_dir, tmp_path):
    a = make_peft_adapter(tiny_model_dir, "oft", tmp_path / "a")  # blocks of 16
    config = OFTConfig(oft_block_size=8, target_modules=["q_proj"], init_weights=False)
    b = peft_adapter(tiny_model_dir, config, tmp_path / "b", seed=1)
    slots = SlotTable(2, tiny_model.shape, torch.float32, torch.device("cpu"), max_rank=8)
    slots.install(0, load(a, tiny_model))
    slots.install(1, load(b, tiny_model))
    tables = slots.rotations[(Hook.INPUT_ROTATION, (0, "q_proj"))]
    assert sorted(t.block for t in tables) == [8, 16]
    base = linear_module(tiny_model.hf, 0, "q_proj")
    x = torch.randn(3, base.in_features)
    with torch.no_grad():
        both = BatchContext(slots, [0, 1, -1]).linear(0, "q_proj", base, x)
        slots.clear(1)
        after = BatchContext(slots, [0, -1, -1]).linear(0, "q_proj", base, x)
        plain = base(x)
    assert not torch.allclose(both[1], plain[1]) and torch.allclose(after[1], plain[1])
    assert torch.equal(both[0], after[0]) and torch.equal(both[2], plain[2])
