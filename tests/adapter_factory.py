"""Random, non-zero adapters of every kind for a base model folder, their references, and serving
them all in one mixed batch."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from peft import (
    AdaLoraConfig,
    IA3Config,
    LNTuningConfig,
    LoraConfig,
    OFTConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TrainableTokensConfig,
    VeraConfig,
    get_peft_model,
)
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from peftserve_formats import bitfit
from server.adapters.bottleneck import BottleneckReference, parse
from server.base_model import ModelShape, model_shape
from server.config import AdapterSettings, EngineSettings
from server.engine.engine import Engine
from server.engine.sampler import SamplingParams
from server.registry.store import Store
from tests.helpers import (
    compare_up_to_near_ties,
    reference_greedy,
    reference_steps,
    run_until_done,
    token_ids,
)

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PEFT_KINDS = {
    "lora": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR, init_lora_weights=False),
    "rslora": lambda: LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
    ),
    "dora": lambda: LoraConfig(
        r=4,
        lora_alpha=8,
        use_dora=True,
        target_modules=["q_proj", "o_proj", "up_proj"],
        init_lora_weights=False,
    ),
    "ia3": lambda: IA3Config(init_ia3_weights=False),
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=4),
    "ptuning": lambda: PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=32),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=5),
    # issue 15, methods-b: served as LoRA (AdaLoRA, VeRA) or as an input rotation (OFT)
    "adalora": lambda: AdaLoraConfig(
        init_r=6,
        target_r=4,
        total_step=10,
        lora_alpha=12,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        init_lora_weights=False,
    ),
    "vera": lambda: VeraConfig(
        r=16,
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        save_projection=False,  # the harder case: the server regenerates the projections from the key
        projection_prng_key=7,
        init_weights=False,
    ),
    "oft": lambda: OFTConfig(
        oft_block_size=16, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], init_weights=False
    ),
    # issue 15, methods-a: add its kinds here
}
ADALORA_PRUNED = {"model.layers.0.self_attn.q_proj.lora_E": [True, False, True, True, False, True]}
"""A rank_pattern as AdaLoRA's budget leaves it: PEFT drops the masked ranks when it saves."""


TOKEN_TEXT = "Hello there The cat sat on the 1 2 3 Once upon a time"
"""Trainable-token kinds train the ids of these words (the suites' prompts use them)."""

EXTRA_KINDS = {
    "lora_embed_head": lambda tokens: LoraConfig(
        r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"], init_lora_weights=False
    ),
    "lora_bias": lambda tokens: LoraConfig(
        r=4, lora_alpha=8, target_modules=["k_proj", "down_proj"], lora_bias=True, init_lora_weights=False
    ),
    "lora_tokens": lambda tokens: LoraConfig(
        r=4, lora_alpha=8, target_modules=["v_proj"], trainable_token_indices=tokens, init_lora_weights=False
    ),
    "trainable_tokens": lambda tokens: TrainableTokensConfig(token_indices=tokens, init_weights=False),
    "ln_tuning": lambda tokens: LNTuningConfig(),
    "modules_to_save": lambda tokens: LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["o_proj"],
        modules_to_save=["norm", "lm_head", "embed_tokens"],
        init_lora_weights=False,
    ),
}
"""The kinds of LoRA's extras, LN tuning and trainable tokens; modules_to_save needs
--max-module-copy-bytes of at least COPY_BYTES."""
BIAS_KINDS = {
    "lora_bias_all": lambda tokens: LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], bias="all", init_lora_weights=False
    ),
    "lora_bias_lora_only": lambda tokens: LoraConfig(
        r=4, lora_alpha=8, target_modules=["v_proj", "o_proj"], bias="lora_only", init_lora_weights=False
    ),
}
"""LoRA kinds that train the base's biases: for a base with biases (make_biased_tied_model)."""
COPY_BYTES = 256 * 1024**2
"""Above the default model's embedding matrix in float32 (49152 x 576 x 4 bytes)."""


