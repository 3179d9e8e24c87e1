"""Random adapters in PEFT's saved format, written directly (no PEFT model needed), for benchmarks
and load tests. Weights are small random values: they change the output but keep it sane."""

from __future__ import annotations

import functools
import json
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from peftserve_formats import bitfit
from server.base_model import ModelShape

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _peft_name(layer: int, module: str) -> str:
    block = "mlp" if module in MLP else "self_attn"
    return f"base_model.model.model.layers.{layer}.{block}.{module}"


def _write(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"task_type": "CAUSAL_LM", **config}, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    return folder


def write_lora(
    folder: Path,
    shape: ModelShape,
    rank: int = 16,
    seed: int = 0,
    dora: bool = False,
    lora_bias: bool = False,
    targets: tuple[str, ...] = ALL_LINEAR,
) -> Path:
    """LoRA (or DoRA) of `rank` on `targets` of every layer; `lora_bias` also trains lora_B's bias."""
    tensors = _lora_tensors(shape, rank, torch.Generator().manual_seed(seed), targets, dora, lora_bias)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets)}
    if dora:
        config["use_dora"] = True
    if lora_bias:
        config["lora_bias"] = True
    return _write(folder, config, tensors)


def _lora_tensors(
    shape: ModelShape, rank: int, gen: torch.Generator, targets: tuple[str, ...], dora: bool, lora_bias: bool
) -> dict[str, torch.Tensor]:
    dims = shape.linear_dims()
    tensors = {}
    for layer in range(shape.num_layers):
        for module in targets:
            fan_in, fan_out = dims[module]
            name = _peft_name(layer, module)
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
            tensors[f"{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.01
            if dora:
                tensors[f"{name}.lora_magnitude_vector"] = 1 + 0.05 * torch.randn(fan_out, generator=gen)
            if lora_bias:
                tensors[f"{name}.lora_B.bias"] = 0.01 * torch.randn(fan_out, generator=gen)
    return tensors


def write_lora_embed_head(folder: Path, shape: ModelShape, rank: int = 16, seed: int = 0) -> Path:
    """LoRA of `rank` on embed_tokens, lm_head and every q_proj, without the copies of the base's
    embedding and lm_head that PEFT also saves by default (`save_embedding_layers`): unchanged,
    the server skips them, and each is a whole vocab x hidden matrix."""
    gen = torch.Generator().manual_seed(seed)
    vocab, hidden = shape.vocab_size, shape.hidden_size
    tensors = _lora_tensors(shape, rank, gen, ("q_proj",), dora=False, lora_bias=False)
    embed, head = "base_model.model.model.embed_tokens", "base_model.model.lm_head"
    tensors[f"{embed}.lora_embedding_A"] = torch.randn(rank, vocab, generator=gen)  # (r, vocab)
    tensors[f"{embed}.lora_embedding_B"] = torch.randn(hidden, rank, generator=gen) * 0.01 / rank**0.5
    tensors[f"{head}.lora_A.weight"] = torch.randn(rank, hidden, generator=gen) / hidden**0.5
    tensors[f"{head}.lora_B.weight"] = torch.randn(vocab, rank, generator=gen) * 0.01
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "embed_tokens", "lm_head"],
    }
    return _write(folder, config, tensors)


def write_trainable_tokens(folder: Path, shape: ModelShape, tokens: int = 16, seed: int = 0) -> Path:
    """PEFT's TRAINABLE_TOKENS: new embeddings for `tokens` random ids (above the first 1000, where
    the special tokens live). Only the embedding's rows are saved; on a base whose lm_head is tied
    to the embedding PEFT also saves the same rows under lm_head, which the server does not need."""
    gen = torch.Generator().manual_seed(seed)
    ids = sorted((1000 + torch.randperm(shape.vocab_size - 1000, generator=gen)[:tokens]).tolist())
    rows = torch.randn(tokens, shape.hidden_size, generator=gen) * 0.05
    config = {"peft_type": "TRAINABLE_TOKENS", "token_indices": ids, "target_modules": "model.embed_tokens"}
    return _write(folder, config, {"base_model.model.model.embed_tokens.trainable_tokens_delta": rows})


def write_ln_tuning(folder: Path, shape: ModelShape, seed: int = 0) -> Path:
    """PEFT's LN_TUNING on both norms of every layer and the final norm. Its weights replace the
    base's: values near 1 (not the base's plus noise, which would need the base)."""
    gen = torch.Generator().manual_seed(seed)
    names = [
        f"base_model.model.model.layers.{layer}.{norm}"
        for layer in range(shape.num_layers)
        for norm in ("input_layernorm", "post_attention_layernorm")
    ] + ["base_model.model.model.norm"]
    tensors = {
        f"{name}.ln_tuning_layers.weight": 1 + 0.05 * torch.randn(shape.hidden_size, generator=gen)
        for name in names
    }
    config = {
        "peft_type": "LN_TUNING",
        "target_modules": ["input_layernorm", "post_attention_layernorm", "norm"],
    }
    return _write(folder, config, tensors)


