"""Every PEFT type is either served by a method or refused at upload with its reason and the way out
(merge it into the base); a refused upload leaves the store as it was."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from peft import BOFTConfig, LoHaConfig, LoKrConfig, PeftType, get_peft_model
from safetensors.torch import save_file

from server.adapters.common import AdapterError
from server.adapters.methods import METHODS, method_by_type
from server.adapters.refused import REASONS
from tests.adapter_factory import load_base
from tests.conftest import LiveServer, tiny_settings

SERVED = {t for m in METHODS for t in m.peft_types}
REFUSED = sorted(t.value for t in PeftType if t.value not in SERVED)
REAL = {  # refused types with a real PEFT checkpoint (the others: their config alone)
    "LOHA": lambda: LoHaConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False),
    "LOKR": lambda: LoKrConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False),
    "BOFT": lambda: BOFTConfig(boft_block_size=8, target_modules=["q_proj"]),
}
DENSE = ["LOHA", "LOKR", "FOURIERFT", "WAVEFT", "SHIRA", "HIRA", "C3A", "GLORA", "MISS", "OSF", "RANDLORA"]


def test_every_peft_type_is_served_or_refused_with_a_reason():
    assert {t.value for t in PeftType} <= SERVED | set(REASONS)
    assert {"ADALORA", "VERA", "OFT"} <= SERVED


@pytest.mark.parametrize("peft_type", REFUSED)
def test_a_refused_type_says_why_and_points_to_merging(peft_type):
    with pytest.raises(AdapterError) as error:
        method_by_type(peft_type)
    message = str(error.value)
    assert f"{peft_type} is not served" in message and "merge_and_unload" in message
    assert error.value.field == "peft_type"
    if peft_type in DENSE:
        assert "dense per-layer weight delta" in message
    if peft_type in ("XLORA", "POLY"):
        assert "routes each token" in message


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, tiny_model):
    root = tmp_path_factory.mktemp("refused-store")
    with LiveServer(tiny_settings(tiny_model_dir, store=root), tiny_model) as live:
        live.store_root = root
        yield live


def checkpoint(peft_type: str, folder: Path, base_dir: Path) -> Path:
    if peft_type in REAL:
        config = REAL[peft_type]()
        config.task_type = "CAUSAL_LM"
        get_peft_model(load_base(base_dir), config).save_pretrained(folder)
        return folder
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": peft_type, "task_type": "CAUSAL_LM"})
    )
    save_file({"weight": torch.ones(2)}, folder / "adapter_model.safetensors")
    return folder


@pytest.mark.parametrize("peft_type", REFUSED)
def test_upload_of_a_refused_type_is_400_and_leaves_nothing(peft_type, server, tiny_model_dir, tmp_path):
    folder = checkpoint(peft_type, tmp_path / "adapter", tiny_model_dir)
    before = sorted(str(p.relative_to(server.store_root)) for p in server.store_root.rglob("*"))
    files = [("file", (p.name, p.read_bytes())) for p in sorted(folder.iterdir()) if p.suffix != ".md"]
    reply = httpx.post(f"{server.url}/v1/adapters", data={"name": "refused"}, files=files, timeout=60)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert f"{peft_type} is not served" in error["message"] and "merge_and_unload" in error["message"]
    assert error["param"] == "peft_type"
    assert httpx.get(f"{server.url}/v1/adapters/refused").status_code == 404
    after = sorted(str(p.relative_to(server.store_root)) for p in server.store_root.rglob("*"))
    assert [p for p in after if ".staging" not in p] == [p for p in before if ".staging" not in p]
