"""Several replicas on one store folder, vLLM's runtime adapter endpoints, and --adapter-dir."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.registry.store import DELETED_MARK
from tests.adapter_factory import make_bottleneck_adapter, make_peft_adapter
from tests.conftest import LiveServer, tiny_settings
from tests.helpers import wait_until

ADMIN = "admin-secret"
GREEDY = {"prompt": "hello there", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_model_dir, tiny_model) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {
        "lora": make_peft_adapter(tiny_model_dir, "lora", root / "lora", seed=1),
        "prefix": make_peft_adapter(tiny_model_dir, "prefix", root / "prefix", seed=2),
        "bottleneck": make_bottleneck_adapter(tiny_model.shape, root / "bottleneck", seed=3),
    }


def replica(root: Path, tiny_model_dir: Path, tiny_model, **overrides) -> LiveServer:
    settings = tiny_settings(tiny_model_dir, store=root, admin_key=ADMIN, **overrides)
    live = LiveServer(settings, tiny_model)
    live.http = httpx.Client(base_url=live.url, timeout=120, headers={"Authorization": f"Bearer {ADMIN}"})
    return live


def upload(server: LiveServer, name: str, folder: Path) -> httpx.Response:
    files = [("file", (p.name, p.read_bytes())) for p in sorted(folder.iterdir()) if p.name != "README.md"]
    return server.http.post("/v1/adapters", data={"name": name}, files=files)


def complete(server: LiveServer, model: str) -> httpx.Response:
    return server.http.post("/v1/completions", json={"model": model, **GREEDY})


def test_an_upload_on_one_replica_is_served_by_the_other_on_a_miss(
    tmp_path, tiny_model_dir, tiny_model, sources
):
    # No periodic refresh: B finds A's upload because a name it does not know is looked up on disk.
    with (
        replica(tmp_path / "store", tiny_model_dir, tiny_model, store_refresh=0) as a,
        replica(tmp_path / "store", tiny_model_dir, tiny_model, store_refresh=0) as b,
    ):
        assert complete(b, "shared").status_code == 404
        assert upload(a, "shared", sources["lora"]).status_code == 201
        reply = complete(b, "shared")
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == complete(a, "shared").json()["choices"][0]["text"]
        # A second version from B: distinct number, and A serves it when asked by number.
        assert upload(b, "shared", sources["lora"]).json()["version"] == 2
        assert complete(a, "shared@2").status_code == 200


def test_new_versions_and_deletes_reach_the_other_replica_by_refresh(
    tmp_path, tiny_model_dir, tiny_model, sources
):
    with (
        replica(tmp_path / "store", tiny_model_dir, tiny_model, store_refresh=0.2) as a,
        replica(tmp_path / "store", tiny_model_dir, tiny_model, store_refresh=0.2) as b,
    ):
        assert upload(a, "tool", sources["lora"]).status_code == 201
        assert complete(b, "tool").status_code == 200  # B now holds version 1 in its index
        assert upload(a, "tool", sources["prefix"]).status_code == 201
        wait_until(lambda: b.http.get("/v1/adapters/tool").json()["version"] == 2, timeout=30)
        reply = complete(b, "tool")
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == complete(a, "tool@2").json()["choices"][0]["text"]
        assert a.http.delete("/v1/adapters/tool").status_code == 200
        wait_until(lambda: complete(b, "tool").status_code == 404, timeout=30)
        assert b.http.get("/v1/adapters/tool").status_code == 404


def test_a_replica_starting_leaves_another_replicas_upload_in_progress(tmp_path, tiny_model_dir, tiny_model):
    root = tmp_path / "store"
    with replica(root, tiny_model_dir, tiny_model) as a, a.app.state.store.staging() as receiving:
        (receiving / "adapter_config.json").write_text("{}")
        with replica(root, tiny_model_dir, tiny_model):
            assert receiving.is_dir(), "a replica's start removed a live upload's staging folder"
    dead = root / ".staging" / "other-host-1234-abc"
    dead.mkdir(parents=True)
    with replica(root, tiny_model_dir, tiny_model):
        assert dead.is_dir(), "another host's staging folder goes only once it is stale"


def test_load_and_unload_lora_adapter_like_vllm(tmp_path, tiny_model_dir, tiny_model, sources):
    with (
        replica(tmp_path / "store", tiny_model_dir, tiny_model) as a,
        replica(tmp_path / "store", tiny_model_dir, tiny_model) as b,
    ):
        for name, folder in sources.items():  # any kind we serve, not only LoRA
            reply = a.http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(folder)})
            assert reply.status_code == 200, reply.text
            assert reply.text == f"Success: LoRA adapter '{name}' added successfully."
            assert complete(b, name).status_code == 200
        models = {m["id"] for m in b.http.get("/v1/models").json()["data"]}
        assert set(sources) <= models
        same = {"lora_name": "lora", "lora_path": str(sources["lora"])}
        again = a.http.post("/v1/load_lora_adapter", json=same)
        assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
        inplace = {"lora_name": "lora", "lora_path": str(sources["prefix"]), "load_inplace": True}
        assert a.http.post("/v1/load_lora_adapter", json=inplace).status_code == 200
        assert a.http.get("/v1/adapters/lora").json()["version"] == 2
        reply = b.http.post("/v1/unload_lora_adapter", json={"lora_name": "lora"})
        assert reply.status_code == 200 and reply.text == "Success: LoRA adapter 'lora' removed successfully."
        assert complete(b, "lora").status_code == 404
        missing = a.http.post("/v1/unload_lora_adapter", json={"lora_name": "lora"})
        assert missing.status_code == 404
        assert missing.json()["error"]["message"] == "The lora adapter 'lora' cannot be found."
        assert {p.parent.name for p in (tmp_path / "store" / "lora").glob(f"*/{DELETED_MARK}")} == {"1", "2"}


def test_a_failed_load_leaves_nothing_behind(tmp_path, tiny_model_dir, tiny_model, sources):
    root = tmp_path / "store"
    bad = tmp_path / "bad"
    shutil.copytree(sources["lora"], bad)
    (bad / "adapter_config.json").write_text('{"peft_type": "LOHA"}')
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(sources["lora"] / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"never read")
    with replica(root, tiny_model_dir, tiny_model, max_adapter_bytes=4096) as small:
        small_load = {"lora_name": "big", "lora_path": str(sources["lora"])}
        assert small.http.post("/v1/load_lora_adapter", json=small_load).status_code == 413
    with replica(root, tiny_model_dir, tiny_model) as server:
        cases = {
            "bad": (str(bad), 400),
            "pickled": (str(pickled), 400),
            "nowhere": (str(tmp_path / "missing"), 404),
            "Bad Name": (str(sources["lora"]), 400),
        }
        for name, (path, status) in cases.items():
            reply = server.http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
            assert reply.status_code == status, (name, reply.text)
            assert reply.json()["error"]["message"]
        assert server.http.post("/v1/load_lora_adapter", json={"lora_name": "x"}).status_code == 400
        assert server.http.get("/v1/adapters").json()["data"] == []
        unkeyed = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/"})
        assert unkeyed.status_code == 401
    assert [p.name for p in root.rglob("*")] == [".staging"], "only the (empty) staging area"


def test_adapter_dir_serves_a_name_on_its_first_request(tmp_path, tiny_model_dir, tiny_model, sources):
    adapter_dir = tmp_path / "resolver"
    settings = {"adapter_dir": adapter_dir, "store_refresh": 0}
    with replica(tmp_path / "store", tiny_model_dir, tiny_model, **settings) as s:
        assert complete(s, "late").status_code == 404
        shutil.copytree(sources["bottleneck"], adapter_dir / "late")
        first = complete(s, "late")
        assert first.status_code == 200, first.text
        assert s.http.get("/v1/adapters/late").json()["peft_type"] == "BOTTLENECK"
        # A name served from --adapter-dir takes no uploads: its folder there is the adapter.
        assert upload(s, "late", sources["lora"]).status_code == 400


def test_residency_metrics_tell_warm_from_cold(tmp_path, tiny_model_dir, tiny_model, sources):
    root = tmp_path / "store"
    for name in ("one", "two"):
        shutil.copytree(sources["lora"], root / name)
    with replica(root, tiny_model_dir, tiny_model, max_active_adapters=1) as s:
        for model in ("one", "two"):
            assert complete(s, model).status_code == 200

        def series() -> dict:
            text = s.http.get("/metrics").text
            return {
                (sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
            }

        def resident(name: str, tier: str) -> tuple:
            return ("peftserve_adapter_resident", (("adapter", name), ("tier", tier), ("version", "1")))

        wait_until(lambda: resident("two", "device") in series())
        got = series()
        assert got[resident("one", "cpu")] == 1 and resident("one", "device") not in got
        loaded = {labels: v for (name, labels), v in got.items() if name == "vllm:lora_adapter_loaded"}
        assert loaded == {
            (("adapter_name", "one"), ("level", "cpu"), ("pinned", "false")): 1,
            (("adapter_name", "two"), ("level", "gpu"), ("pinned", "false")): 1,
        }
        assert got[("vllm:num_gpu_loaded_lora_adapters", ())] == 1
        assert got[("vllm:num_cpu_loaded_lora_adapters", ())] == 1
        (info,) = [labels for (name, labels) in got if name == "vllm:lora_requests_info"]
        assert dict(info) == {"max_lora": "1", "running_lora_adapters": "two", "waiting_lora_adapters": ""}