def write_bitfit(
    folder: Path, shape: ModelShape, seed: int = 0, targets: tuple[str, ...] = ALL_LINEAR
) -> Path:
    """BitFit in our format (peftserve_formats/bitfit.py): a bias on `targets` of every layer."""
    gen = torch.Generator().manual_seed(seed)
    dims = shape.linear_dims()
    tensors = {
        bitfit.tensor_name(layer, module): 0.01 * torch.randn(dims[module][1], generator=gen)
        for layer in range(shape.num_layers)
        for module in targets
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(bitfit.to_config(targets), indent=2))
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def write_ia3(folder: Path, shape: ModelShape, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    dims = shape.linear_dims()
    tensors = {}
    for layer in range(shape.num_layers):
        for module in ("k_proj", "v_proj"):
            tensors[f"{_peft_name(layer, module)}.ia3_l"] = 1 + 0.1 * torch.randn(
                dims[module][1], 1, generator=gen
            )
        tensors[f"{_peft_name(layer, 'down_proj')}.ia3_l"] = 1 + 0.1 * torch.randn(
            1, dims["down_proj"][0], generator=gen
        )
    config = {
        "peft_type": "IA3",
        "target_modules": ["k_proj", "v_proj", "down_proj"],
        "feedforward_modules": ["down_proj"],
    }
    return _write(folder, config, tensors)


def write_prompt(
    folder: Path, shape: ModelShape, tokens: int = 16, seed: int = 0, prefix: bool = False
) -> Path:
    """Prompt tuning, or prefix tuning with `prefix=True`."""
    gen = torch.Generator().manual_seed(seed)
    if prefix:
        width = shape.num_layers * 2 * shape.kv_dim
        config = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": tokens, "token_dim": shape.kv_dim}
    else:
        width = shape.hidden_size
        config = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": tokens, "token_dim": width}
    return _write(folder, config, {"prompt_embeddings": torch.randn(tokens, width, generator=gen) * 0.05})


def write_bottleneck(folder: Path, shape: ModelShape, size: int = 64, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    hidden = shape.hidden_size
    tensors = {}
    for layer in range(shape.num_layers):
        for block in ("attn", "mlp"):
            tensors[f"layers.{layer}.{block}.down.weight"] = (
                torch.randn(size, hidden, generator=gen) / hidden**0.5
            )
            tensors[f"layers.{layer}.{block}.down.bias"] = torch.zeros(size)
            tensors[f"layers.{layer}.{block}.up.weight"] = torch.randn(hidden, size, generator=gen) * 0.01
            tensors[f"layers.{layer}.{block}.up.bias"] = torch.zeros(hidden)
    config = {
        "peft_type": "BOTTLENECK",
        "bottleneck_size": size,
        "placement": "houlsby",
        "non_linearity": "relu",
    }
    return _write(folder, config, tensors)


def write_adalora(folder: Path, shape: ModelShape, rank: int = 16, seed: int = 0) -> Path:
    """AdaLoRA of initial rank `rank` on every linear layer, a quarter of its singular values pruned."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shape.num_layers):
        for module, (fan_in, fan_out) in shape.linear_dims().items():
            name = _peft_name(layer, module)
            tensors[f"{name}.lora_A"] = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
            tensors[f"{name}.lora_B"] = torch.randn(fan_out, rank, generator=gen) * 0.01
            kept = torch.arange(rank) % 4 != 3
            tensors[f"{name}.lora_E"] = (torch.rand(rank, generator=gen) * kept).unsqueeze(1)
    config = {
        "peft_type": "ADALORA",
        "init_r": rank,
        "target_r": rank // 2,
        "lora_alpha": 2 * rank,
        "total_step": 1000,
        "target_modules": list(ALL_LINEAR),
    }
    return _write(folder, config, tensors)


def write_vera(folder: Path, shape: ModelShape, rank: int = 64, seed: int = 0) -> Path:
    """VeRA of `rank` on every linear layer, its shared projections saved (PEFT's default)."""
    gen = torch.Generator().manual_seed(seed)
    dims = shape.linear_dims()
    max_in, max_out = max(i for i, _ in dims.values()), max(o for _, o in dims.values())
    tensors = {
        "base_model.vera_A": (torch.rand(rank, max_in, generator=gen) * 2 - 1) * (6 / max_in) ** 0.5,
        "base_model.vera_B": (torch.rand(max_out, rank, generator=gen) * 2 - 1) * (6 / rank) ** 0.5,
    }
    for layer in range(shape.num_layers):
        for module, (_, fan_out) in dims.items():
            name = _peft_name(layer, module)
            tensors[f"{name}.vera_lambda_b"] = 0.01 * torch.randn(fan_out, generator=gen)
            tensors[f"{name}.vera_lambda_d"] = 0.1 + 0.02 * torch.randn(rank, generator=gen)
    config = {
        "peft_type": "VERA",
        "r": rank,
        "projection_prng_key": seed,
        "save_projection": True,
        "target_modules": list(ALL_LINEAR),
    }
    return _write(folder, config, tensors)


def write_oft(folder: Path, shape: ModelShape, block: int = 32, seed: int = 0) -> Path:
    """OFT with blocks of `block` on every linear layer (PEFT 0.21's Cayley-Neumann parametrization)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shape.num_layers):
        for module, (fan_in, _) in shape.linear_dims().items():
            count = fan_in // block
            tensors[f"{_peft_name(layer, module)}.oft_R.weight"] = 0.01 * torch.randn(
                count, block * (block - 1) // 2, generator=gen
            )
    config = {
        "peft_type": "OFT",
        "r": 0,
        "oft_block_size": block,
        "use_cayley_neumann": True,
        "num_cayley_neumann_terms": 5,
        "peft_version": "0.21.2",
        "target_modules": list(ALL_LINEAR),
    }
    return _write(folder, config, tensors)


def zipf_choices(count: int, population: int, s: float, seed: int) -> list[int]:
    """`count` ranks in 0..population-1 with P(rank k) proportional to 1/(k+1)^s (s = 0 is uniform)."""
    weights = torch.tensor([1.0 / (k + 1) ** s for k in range(population)])
    return torch.multinomial(
        weights, count, replacement=True, generator=torch.Generator().manual_seed(seed)
    ).tolist()


def write_lora_store(
    root: Path,
    shape: ModelShape,
    count: int,
    ranks: tuple[int, int] = (8, 16),
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    distinct: int = 64,
    seed: int = 0,
) -> list[str]:
    """`count` LoRA folders `t00000`, `t00001`, ... in PEFT's format, fast enough for 10,000.

    Ranks are drawn uniformly from `ranks` (inclusive), on `targets` of every layer (PEFT's
    default for Llama), stored in bfloat16 (the server converts on load). `distinct` weight
    files are written directly, their tensors cut at random offsets from two pools of random
    values drawn once; the other folders hard-link one of them (as S-LoRA's benchmark reuses
    weights under many names), since this disk writes ~100 MB/s and 10,000 distinct files
    would take 14 GB. Every folder is its own adapter to the server: its own name, config and
    load. Returns the names.
    """
    gen = torch.Generator().manual_seed(seed)
    files = []
    for index in range(min(count, distinct)):
        rank = int(torch.randint(ranks[0], ranks[1] + 1, (1,), generator=gen))
        folder = _write_lora_fast(root / f"t{index:05d}", shape, rank, targets, gen)
        files.append((rank, folder / "adapter_model.safetensors"))
    names = [f"t{index:05d}" for index in range(count)]
    for index, name in enumerate(names[len(files) :], start=len(files)):
        rank, weights = files[index % len(files)]
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text(json.dumps(_lora_config(rank, targets)))
        try:
            os.link(weights, folder / "adapter_model.safetensors")
        except OSError:  # no hard links here
            shutil.copyfile(weights, folder / "adapter_model.safetensors")
    return names


def _lora_config(rank: int, targets: tuple[str, ...]) -> dict:
    return {
        "task_type": "CAUSAL_LM",
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(targets),
    }


_POOL = 1 << 22


@functools.cache
def _pools(fan_in: int) -> dict[str, memoryview]:
    """Random bfloat16 values as bytes: lora_A ~ N(0, 1/fan_in), lora_B ~ N(0, 0.01^2)."""
    gen = torch.Generator().manual_seed(fan_in)
    pools = {
        "lora_A": torch.randn(_POOL, generator=gen) / fan_in**0.5,
        "lora_B": torch.randn(_POOL, generator=gen) * 0.01,
    }
    return {k: memoryview(v.to(torch.bfloat16).view(torch.uint8).numpy()) for k, v in pools.items()}


def _write_lora_fast(
    folder: Path, shape: ModelShape, rank: int, targets: tuple[str, ...], gen: torch.Generator
) -> Path:
    """A safetensors file written by hand: header, then slices of the random pools."""
    dims = shape.linear_dims()
    pools = _pools(max(dims[m][0] for m in targets))
    header, chunks, offset = {}, [], 0
    for layer in range(shape.num_layers):
        for module in targets:
            fan_in, fan_out = dims[module]
            for part, tensor_shape in (("lora_A", [rank, fan_in]), ("lora_B", [fan_out, rank])):
                nbytes = 2 * tensor_shape[0] * tensor_shape[1]
                start = 2 * int(torch.randint(0, _POOL - nbytes // 2, (1,), generator=gen))
                header[f"{_peft_name(layer, module)}.{part}.weight"] = {
                    "dtype": "BF16",
                    "shape": tensor_shape,
                    "data_offsets": [offset, offset + nbytes],
                }
                chunks.append(pools[part][start : start + nbytes])
                offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # as safetensors does: the data starts 8-aligned
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(_lora_config(rank, targets)))
    with open(folder / "adapter_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.writelines(chunks)
    return folder
