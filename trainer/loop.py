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


@dataclass
class BestCheckpoint:
    """The lowest eval loss so far, its step and weights, and how many evals have not beaten it."""

    loss: float = math.inf
    step: int | None = None
    weights: dict[str, torch.Tensor] | None = None
    evals_since: int = 0

    def offer(self, loss: float, step: int, adapter: Adapter) -> bool:
        """Record an eval; keep a copy of the weights if it is the best so far. True if it was."""
        if loss < self.loss:
            self.loss, self.step, self.weights, self.evals_since = loss, step, adapter.snapshot(), 0
            return True
        self.evals_since += 1
        return False


def optimizer_step(
    adapter: Adapter,
    group: list[dict[str, torch.Tensor]],
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    step: int = 0,
) -> float:
    """Accumulate gradients over a group of micro-batches (weighted by answer tokens), clip, step."""
    n_total = max(sum(loss_tokens(b) for b in group), 1)
    step_loss = 0.0
    for batch in group:
        with autocast(adapter.model, cfg):
            loss = batch_loss(adapter, batch) * (loss_tokens(batch) / n_total)
        loss.backward()
        step_loss += float(loss.detach())
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(adapter.trainable().values(), cfg.max_grad_norm)
    optimizer.step()
    schedule.step()
    adapter.after_step(step)
    optimizer.zero_grad(set_to_none=True)
    return step_loss


def record_eval(
    adapter: Adapter,
    val_set: list[Example],
    cfg: TrainConfig,
    pad_id: int,
    step: int,
    history: History,
    best: BestCheckpoint,
) -> float:
    """Compute the eval loss at step, add it to history and best, and log it."""
    eval_loss = evaluate(adapter, val_set, cfg, pad_id)
    history.eval_steps.append(step)
    history.eval_loss.append(eval_loss)
    train_loss = history.train_loss[-1]
    mark = " (best)" if best.offer(eval_loss, step, adapter) else ""
    log.info("step %d: train loss %.4f, eval loss %.4f%s", step, train_loss, eval_loss, mark)
    return eval_loss


def train(
    adapter: Adapter, train_set: list[Example], val_set: list[Example], cfg: TrainConfig, pad_id: int
) -> TrainResult:
    """Train adapter's trainable weights in place; leave the best checkpoint (by eval loss) loaded."""
    total_steps = planned_steps(len(train_set), cfg)
    optimizer = torch.optim.AdamW(
        adapter.trainable().values(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, cfg.warmup_fraction))
    history, best = History(), BestCheckpoint()
    stream = micro_batches(train_set, cfg)
    tokens, step, stopped, postfix = 0, 0, "completed", {}
    started = time.perf_counter()
    adapter.model.train()
    bar = tqdm(total=total_steps, desc=f"train {cfg.method}", unit="step", dynamic_ncols=True, disable=None)
    with stop_on_interrupt() as stop, bar:
        while stopped == "completed" and step < total_steps:
            group = [collate(b, pad_id, PAD_MULTIPLE) for b in islice(stream, cfg.grad_accum)]
            step_loss = optimizer_step(adapter, group, cfg, optimizer, schedule, step)
            tokens += sum(int(b["attention_mask"].sum()) for b in group)
            step += 1
            history.train_steps.append(step)
            history.train_loss.append(step_loss)
            postfix |= {
                "loss": f"{step_loss:.3f}",
                "tok/s": f"{tokens / (time.perf_counter() - started):.0f}",
            }
            if val_set and (step % cfg.eval_every == 0 or step == total_steps or stop.is_set()):
                eval_loss = record_eval(adapter, val_set, cfg, pad_id, step, history, best)
                postfix["eval"] = f"{eval_loss:.3f}"
                if cfg.patience and best.evals_since >= cfg.patience:
                    stopped = "early stopping"
                    log.info("early stopping: no better eval loss in the last %d evals", cfg.patience)
            bar.set_postfix(postfix, refresh=False)
            bar.update()
            if stop.is_set():
                stopped = "interrupted"

    if best.weights is not None and best.step != step:
        adapter.restore(best.weights)
        log.info("kept the best checkpoint: step %d, eval loss %.4f", best.step, best.loss)
    return TrainResult(
        steps=step,
        total_steps=total_steps,
        stopped=stopped,
        history=history,
        best_step=best.step,
        best_eval_loss=best.loss if best.step is not None else None,
        final_eval_loss=history.eval_loss[-1] if history.eval_loss else None,
        tokens=tokens,
        seconds=time.perf_counter() - started,
    )