def make_biased_tied_model(out: Path, tokenizer_dir: Path) -> Path:
    """The tiny model's shape with random biases on every linear and lm_head tied to the embeddings."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
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
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
    )
    torch.manual_seed(1)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape) * 0.02)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def load_base(base_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def _randomize(peft_model: PeftModel, kind: str, seed: int) -> None:
    """Make every trainable tensor random and large enough to change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=generator)
            if "magnitude" in name:
                param.mul_(1 + 0.3 * noise)  # DoRA: move m away from ||W + sBA|| so the rescale matters
            elif kind == "ia3" or "norm" in name:  # scales and norm weights: around one
                param.copy_(1 + 0.5 * noise)
            elif name.endswith("bias"):
                param.copy_(0.05 * noise)
            elif "trainable_tokens" in name:  # embedding rows: at the base embeddings' scale
                param.copy_(noise * 0.03)
            elif "lm_head" in name or "embedding" in name:  # small: a large delta on logits drowns the prompt
                param.copy_(noise * 0.1 * param.std().clamp(min=0.05))
            elif kind == "vera" and "lambda_b" in name:
                param.copy_(0.3 * noise)
            elif kind == "adalora" and "lora_E" in name:
                kept = torch.arange(param.shape[0]) % 3 != 2  # as the budget prunes: zeros in E
                param.copy_(noise * kept.unsqueeze(1))
            elif kind == "adalora":
                # At LoRA's scale: PEFT initializes AdaLoRA's A and B with std 1, which on the default
                # model made o_proj deltas of 3e4 at the first token, where float32 rounding alone
                # (1e-6 relative) flips later greedy tokens with margins above 1.
                param.copy_(noise * 0.1)
            else:
                param.copy_(noise * param.std().clamp(min=0.05))


def trained_tokens(base_dir: Path) -> list[int]:
    """The ids trainable-token kinds train: the distinct tokens of TOKEN_TEXT."""
    ids = AutoTokenizer.from_pretrained(base_dir)(TOKEN_TEXT).input_ids
    return sorted(set(ids))


def make_peft_adapter(base_dir: Path, kind: str, out: Path, seed: int = 0) -> Path:
    if kind in PEFT_KINDS:
        config = PEFT_KINDS[kind]()
    else:
        config = {**EXTRA_KINDS, **BIAS_KINDS}[kind](trained_tokens(base_dir))
    config.task_type = "CAUSAL_LM"
    torch.manual_seed(seed)
    model = get_peft_model(load_base(base_dir), config)
    _randomize(model, kind, seed)
    if kind == "adalora":
        model.peft_config["default"].rank_pattern = dict(ADALORA_PRUNED)
    model.save_pretrained(out)
    return out


def make_bottleneck_adapter(
    shape: ModelShape,
    out: Path,
    seed: int = 0,
    placement: str = "houlsby",
    activation: str = "gelu",
    adapter_input: str = "block_output",
    size: int = 8,
) -> Path:
    generator = torch.Generator().manual_seed(seed)
    hidden = shape.hidden_size
    blocks = ("attn", "mlp") if placement == "houlsby" else ("mlp",)
    tensors = {}
    for layer in range(shape.num_layers):
        for block in blocks:
            tensors[f"layers.{layer}.{block}.down.weight"] = (
                torch.randn(size, hidden, generator=generator) * 0.3
            )
            tensors[f"layers.{layer}.{block}.down.bias"] = torch.randn(size, generator=generator) * 0.1
            tensors[f"layers.{layer}.{block}.up.weight"] = (
                torch.randn(hidden, size, generator=generator) * 0.3
            )
            tensors[f"layers.{layer}.{block}.up.bias"] = torch.randn(hidden, generator=generator) * 0.1
    config = {
        "peft_type": "BOTTLENECK",
        "bottleneck_size": size,
        "placement": placement,
        "non_linearity": activation,
        "scaling": 0.5,
        "adapter_input": adapter_input,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, out / "adapter_model.safetensors")
    return out


def make_bitfit_adapter(
    shape: ModelShape, out: Path, seed: int = 0, targets: tuple[str, ...] = ("q_proj", "o_proj", "down_proj")
) -> Path:
    """A BitFit adapter in our format with random biases (added on a base without them)."""
    generator = torch.Generator().manual_seed(seed)
    dims = shape.linear_dims()
    tensors = {
        bitfit.tensor_name(layer, module): torch.randn(dims[module][1], generator=generator) * 0.05
        for layer in range(shape.num_layers)
        for module in targets
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(bitfit.to_config(targets)))
    save_file(tensors, out / "adapter_model.safetensors")
    return out


