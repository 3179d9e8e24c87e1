"""Put a trainable adapter of the chosen method on a base model, and save it in the on-disk format.

PEFT does the work for every kind it has; bottleneck and BitFit adapters are ours
(trainer.bottleneck, trainer.bitfit).
"""

from abc import ABC, abstractmethod
from pathlib import Path

import torch
from peft import (
    AdaLoraConfig,
    IA3Config,
    LNTuningConfig,
    LoraConfig,
    OFTConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
    VeraConfig,
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

    def after_step(self, step: int) -> None:
        """Called after optimizer step `step` (0-based), before the gradients are cleared."""
        return None

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


class AdaLoraAdapter(PeftAdapter):
    """AdaLoRA: after every step its rank allocator scores the singular values and prunes the budget."""

    def after_step(self, step: int) -> None:
        self.model.base_model.update_and_allocate(step)

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        super().restore(snapshot)
        # a snapshot from before the final pruning still holds singular values the budget has since cut
        rank_pattern = self.model.peft_config["default"].rank_pattern
        if rank_pattern:
            self.model.base_model.rankallocator.mask_using_rank_pattern(
                self.model.base_model.model, rank_pattern
            )


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


def adalora_schedule(total_steps: int) -> dict[str, int]:
    """AdaLoRA's phases: a fifth of the steps at the initial rank, the last fifth at the final ranks."""
    edge = total_steps // 5
    return {"total_step": max(total_steps, 1), "tinit": edge, "tfinal": edge}


def peft_config(cfg: TrainConfig, total_steps: int = 1) -> PeftConfig:
    """The PEFT config for cfg.method, with cfg's hyperparameters (`total_steps` for AdaLoRA's schedule)."""
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
    if cfg.method == "adalora":
        return AdaLoraConfig(
            init_r=cfg.r,
            target_r=max(1, cfg.r // 2),
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules or "all-linear",
            **adalora_schedule(total_steps),
            **common,
        )
    if cfg.method == "vera":
        return VeraConfig(
            r=cfg.r, vera_dropout=cfg.dropout, target_modules=cfg.target_modules or "all-linear", **common
        )
    if cfg.method == "oft":
        return OFTConfig(
            r=0,
            oft_block_size=cfg.oft_block_size,
            target_modules=cfg.target_modules or "all-linear",
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


def attach_adapter(model: PreTrainedModel, cfg: TrainConfig, base_name: str, total_steps: int = 1) -> Adapter:
    """Freeze the base and add a freshly initialised (seeded) adapter of cfg.method to it.

    `total_steps`: the optimizer steps the run plans (AdaLoRA's budget schedule needs them).
    """
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
        peft_model = get_peft_model(model, peft_config(cfg, total_steps))
    except ValueError as exc:  # PEFT's message for e.g. target modules that the model does not have
        raise UsageError(f"--method {cfg.method}: {exc}") from exc
    peft_model.peft_config["default"].base_model_name_or_path = base_name  # not the local cache folder
    return AdaLoraAdapter(peft_model) if cfg.method == "adalora" else PeftAdapter(peft_model)


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant, so frozen inputs work)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
