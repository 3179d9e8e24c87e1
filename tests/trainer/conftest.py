"""Shared fixtures: a tiny random Llama model with the default model's tokenizer, and small data files."""

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from trainer.base import default_gguf


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama (hidden 64, GQA) saved with the default model's tokenizer and chat template."""
    gguf = default_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-base")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def chat_rows(n: int) -> list[dict]:
    """n small conversations with a fixed answer pattern that a tiny model learns in a few steps."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"Count to {i % 5 + 2}."},
                {"role": "assistant", "content": " ".join(str(k) for k in range(1, i % 5 + 3)) + " DONE"},
            ]
        }
        for i in range(n)
    ]


@pytest.fixture
def chat_data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", chat_rows(24))


def registry_app(received: list[dict]) -> FastAPI:
    """A stand-in for the registry API: records each upload; the name "taken" gets a 409."""
    app = FastAPI()

    @app.post("/v1/adapters")
    async def upload(request: Request) -> JSONResponse:
        form = await request.form()
        files = {
            key: (value.filename, await value.read()) for key, value in form.multi_items() if key != "name"
        }
        received.append(
            {"name": form.get("name"), "auth": request.headers.get("authorization"), "files": files}
        )
        if form.get("name") == "taken":
            error = {
                "message": "adapter 'taken' already has this content as version 1",
                "type": "invalid_request_error",
                "param": "name",
                "code": "adapter_exists",
            }
            return JSONResponse({"error": error}, status_code=409)
        body = {
            "name": form.get("name"),
            "version": 1,
            "peft_type": "LORA",
            "rank": 8,
            "target_modules": ["q_proj"],
            "size_bytes": len(files["adapter_model.safetensors"][1]),
            "sha256": "0" * 64,
            "created": "2026-01-01T00:00:00Z",
        }
        return JSONResponse(body, status_code=201)

    return app


@pytest.fixture(scope="session")
def registry():
    """The stand-in registry served on a free local port; `received` lists the uploads."""
    received: list[dict] = []
    server = uvicorn.Server(
        uvicorn.Config(registry_app(received), host="127.0.0.1", port=0, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", received=received)
    server.should_exit = True
    thread.join(timeout=10)