def apply_bitfit(model: torch.nn.Module, adapter_dir: Path) -> None:
    """Our plain BitFit reference: set (or add) each saved bias on the HF model's linear."""
    from safetensors.torch import load_file

    for name, value in load_file(adapter_dir / "adapter_model.safetensors").items():
        match = bitfit.TENSOR.match(name)
        layer, module = model.model.layers[int(match.group(1))], match.group(2)
        block = layer.mlp if module in ("gate_proj", "up_proj", "down_proj") else layer.self_attn
        linear = getattr(block, module)
        linear.bias = torch.nn.Parameter(value.to(linear.weight.device, torch.float32).clone())


def reference_logprobs(base_dir: Path, adapter_dir: Path | None, ids: list[int]) -> torch.Tensor:
    """(T, vocab) log-softmax of one full forward over `ids` without a KV cache: row i is the
    distribution of token i + 1, under the adapter (PEFT, or our bottleneck reference) or the base."""
    base = load_base(base_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text()) if adapter_dir else {}
    with torch.no_grad():
        if adapter_dir is None:
            logits = base(input_ids=torch.tensor([ids]), use_cache=False).logits
        elif config["peft_type"] == "BOTTLENECK":
            from safetensors.torch import load_file

            from server.base_model import model_shape

            weights = parse(
                config, load_file(adapter_dir / "adapter_model.safetensors"), model_shape(base.config)
            )
            with BottleneckReference(base, weights).applied():
                logits = base(input_ids=torch.tensor([ids]), use_cache=False).logits
        else:
            model = PeftModel.from_pretrained(base, adapter_dir).eval()
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits
    # Prompt-learning kinds return rows for their virtual tokens first.
    return torch.log_softmax(logits[0, -len(ids) :].float(), dim=-1)


def reference_tokens(
    base_dir: Path, adapter_dir: Path, prompt_ids: list[int], max_new_tokens: int, stop_at_eos: bool = True
) -> list[int]:
    """Greedy tokens of one adapter alone, over full forwards without a KV cache (`reference_greedy`):
    PEFT for PEFT kinds, our reference module for bottleneck ones."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = load_base(base_dir)
    if config["peft_type"] == bitfit.PEFT_TYPE:
        apply_bitfit(base, adapter_dir)
        return reference_greedy(base, prompt_ids, max_new_tokens, stop_at_eos)
    if config["peft_type"] == "BOTTLENECK":
        from safetensors.torch import load_file

        from server.base_model import model_shape

        weights = parse(
            config, load_file(adapter_dir / "adapter_model.safetensors"), model_shape(base.config)
        )
        with BottleneckReference(base, weights).applied():
            return reference_greedy(base, prompt_ids, max_new_tokens, stop_at_eos)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    return reference_greedy(model, prompt_ids, max_new_tokens, stop_at_eos)


@contextlib.contextmanager
def reference_model(
    base_dir: Path, adapter_dir: Path | None, quantize: str = "none", device: str = "cpu"
) -> Iterator[torch.nn.Module]:
    """The float32 reference model for one adapter (None: the base alone), on `device`: PEFT for
    PEFT kinds, our reference module for bottleneck ones. With `quantize` the base's linear layers
    are bitsandbytes-quantized as the server quantizes them, computing in float32."""
    if quantize == "none":
        base = load_base(base_dir).to(device)
    else:
        bnb = (
            BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
            )
            if quantize == "nf4"
            else BitsAndBytesConfig(load_in_8bit=True)
        )
        base = AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=torch.float32, quantization_config=bnb, device_map=device
        ).eval()
    if adapter_dir is None:
        yield base
        return
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config["peft_type"] == bitfit.PEFT_TYPE:  # our format: PEFT has no BitFit
        apply_bitfit(base, adapter_dir)
        yield base
        return
    if config["peft_type"] != "BOTTLENECK":
        yield PeftModel.from_pretrained(base, adapter_dir).eval().to(device)
        return
    weights = parse(config, load_file(adapter_dir / "adapter_model.safetensors"), model_shape(base.config))
    for key, site in weights.sites.items():
        moved = {f.name: getattr(site, f.name) for f in dataclasses.fields(site)}
        weights.sites[key] = type(site)(
            **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()}
        )
    with BottleneckReference(base, weights).applied():
        yield base


Steps = list[tuple[int | None, float, float]]
"""One prompt's reference steps: (token or None at EOS, top-2 margin, max |logit|) (`reference_steps`)."""

