"""Everything a step touches sits on the model's device, and a step reads no tensor value but the
sampled tokens (issue 12, item 2).

On the meta device a tensor has a shape and no values: a host sync (int(t), t.item(), t.tolist())
raises there, and so does an op that mixes in a CPU tensor. So these run the engine itself, with
adapters of every kind, on a copy of the tiny model moved to meta; only sampling, the one place a
step may read the device, is replaced. DoRA is left out: its parse computes the rescale on the
base's device and keeps the result in CPU memory, a copy meta cannot make."""

from __future__ import annotations

import copy
import dataclasses

import torch

from server.adapters.context import BatchContext
from server.adapters.loader import folder_loader
from server.adapters.lowrank import RowGroups
from server.adapters.slots import SlotTable
from server.config import AdapterSettings, EngineSettings
from server.engine import engine as engine_module
from server.engine.engine import Engine
from server.engine.sampler import SamplingParams
from server.registry.merge import fold_into
from server.registry.store import Store
from tests.helpers import run_until_done, token_ids

META = torch.device("meta")
NEW_TOKENS = 4
TOKEN = 100  # what the stand-in sampler answers: any id that is not EOS


def on_meta(model):
    return dataclasses.replace(model, hf=copy.deepcopy(model.hf).to(META), device=META)


def test_prefill_and_decode_of_every_kind_on_meta_read_no_tensor_value(
    tiny_model, kinds_store, tmp_path, monkeypatch
):
    store = tmp_path / "store"
    store.mkdir()
    names = sorted(p.name for p in kinds_store.iterdir() if p.name != "dora")
    for name in names:
        (store / name).symlink_to(kinds_store / name, target_is_directory=True)
    sampled: list[torch.device] = []

    def stand_in_sample(logits, params, generators):
        sampled.append(logits.device)
        return [TOKEN] * logits.shape[0]

    monkeypatch.setattr(engine_module, "sample", stand_in_sample)
    model = on_meta(tiny_model)
    engine = Engine(model, EngineSettings(), AdapterSettings(), Store(store))
    prompt = tiny_model.tokenizer("The cat sat on the mat").input_ids
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    handles = [engine.submit(prompt, params, engine.resolve_model(n) if n else None) for n in [None, *names]]
    results = run_until_done(engine, handles)
    assert [token_ids(events) for events in results] == [[TOKEN] * NEW_TOKENS] * len(handles)
    assert len(sampled) >= NEW_TOKENS and set(sampled) == {META}

    # Adapters were installed on the base's device, in its dtype.
    slots = engine.slots
    tensors = [t for table in slots.lowrank.values() for t in (table.a, table.b, table.a_bias, table.b_bias)]
    tensors += [table.data for table in slots.scales.values()]
    for per_slot in slots.data:
        for value in per_slot.values():
            tensors += [
                v for v in (value if isinstance(value, tuple) else (value,)) if isinstance(v, torch.Tensor)
            ]
    assert len(slots.lowrank) and len(slots.scales) and len(tensors) > 2 * len(slots.lowrank)
    assert {(t.device, t.dtype) for t in tensors} == {(META, model.dtype)}


def test_merge_adapter_folds_on_the_base_device(tiny_model, kinds_store):
    """--merge-adapter: adapters parsed into CPU memory fold into weights on the base's device."""
    model = on_meta(tiny_model)
    load = folder_loader(tiny_model, 64)
    for name in ("lora", "rslora", "ia3"):
        fold_into(model, load(kinds_store / name))
    weights = [p for p in model.hf.parameters()]
    assert {p.device for p in weights} == {META}


def test_a_step_copies_its_slot_indices_to_the_device_once(tiny_model, kinds_store, monkeypatch):
    model = on_meta(tiny_model)
    slots = SlotTable(8, model.shape, model.dtype, META, max_rank=64)
    load = folder_loader(tiny_model, 64)
    names = ["lora", "ia3", "bottleneck", "prompt"]
    for slot, name in enumerate(names):
        slots.install(slot, load(kinds_store / name))
    copies = []
    to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        out = to(self, *args, **kwargs)
        if self.device.type == "cpu" and out.device.type == "meta":
            copies.append(tuple(self.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    context = BatchContext(slots, [0, -1, 1, 2, 3, 2, 0])
    assert context.delta_groups is not None and context.block_groups and context.residual_mask is None
    assert context.delta_groups.segments(slots.max_rank).stack_index.device == META
    assert len(copies) == 1, copies


def test_on_the_cpu_a_step_builds_no_torch_path_segments_the_kernel_does_not_use(
    tiny_model, kinds_store, monkeypatch
):
    slots = SlotTable(8, tiny_model.shape, tiny_model.dtype, tiny_model.device, max_rank=64)
    load = folder_loader(tiny_model, 64)
    for slot, name in enumerate(["lora", "bottleneck"]):
        slots.install(slot, load(kinds_store / name))
    built = []
    segments_host = RowGroups.segments_host
    monkeypatch.setattr(RowGroups, "segments_host", lambda self, r: built.append(r) or segments_host(self, r))
    context = BatchContext(slots, [0, -1, 1, 0])
    assert context.delta_groups is not None and context.block_groups and built == []
    assert context.delta_groups.segments(64).targets.tolist() == [0, 3] and built == [64]  # on first use
