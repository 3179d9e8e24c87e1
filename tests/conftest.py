"""Shared fixtures: the embedded default model, a tiny random model, and live servers."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import uvicorn
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from server.api.app import create_app
from server.base_model import LoadedModel, default_gguf_path, load_base_model, materialize_gguf
from server.config import ModelSettings, Settings


@pytest.fixture(scope="session")
def test_device() -> str:
    """Where device-aware tests run: PEFTSERVE_TEST_DEVICE (cuda in `make device-check`), default cpu."""
    device = os.environ.get("PEFTSERVE_TEST_DEVICE", "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"PEFTSERVE_TEST_DEVICE={device}, but torch {torch.__version__} sees no CUDA device"
        )
    return device


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The dequantized embedded default model (built once, then cached under PEFTSERVE_CACHE)."""
    return materialize_gguf(default_gguf_path(), ModelSettings().cache)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    """A 2-layer random Llama with the default model's tokenizer and chat template."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_settings(tiny_model_dir: Path, **overrides) -> Settings:
    return Settings.load({"model": str(tiny_model_dir), "dtype": "float32", **overrides})


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path, test_device: str) -> LoadedModel:
    return load_base_model(tiny_settings(tiny_model_dir, device=test_device).model)


@pytest.fixture(scope="session")
def kinds_store(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_model: LoadedModel
) -> Path:
    """A store folder with eight adapters for the tiny model, one of each kind, named after it."""
    from tests.adapter_factory import PEFT_KINDS, make_bottleneck_adapter, make_peft_adapter

    root = tmp_path_factory.mktemp("kinds")
    for seed, kind in enumerate(PEFT_KINDS):
        make_peft_adapter(tiny_model_dir, kind, root / kind, seed=seed)
    make_bottleneck_adapter(tiny_model.shape, root / "bottleneck", seed=9)
    return root


@pytest.fixture(scope="session")
def default_store(
    tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path, default_model: LoadedModel
) -> Path:
    """A store folder with one adapter of every kind for the default model, named after its kind."""
    from tests.adapter_factory import build_store

    return build_store(tmp_path_factory.mktemp("default-kinds"), default_model_dir, default_model.shape)


MANY_ADAPTERS = 200


@pytest.fixture(scope="session")
def many_lora_store(tmp_path_factory: pytest.TempPathFactory, tiny_model: LoadedModel) -> Path:
    """200 small random LoRA adapters for the tiny model (ranks 2-8, varied targets), named l000..l199."""
    from tests.helpers import LINEARS, write_random_lora

    root = tmp_path_factory.mktemp("many")
    names = list(LINEARS)
    for i in range(MANY_ADAPTERS):
        targets = [n for j, n in enumerate(names) if (i >> j) & 1] or ["q_proj", "v_proj"]
        write_random_lora(tiny_model.hf, root / f"l{i:03d}", seed=1000 + i, rank=2 + i % 7, targets=targets)
    return root


@pytest.fixture(scope="session")
def default_model(default_model_dir: Path) -> LoadedModel:
    """The embedded default model in float32, so outputs can be compared exactly with `generate`."""
    return load_base_model(Settings.load({"dtype": "float32"}).model)


class LiveServer:
    """A real uvicorn server on a free loopback port, in a thread."""

    def __init__(self, settings: Settings, model: LoadedModel) -> None:
        self.app = create_app(settings, model)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def engine(self):
        return self.app.state.engine

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        with contextlib.suppress(OSError):
            self.sock.close()


@pytest.fixture
def live_server(tiny_model_dir: Path, tiny_model: LoadedModel) -> Iterator[LiveServer]:
    """A server over the tiny model with default settings."""
    with LiveServer(tiny_settings(tiny_model_dir), tiny_model) as server:
        yield server