_STEPS: dict[tuple, Steps] = {}


def reference_steps_for(
    base_dir: Path,
    adapter_dir: Path | None,
    prompts: list[list[int]],
    max_new_tokens: int,
    quantize: str = "none",
    device: str = "cpu",
) -> list[Steps]:
    """`reference_steps` (tokens with their float32 margins) of one adapter alone, or of the base,
    on each prompt.

    Computed once per session per prompt, with one model load for those not yet computed: the
    default model's take ~2 s each, and the low-rank paths, dtypes and modules that check every
    kind compare against the same ones."""
    keys = [(base_dir, adapter_dir, tuple(p), max_new_tokens, quantize, device) for p in prompts]
    if missing := [key for key in keys if key not in _STEPS]:
        with reference_model(base_dir, adapter_dir, quantize, device) as model:
            for key in missing:
                _STEPS[key] = reference_steps(model, list(key[2]), max_new_tokens)
    return [_STEPS[key] for key in keys]


def chat_prompts(tokenizer, questions: Iterable[str]) -> list[list[int]]:
    """Each question as a one-turn chat prompt, ready for the assistant's answer."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for q in questions
    ]


DEFAULT_MODEL_QUESTIONS = ("What is the capital of France?", "Name a fruit.")
"""The chat prompts every kind is served on with the default model in float32
(test_batched_reference); test_low_precision serves the first, so its float32 references are
the same `reference_steps_for` calls."""


def serve_mixed(
    model, store: Path, prompts: list[list[int]], max_new_tokens: int, **adapter_settings
) -> dict:
    """Every (adapter of `store` or None for the base, prompt index) pair submitted at once to one
    engine: the greedy tokens of each."""
    adapter_settings = {"max_module_copy_bytes": COPY_BYTES, **adapter_settings}
    engine = Engine(
        model, EngineSettings(max_batch_size=64), AdapterSettings(**adapter_settings), Store(store)
    )
    names = [ref.name for ref in engine.source.names()]
    jobs = [(name, i) for i in range(len(prompts)) for name in [None, *names]]
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    handles = [engine.submit(prompts[i], params, engine.resolve_model(n) if n else None) for n, i in jobs]
    results = run_until_done(engine, handles)
    return {job: token_ids(events) for job, events in zip(jobs, results, strict=True)}


BOTTLENECKS = {
    "houlsby": dict(placement="houlsby", activation="gelu"),
    "pfeiffer": dict(placement="pfeiffer", activation="relu", adapter_input="residual_stream"),
}


def build_store(root: Path, base_dir: Path, shape: ModelShape) -> Path:
    """A store folder with one adapter of every kind (PEFT kinds, both bottleneck placements,
    BitFit) for the base in `base_dir`, each named after its kind."""
    for seed, kind in enumerate([*PEFT_KINDS, *EXTRA_KINDS]):
        make_peft_adapter(base_dir, kind, root / kind, seed=seed)
    for seed, (name, options) in enumerate(BOTTLENECKS.items(), start=100):
        make_bottleneck_adapter(shape, root / name, seed=seed, **options)
    make_bitfit_adapter(shape, root / "bitfit", seed=200)
    return root


def check_against_references(
    model, base_dir: Path, store: Path, prompts: list[list[int]], served: dict, new_tokens: int
) -> None:
    """Equal tokens on the CPU; on another device (PEFTSERVE_TEST_DEVICE) float32 sums in another
    order, so equal up to the first near tie of the CPU's float32 reference."""
    for name in {n for n, _ in served}:
        references = reference_steps_for(base_dir, store / name if name else None, prompts, new_tokens)
        for i, steps in enumerate(references):
            tokens, what = served[(name, i)], f"{name or 'base'} on prompt {i}"
            if model.device.type != "cpu":
                compare_up_to_near_ties(tokens, steps, what)
            else:
                assert tokens == [t for t, _, _ in steps if t is not None], what
        if name:
            assert any(served[(name, i)] != served[(None, i)] for i in range(len(prompts))), (
                f"{name} changed nothing"
            )
