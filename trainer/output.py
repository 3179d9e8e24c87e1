"""Write the output folder: the adapter, a model card README.md and loss.png, published atomically."""

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from trainer.config import METHOD_ONLY_FIELDS, TrainConfig
from trainer.errors import UsageError
from trainer.loop import History, TrainResult

CARD_FILE = "README.md"
PLOT_FILE = "loss.png"
# settings that describe the run's inputs and outputs rather than its hyperparameters
NOT_HYPERPARAMETERS = {"data", "method", "out", "base", "overwrite", "val_file", "push", "name", "lr"}


@dataclass(frozen=True)
class DataSummary:
    """What the model card says about the data."""

    train_file: Path
    train_sha256: str
    train_examples: int
    val_source: str
    val_examples: int


def check_out(out: Path, overwrite: bool) -> None:
    """Fail before any work if --out cannot be written."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if out.exists() and not overwrite:
        raise UsageError(f"--out {out} already exists; pass --overwrite to replace it")


@contextmanager
def staged_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary folder next to out; on success it becomes out, on failure it vanishes."""
    check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield staging
        if out.exists():
            retired = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(retired)
            staging.rename(out)
            shutil.rmtree(retired)
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def hyperparameters(cfg: TrainConfig) -> dict[str, object]:
    """The settings that shaped the adapter, with method-dependent defaults resolved."""
    values = {"learning_rate": cfg.learning_rate}
    for name, value in cfg.model_dump(mode="json").items():
        applies = cfg.method in METHOD_ONLY_FIELDS.get(name, {cfg.method})
        if name not in NOT_HYPERPARAMETERS and applies:
            values[name] = value
    return values


def _loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def model_card(cfg: TrainConfig, base_name: str, data: DataSummary, result: TrainResult, params: int) -> str:
    """README.md for the adapter folder."""
    stopped = {
        "completed": f"completed {result.steps} of {result.total_steps} steps",
        "early stopping": f"stopped early at step {result.steps} of {result.total_steps} (eval loss stalled)",
        "interrupted": f"interrupted (Ctrl-C) at step {result.steps} of {result.total_steps}",
    }[result.stopped]
    saved = (
        f"the best checkpoint (step {result.best_step}, lowest eval loss)"
        if result.best_step is not None
        else f"the final weights (step {result.steps})"
    )
    rows = [
        ("base model", f"`{base_name}`"),
        ("method", f"`{cfg.method}`"),
        ("trainable parameters", f"{params:,}"),
        ("training data", f"`{data.train_file.name}`, {data.train_examples} examples"),
        ("training data sha256", f"`{data.train_sha256}`"),
        ("validation data", f"{data.val_source}, {data.val_examples} examples"),
        ("training", f"{stopped}, {result.tokens:,} tokens in {result.seconds:.0f} s"),
        ("final train loss", _loss(result.final_train_loss)),
        ("final eval loss", _loss(result.final_eval_loss)),
        ("best eval loss", _loss(result.best_eval_loss)),
        ("saved weights", saved),
    ]
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    params_json = json.dumps(hyperparameters(cfg), indent=2)
    return f"""---
base_model: {base_name}
tags: [peftserve, {cfg.method}]
---

# {cfg.out.name}

A `{cfg.method}` adapter for `{base_name}`, trained with `peftserve-train`.

| | |
| --- | --- |
{table}

## Hyperparameters

```json
{params_json}
```

## Loss curves

![train and eval loss]({PLOT_FILE})
"""


def plot_loss(history: History, best_step: int | None, path: Path) -> None:
    """loss.png: train loss per step and eval loss per evaluation."""
    fig = Figure(figsize=(7, 4), layout="tight")
    ax = fig.subplots()
    ax.plot(history.train_steps, history.train_loss, label="train loss", linewidth=1, alpha=0.8)
    if history.eval_steps:
        ax.plot(history.eval_steps, history.eval_loss, "o-", label="eval loss", linewidth=1.5)
    if best_step is not None:
        ax.axvline(best_step, color="grey", linestyle=":", label=f"best (step {best_step})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per answer token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100)
