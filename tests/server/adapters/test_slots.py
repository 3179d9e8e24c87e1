"""Slot tables: an eviction costs no copy, and the next occupant never sees the last one's weights."""

from __future__ import annotations

import torch

from bench.adapters import write_ia3, write_lora
from server.adapters.loader import folder_loader
from server.adapters.method import Hook
from server.adapters.slots import SlotTable


def test_a_slot_reused_by_an_adapter_on_fewer_sites_holds_nothing_of_the_former(tiny_model, tmp_path):
    shape = tiny_model.shape
    load = folder_loader(tiny_model, 64, own=False)
    table = SlotTable(2, shape, tiny_model.dtype, tiny_model.device, max_rank=64)
    table.install(0, load(write_lora(tmp_path / "wide", shape, rank=16, seed=1)))  # every linear
    table.install(1, load(write_ia3(tmp_path / "ia3", shape, seed=2)))
    lowrank_sites = set(table.lowrank)
    table.clear(0)
    assert all(t.rank(0) == 0 for t in table.lowrank.values())  # empty at once
    table.install(0, load(write_ia3(tmp_path / "ia3-2", shape, seed=3)))  # no low-rank sites at all
    for key in lowrank_sites:
        assert not table.lowrank[key].a[1].any() and not table.lowrank[key].b[1].any(), key
    table.clear(0)
    table.install(0, load(write_lora(tmp_path / "narrow", shape, rank=4, seed=4)))
    for t in table.lowrank.values():
        assert t.rank(0) == 4 and not t.a[1, 4:].any() and not t.b[1, 4:].any()
    # the IA3 scales of slot 0's former occupant are ones again, slot 1's are its own
    for (hook, _), scales in table.scales.items():
        assert torch.equal(scales.data[0], torch.ones_like(scales.data[0])), hook
        assert hook in (Hook.INPUT_SCALE, Hook.OUTPUT_SCALE) and 1 in scales.slots


def test_a_slot_filled_from_the_file_equals_one_filled_from_the_owned_copy(tiny_model, tmp_path):
    shape = tiny_model.shape
    folder = write_lora(tmp_path / "lora", shape, rank=8, seed=5, dora=True)
    for dtype in (torch.float32, torch.bfloat16):
        table = SlotTable(2, shape, dtype, tiny_model.device, max_rank=16)
        table.install(0, folder_loader(tiny_model, 16, own=False)(folder))
        owned = folder_loader(tiny_model, 16, own=False)(folder)
        owned.own(dtype)
        table.install(1, owned)
        for key, t in table.lowrank.items():
            assert torch.equal(t.a[1], t.a[2]) and torch.equal(t.b[1], t.b[2]), key
        for key, s in table.scales.items():
            assert torch.equal(s.data[0], s.data[1]), key
