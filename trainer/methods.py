"""Put a trainable adapter of the chosen method on a base model, and save it in the on-disk format.

PEFT does the work for every kind it has; bottleneck and BitFit adapters are ours
(trainer.bottleneck, trainer.bitfit).
"""

from abc import ABC, abstractmethod
from pathlib import Path

import torch
from peft import (
    IA3Config,
    LNTuningConfig,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
    get_peft_model,
    prepare_model_for_kbit_training,
)
from torch import nn
from transformers import PreTrainedModel

from peftserve_formats import bitfit as bitfit_format
from trainer.bitfit import apply_bitfit, save_bitfit
from trainer.bottleneck import Bottleneck, BottleneckConfig, apply_bottleneck, save_bottleneck
from trainer.config import LORA_METHODS, TrainConfig
from trainer.errors import UsageError

PEFT_README = "README.md"


class Adapter(ABC):
    """A model with a trainable adapter: train `model`, snapshot/restore its trainable weights, save them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def prompt_learning(self) -> bool:
        """Whether the adapter puts virtual tokens before the input (prompt tuning, P-tuning)."""
        return False

    def trainable(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.trainable().values())

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of the trainable weights (the best checkpoint is kept this way)."""
        return {name: p.detach().clone() for name, p in self.trainable().items()}

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in self.trainable().items():
                p.copy_(snapshot[name])

    @abstractmethod
    def save(self, folder: Path) -> None:
        """Write adapter_config.json and adapter_model.safetensors into folder."""


class PeftAdapter(Adapter):
    """Any PEFT kind; saved with PEFT's own format."""

    model: PeftModel

    @property
    def prompt_learning(self) -> bool:
        return self.model.active_peft_config.is_prompt_learning

    def save(self, folder: Path) -> None:
        # embeddings are never trained here; "auto" would ask the model hub about the base's vocabulary
        self.model.save_pretrained(folder, safe_serialization=True, save_embedding_layers=False)
        (folder / PEFT_README).unlink(missing_ok=True)  # the trainer writes its own model card


class BottleneckAdapter(Adapter):
    """Our bottleneck adapters; saved in docs/adapter-format.md's format."""

    def __init__(self, model: nn.Module, config: BottleneckConfig, adapters: dict[str, Bottleneck]) -> None:
        super().__init__(model)
        self.config = config
        self.adapters = adapters

    def save(self, folder: Path) -> None:
        save_bottleneck(folder, self.config, self.adapters)


class BitFitAdapter(Adapter):
    """Our BitFit adapters (linear biases only); saved in docs/adapter-format.md's format."""

    def __init__(self, model: nn.Module, targets: tuple[str, ...], base_name: str) -> None:
        super().__init__(model)
        self.targets = targets
        self.base_name = base_name
        self.biases = apply_bitfit(model, targets)

    def save(self, folder: Path) -> None:
        save_bitfit(folder, self.targets, self.biases, self.base_name)


def peft_config(cfg: TrainConfig) -> PeftConfig:
    """The PEFT config for cfg.method, with cfg's hyperparameters."""
    common = {"task_type": "CAUSAL_LM"}
    if cfg.method in LORA_METHODS:
        return LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules or "all-linear",
            use_dora=cfg.method == "dora",
            **common,
        )
    if cfg.method == "ia3":
        feedforward = cfg.feedforward_modules
        if cfg.target_modules is not None and feedforward is None:
            feedforward = []
        return IA3Config(target_modules=cfg.target_modules, feedforward_modules=feedforward, **common)
    if cfg.method == "prompt":
        return PromptTuningConfig(
            num_virtual_tokens=cfg.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB,
            **common,
        )
    if cfg.method == "ptuning":
        return PromptEncoderConfig(
            num_virtual_tokens=cfg.num_virtual_tokens, encoder_hidden_size=cfg.encoder_hidden_size, **common
        )
    if cfg.method == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, **common)
    if cfg.method == "ln-tuning":
        return LNTuningConfig(target_modules=cfg.target_modules, **common)
    raise UsageError(f"--method {cfg.method} is not a PEFT method")


def attach_adapter(model: PreTrainedModel, cfg: TrainConfig, base_name: str) -> Adapter:
    """Freeze the base and add a freshly initialised (seeded) adapter of cfg.method to it."""
    torch.manual_seed(cfg.seed)
    model.config.use_cache = False
    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    if cfg.method == "bottleneck":
        model.requires_grad_(False)
        config = BottleneckConfig(
            base_model_name_or_path=base_name,
            bottleneck_size=cfg.bottleneck_size,
            placement=cfg.placement,
            non_linearity=cfg.non_linearity,
        )
        return BottleneckAdapter(model, config, apply_bottleneck(model, config))
    if cfg.method == "bitfit":
        targets = tuple(cfg.target_modules or bitfit_format.LINEARS)
        try:
            bitfit_format.check_config({"target_modules": list(targets)})
        except bitfit_format.FormatError as exc:
            raise UsageError(f"--target-modules: {exc}") from exc
        return BitFitAdapter(model, targets, base_name)
    try:
        peft_model = get_peft_model(model, peft_config(cfg))
    except ValueError as exc:  # PEFT's message for e.g. target modules that the model does not have
        raise UsageError(f"--method {cfg.method}: {exc}") from exc
    peft_model.peft_config["default"].base_model_name_or_path = base_name  # not the local cache folder
    return PeftAdapter(peft_model)


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant, so frozen inputs work)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
