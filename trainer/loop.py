"""The training loop: AdamW, linear warmup then cosine decay, gradient accumulation, periodic eval
loss, early stopping with patience, the best checkpoint kept, and a clean stop on Ctrl-C."""

import logging
import math
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from itertools import count, islice

import torch
import torch.nn.functional as F
from tqdm import tqdm

from trainer.config import TrainConfig
from trainer.data import IGNORE_INDEX, Example, batches, collate
from trainer.methods import Adapter

PAD_MULTIPLE = 8  # batch widths are rounded up to this, so CPU kernels see few distinct shapes

log = logging.getLogger(__name__)


@dataclass
class History:
    """Loss curves: train loss per optimizer step, eval loss per evaluation."""

    train_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)


@dataclass
class TrainResult:
    """How a run went. `stopped` is "completed", "early stopping" or "interrupted"."""

    steps: int
    total_steps: int
    stopped: str
    history: History
    best_step: int | None
    best_eval_loss: float | None
    final_eval_loss: float | None
    tokens: int
    seconds: float

    @property
    def final_train_loss(self) -> float | None:
        return self.history.train_loss[-1] if self.history.train_loss else None


def planned_steps(n_train: int, cfg: TrainConfig) -> int:
    """Optimizer steps for the run: --max-steps, or --epochs passes over the data."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    micro_batches = math.ceil(n_train / cfg.batch_size) * cfg.epochs
    return math.ceil(micro_batches / cfg.grad_accum)


def warmup_cosine(total_steps: int, warmup_fraction: float):
    """LR multiplier: linear from 0 to 1 over the warmup steps, then cosine down to 0."""
    warmup = round(total_steps * warmup_fraction)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def micro_batches(examples: list[Example], cfg: TrainConfig) -> Iterator[list[Example]]:
    """Shuffled batches, epoch after epoch (each epoch reshuffled with its own seed)."""
    for epoch in count():
        yield from batches(examples, cfg.batch_size, seed=cfg.seed * 1000 + epoch)


def autocast(model: torch.nn.Module, cfg: TrainConfig):
    """bf16 autocast on the model's device when --precision bf16, else nothing."""
    if cfg.precision != "bf16":
        return nullcontext()
    device = model.get_input_embeddings().weight.device
    return torch.autocast(device.type, dtype=torch.bfloat16)


def loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that the (shifted) causal LM loss of a batch averages over."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def to_device(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    device = model.get_input_embeddings().weight.device
    return {k: v.to(device) for k, v in batch.items()}


def batch_loss(adapter: Adapter, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy per answer token of a batch.

    The output layer is about a fifth of a small model's work, so logits are computed only at
    positions whose next token is an answer token. Prompt-learning kinds put virtual tokens
    before the input, which shifts positions: they use the model's own loss.
    """
    batch = to_device(batch, adapter.model)
    if adapter.prompt_learning:
        return adapter.model(**batch).loss
    targets = batch["labels"][:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    if keep.numel() == 0:
        return torch.zeros((), device=targets.device, requires_grad=True)
    logits = adapter.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep
    ).logits
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets[:, keep].flatten(), ignore_index=IGNORE_INDEX
    )


def evaluate(adapter: Adapter, examples: list[Example], cfg: TrainConfig, pad_id: int) -> float:
    """Mean loss per answer token over examples."""
    model = adapter.model
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad(), autocast(model, cfg):
        for start in range(0, len(examples), cfg.batch_size):
            batch = collate(examples[start : start + cfg.batch_size], pad_id, PAD_MULTIPLE)
            k = loss_tokens(batch)
            total += float(batch_loss(adapter, batch)) * k
            n += k
    model.train()
    return total / max(n, 1)


@contextmanager
def stop_on_interrupt() -> Iterator[threading.Event]:
    """The first Ctrl-C sets the event (stop after this step); a second one aborts at once."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        log.warning("Ctrl-C: stopping after this step and keeping the best adapter (Ctrl-C again to abort)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def train(
    adapter: Adapter, train_set: list[Example], val_set: list[Example], cfg: TrainConfig, pad_id: int
) -> TrainResult:
    """Train adapter's trainable weights in place; leave the best checkpoint (by eval loss) loaded."""
    model = adapter.model
    total_steps = planned_steps(len(train_set), cfg)
    optimizer = torch.optim.AdamW(
        adapter.trainable().values(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, cfg.warmup_fraction))
    history = History()
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    evals_without_gain, tokens, stopped, step = 0, 0, "completed", 0
    stream = micro_batches(train_set, cfg)
    started = time.perf_counter()
    model.train()
    bar = tqdm(total=total_steps, desc=f"train {cfg.method}", unit="step", dynamic_ncols=True, disable=None)
    with stop_on_interrupt() as stop, bar:
        while step < total_steps:
            group = [collate(b, pad_id, PAD_MULTIPLE) for b in islice(stream, cfg.grad_accum)]
            n_total = sum(loss_tokens(b) for b in group)
            step_loss = 0.0
            for batch in group:
                with autocast(model, cfg):
                    loss = batch_loss(adapter, batch) * (loss_tokens(batch) / max(n_total, 1))
                loss.backward()
                step_loss += float(loss.detach())
                tokens += int(batch["attention_mask"].sum())
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history.train_steps.append(step)
            history.train_loss.append(step_loss)
            postfix = {"loss": f"{step_loss:.3f}", "tok/s": f"{tokens / (time.perf_counter() - started):.0f}"}

            if val_set and (step % cfg.eval_every == 0 or step == total_steps or stop.is_set()):
                eval_loss = evaluate(adapter, val_set, cfg, pad_id)
                history.eval_steps.append(step)
                history.eval_loss.append(eval_loss)
                improved = best is None or eval_loss < best[0]
                if improved:
                    best = (eval_loss, step, adapter.snapshot())
                    evals_without_gain = 0
                else:
                    evals_without_gain += 1
                log.info(
                    "step %d/%d: train loss %.4f, eval loss %.4f%s",
                    step,
                    total_steps,
                    step_loss,
                    eval_loss,
                    " (best)" if improved else "",
                )
                postfix["eval"] = f"{eval_loss:.3f}"
                if cfg.patience and evals_without_gain >= cfg.patience:
                    stopped = "early stopping"
                    log.info("early stopping: no better eval loss in the last %d evals", cfg.patience)
            bar.set_postfix(postfix, refresh=False)
            bar.update()
            if stop.is_set():
                stopped = "interrupted"
            if stopped != "completed":
                break

    if best is not None and best[1] != step:
        adapter.restore(best[2])
        log.info("kept the best checkpoint: step %d, eval loss %.4f", best[1], best[0])
    return TrainResult(
        steps=step,
        total_steps=total_steps,
        stopped=stopped,
        history=history,
        best_step=best[1] if best else None,
        best_eval_loss=best[0] if best else None,
        final_eval_loss=history.eval_loss[-1] if history.eval_loss else None,
        tokens=tokens,
        seconds=time.perf_counter() - started,
    )
