"""Merge for zero latency: the merged model, loaded by plain transformers, matches the served adapter."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from server.adapters.common import AdapterRef
from server.adapters.loader import folder_loader
from server.api.app import dedicate
from server.base_model import dense_weight, linear_module, load_base_model
from server.cli import main
from server.config import AdapterSettings, EngineSettings, Settings
from server.engine.engine import Engine
from server.engine.sampler import SamplingParams
from server.registry.merge import MergeError, MergeJobs, export_merged, fold_into
from server.registry.store import Store
from tests.adapter_factory import (
    COPY_BYTES,
    make_biased_tied_model,
    make_bitfit_adapter,
    make_bottleneck_adapter,
    make_peft_adapter,
)
from tests.conftest import LiveServer, tiny_settings
from tests.helpers import reference_greedy, run_until_done, token_ids, wait_until

MERGEABLE = ["lora", "rslora", "dora", "ia3", "adalora", "vera", "oft"]
TOKENS = 10


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("merge-store")
    for seed, kind in enumerate([*MERGEABLE, "prompt", "prefix"]):
        make_peft_adapter(tiny_model_dir, kind, root / kind, seed=seed)
    return root


def served_tokens(model, store: Path, name: str, prompt: list[int]) -> list[int]:
    engine = Engine(model, EngineSettings(), AdapterSettings(max_module_copy_bytes=COPY_BYTES), Store(store))
    handle = engine.submit(
        prompt, SamplingParams(max_tokens=TOKENS, temperature=0.0), engine.resolve_model(name)
    )
    return token_ids(run_until_done(engine, [handle])[0])


def merged_tokens(folder: Path, prompt: list[int]) -> list[int]:
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return reference_greedy(merged, prompt, TOKENS)


@pytest.mark.parametrize("kind", MERGEABLE)
def test_merged_model_equals_the_served_adapter(kind, tiny_model, adapters, tmp_path):
    weights = folder_loader(tiny_model, 64)(adapters / kind)
    out = export_merged(tiny_model, weights, tmp_path / "merged")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    prompt = tiny_model.tokenizer("The weather today").input_ids
    served = served_tokens(tiny_model, adapters, kind, prompt)
    assert served != reference_greedy(tiny_model.hf, prompt, TOKENS), "the adapter should change the output"
    assert merged_tokens(out, prompt) == served


EXTRA_MERGEABLE = [
    "lora_embed_head",
    "lora_bias",
    "lora_tokens",
    "trainable_tokens",
    "ln_tuning",
    "modules_to_save",
    "bitfit",
]
"""Kinds folded outside the decoder linears: embed_tokens, lm_head, norms, added biases."""
BIASED_TIED_MERGEABLE = [
    "lora_bias_all",
    "lora_bias_lora_only",
    "lora_embed_head",
    "trainable_tokens",
    "bitfit",
]
"""On a base with biases and tied embeddings: replaced biases, and a merge that must untie lm_head."""


def make_kind(base_dir: Path, shape, kind: str, out: Path, seed: int) -> Path:
    if kind == "bitfit":
        return make_bitfit_adapter(shape, out, seed=seed)
    return make_peft_adapter(base_dir, kind, out, seed=seed)


@pytest.fixture(scope="module")
def biased_tied_model(tmp_path_factory, tiny_model_dir):
    base_dir = make_biased_tied_model(tmp_path_factory.mktemp("biased-tied"), tiny_model_dir)
    return load_base_model(tiny_settings(base_dir).model), base_dir


@pytest.mark.parametrize(
    "base, kind",
    [("tiny", k) for k in EXTRA_MERGEABLE] + [("biased-tied", k) for k in BIASED_TIED_MERGEABLE],
)
def test_merged_extras_equal_the_served_adapter(
    base, kind, tiny_model, tiny_model_dir, biased_tied_model, tmp_path
):
    model, base_dir = (tiny_model, tiny_model_dir) if base == "tiny" else biased_tied_model
    make_kind(base_dir, model.shape, kind, tmp_path / "store" / kind, seed=7)
    weights = folder_loader(model, 64, max_copy_bytes=COPY_BYTES)(tmp_path / "store" / kind)
    out = export_merged(model, weights, tmp_path / "merged")
    prompt = model.tokenizer("Hello there, the cat sat on").input_ids
    served = served_tokens(model, tmp_path / "store", kind, prompt)
    assert served != reference_greedy(model.hf, prompt, TOKENS), "the adapter should change the output"
    assert merged_tokens(out, prompt) == served


@pytest.mark.parametrize(
    "base, kind",
    [
        ("tiny", "bitfit"),
        ("tiny", "modules_to_save"),
        ("biased-tied", "lora_embed_head"),
        ("biased-tied", "ln_tuning"),
    ],
)
def test_extras_folded_in_place_equal_the_served_adapter(
    base, kind, tiny_model, tiny_model_dir, biased_tied_model, tmp_path
):
    """`serve --merge-adapter`: biases the base lacks become parameters, a tied lm_head is untied."""
    model, base_dir = (tiny_model, tiny_model_dir) if base == "tiny" else biased_tied_model
    folder = make_kind(base_dir, model.shape, kind, tmp_path / "store" / kind, seed=11)
    prompt = model.tokenizer("Hello there, the cat sat on").input_ids
    served = served_tokens(model, tmp_path / "store", kind, prompt)
    own = load_base_model(tiny_settings(base_dir).model)
    fold_into(own, folder_loader(own, 64, max_copy_bytes=COPY_BYTES)(folder))
    assert reference_greedy(own.hf, prompt, TOKENS) == served


@pytest.mark.parametrize("kind, reason", [("prompt", "virtual tokens"), ("prefix", "attention cache")])
def test_kinds_that_cannot_merge_say_why(kind, reason, tiny_model, adapters, tmp_path):
    with pytest.raises(MergeError, match=reason):
        export_merged(tiny_model, folder_loader(tiny_model, 64)(adapters / kind), tmp_path / "m")
    bottleneck = make_bottleneck_adapter(tiny_model.shape, tmp_path / "b")
    with pytest.raises(MergeError, match="non-linear"):
        export_merged(tiny_model, folder_loader(tiny_model, 64)(bottleneck), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def _wait_for_job(http: httpx.Client, job: dict) -> dict:
    wait_until(lambda: http.get(job["status_url"]).json()["status"] in ("succeeded", "failed"), timeout=300)
    return http.get(job["status_url"]).json()


def test_merge_over_http_is_a_background_job(tmp_path, tiny_model_dir, tiny_model, adapters):
    settings = tiny_settings(tiny_model_dir, store=tmp_path / "store", admin_key="k")
    auth = {"Authorization": "Bearer k"}
    with LiveServer(settings, tiny_model) as live:
        http = httpx.Client(base_url=live.url, headers=auth, timeout=120)
        files = [("file", (p.name, p.read_bytes())) for p in sorted((adapters / "dora").glob("adapter*"))]
        assert http.post("/v1/adapters", data={"name": "d"}, files=files).status_code == 201
        assert http.get("/v1/adapters/d/merged").status_code == 404
        assert httpx.post(f"{live.url}/v1/adapters/d/merge").status_code == 401
        started = http.post("/v1/adapters/d/merge")
        assert started.status_code == 202, started.text
        job = started.json()
        assert job["status"] in ("queued", "running") and job["version"] == 1
        assert job["download"] == "/v1/adapters/d@1/merged" and job["status_url"] == f"/v1/merges/{job['id']}"
        assert httpx.get(f"{live.url}{job['status_url']}").status_code == 401
        done = _wait_for_job(http, job)
        assert done["status"] == "succeeded", done
        archive = http.get(done["download"])
        assert archive.headers["content-type"] == "application/gzip"
        assert hashlib.sha256(archive.content).hexdigest() == done["sha256"]
        assert len(archive.content) == done["size_bytes"]
        with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
            tar.extractall(tmp_path / "download", filter="data")
        files = [("file", (p.name, p.read_bytes())) for p in sorted((adapters / "prompt").glob("adapter*"))]
        http.post("/v1/adapters", data={"name": "p"}, files=files)
        refused = http.post("/v1/adapters/p/merge")
        assert refused.status_code == 400 and "virtual tokens" in refused.json()["error"]["message"]
        assert http.post("/v1/adapters/none/merge").status_code == 404
        assert http.get("/v1/merges/merge-nothing").status_code == 404
    (folder,) = (tmp_path / "download").iterdir()
    prompt = tiny_model.tokenizer("Hello").input_ids
    assert merged_tokens(folder, prompt) == served_tokens(tiny_model, adapters, "dora", prompt)


def test_merge_jobs_run_on_a_thread_that_exits_when_none_is_left(tmp_path):
    """A thread that ran torch work keeps an OpenMP pool while it lives, which slows the engine's
    every op (server/torch_threads.py): the merge thread must not outlive its jobs."""
    archive = tmp_path / "merged.tar.gz"
    archive.write_bytes(b"merged")
    jobs = MergeJobs(lambda ref: archive)
    job = jobs.submit(AdapterRef("a", 1, tmp_path, "LORA"))
    wait_until(lambda: jobs.get(job.id).status == "succeeded", timeout=60)
    wait_until(lambda: not any(t.name == "peftserve-merge" for t in threading.enumerate()), timeout=60)
    jobs.stop()


def test_a_failed_merge_job_says_why(tmp_path, tiny_model_dir, tiny_model, adapters):
    settings = tiny_settings(tiny_model_dir, store=tmp_path / "store")
    with LiveServer(settings, tiny_model) as live:
        http = httpx.Client(base_url=live.url, timeout=120)
        files = [("file", (p.name, p.read_bytes())) for p in sorted((adapters / "lora").glob("adapter*"))]
        assert http.post("/v1/adapters", data={"name": "l"}, files=files).status_code == 201
        (tmp_path / "store" / "l" / "1" / "adapter_model.safetensors").write_bytes(b"changed")
        done = _wait_for_job(http, http.post("/v1/adapters/l/merge").json())
        assert done["status"] == "failed" and "safetensors" in done["error"]
        assert str(tmp_path) not in done["error"]
        assert http.get(done["download"]).status_code == 404


def test_merge_command(tmp_path, tiny_model_dir, tiny_model, adapters, capsys):
    out = tmp_path / "merged"
    args = ["merge", "--model", str(tiny_model_dir), "--dtype", "float32", "--adapter", str(adapters / "ia3")]
    assert main([*args, "--out", str(out)]) == 0
    prompt = tiny_model.tokenizer("Hello").input_ids
    assert merged_tokens(out, prompt) == served_tokens(tiny_model, adapters, "ia3", prompt)
    assert main([*args, "--out", str(out)]) == 2  # never overwrites
    assert "not empty" in capsys.readouterr().err
    assert main([*args[:-1], str(adapters / "prefix"), "--out", str(tmp_path / "x")]) == 1


def test_four_bit_base_merges_dequantized_into_16_bit(tmp_path, tiny_model_dir, adapters):
    quantized = load_base_model(Settings.load({"model": str(tiny_model_dir), "quantize": "nf4"}).model)
    weights = folder_loader(quantized, 64)(adapters / "lora")
    out = export_merged(quantized, weights, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16 and getattr(merged.config, "quantization_config", None) is None
    site = weights.sites[(0, "q_proj")]
    expected = dense_weight(linear_module(quantized.hf, 0, "q_proj")) + site.b.float().t() @ site.a.float()
    torch.testing.assert_close(
        linear_module(merged, 0, "q_proj").weight.float(), expected, atol=2e-2, rtol=1e-2
    )
    with pytest.raises(MergeError, match="unquantized base"):
        dedicate(quantized, Store(adapters), "lora", 64)


def test_serve_with_one_adapter_merged(tmp_path, tiny_model_dir, tiny_model, adapters):
    prompt = tiny_model.tokenizer("Once").input_ids
    expected = served_tokens(tiny_model, adapters, "lora", prompt)
    own = load_base_model(tiny_settings(tiny_model_dir).model)  # this copy gets its weights changed
    settings = tiny_settings(tiny_model_dir, store=adapters, merge_adapter="lora")
    with LiveServer(settings, own) as live:
        assert [m["id"] for m in httpx.get(f"{live.url}/v1/models").json()["data"]] == ["lora"]
        body = {"model": "lora", "prompt": prompt, "max_tokens": TOKENS, "temperature": 0}
        reply = httpx.post(f"{live.url}/v1/completions", json=body).json()
        assert reply["choices"][0]["text"] == tiny_model.tokenizer.decode(expected, skip_special_tokens=True)
        for other in (tiny_model.name, "ia3"):
            assert httpx.post(f"{live.url}/v1/completions", json={**body, "model": other}).status_code == 404
        assert live.engine.snapshot.slots_used == 0  # nothing loaded: the adapter is in the base weights


@pytest.mark.slow
def test_default_model_merge_equals_served(default_model, default_model_dir, tmp_path):
    make_peft_adapter(default_model_dir, "dora", tmp_path / "store" / "d", seed=5)
    out = export_merged(
        default_model, folder_loader(default_model, 64)(tmp_path / "store" / "d"), tmp_path / "m"
    )
    prompt = default_model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    assert merged_tokens(out, prompt) == served_tokens(default_model, tmp_path / "store", "d", prompt)
