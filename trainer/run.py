"""One training run, start to end: check, load data, load the base, train, write, push."""

import logging
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from trainer.base import Base, load_base, load_tokenizer
from trainer.config import TrainConfig
from trainer.data import Example, file_sha256, load_examples, split_examples
from trainer.errors import PushError, UsageError
from trainer.loop import TrainResult, planned_steps, train
from trainer.methods import Adapter, attach_adapter
from trainer.output import CARD_FILE, PLOT_FILE, DataSummary, check_out, model_card, plot_loss, staged_folder
from trainer.push import push_adapter

log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    """What a run produced: the written folder, the trained model (best weights loaded), how training
    went, and the server's answer to --push."""

    folder: Path
    adapter: Adapter
    result: TrainResult
    pushed: dict | None


def load_data(
    cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[Example], list[Example], DataSummary]:
    """Training and validation examples (from --val-file or a --val-fraction split of --data)."""
    examples = load_examples(cfg.data, tokenizer, cfg.max_length)
    if cfg.val_file is not None:
        train_set, val_set = examples, load_examples(cfg.val_file, tokenizer, cfg.max_length)
        source = f"`{cfg.val_file.name}`"
    else:
        train_set, val_set = split_examples(examples, cfg.val_fraction, cfg.seed)
        source = f"{cfg.val_fraction:.0%} of the training file" if val_set else "none"
    summary = DataSummary(cfg.data, file_sha256(cfg.data), len(train_set), source, len(val_set))
    return train_set, val_set, summary


def run(cfg: TrainConfig, base: Base | None = None) -> RunOutcome:
    """Train cfg.method on cfg.data and write cfg.out; `base` skips loading cfg.base (it gets modified)."""
    check_out(cfg.out, cfg.overwrite)
    tokenizer = base.tokenizer if base is not None else load_tokenizer(cfg.base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_set, val_set, summary = load_data(cfg, tokenizer)
    log.info("data: %d training and %d validation examples", len(train_set), len(val_set))

    if base is None:
        base = load_base(cfg.base, four_bit=cfg.method == "qlora")
    elif cfg.method == "qlora" and not getattr(base.model, "is_loaded_in_4bit", False):
        raise UsageError("--method qlora needs the base loaded in 4-bit")
    adapter = attach_adapter(base.model, cfg, base.name, planned_steps(len(train_set), cfg))
    params = adapter.parameter_count()
    log.info("%s adapter on %s: %s trainable parameters", cfg.method, base.name, f"{params:,}")

    result = train(adapter, train_set, val_set, cfg, pad_id)
    with staged_folder(cfg.out, cfg.overwrite) as staging:
        adapter.save(staging)
        (staging / CARD_FILE).write_text(model_card(cfg, base.name, summary, result, params))
        plot_loss(result.history, result.best_step, staging / PLOT_FILE)
    log.info("wrote %s", cfg.out)

    pushed = None
    if cfg.push is not None and result.stopped != "interrupted":
        try:
            pushed = push_adapter(cfg.out, cfg.push, cfg.adapter_name)
        except PushError as exc:
            raise PushError(f"{exc} (the adapter is saved in {cfg.out})") from exc
        log.info("pushed %s version %s to %s", pushed.get("name"), pushed.get("version"), cfg.push)
    return RunOutcome(cfg.out, adapter, result, pushed)
