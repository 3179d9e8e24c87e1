"""Read JSONL training data, check every line, and turn it into token ids with loss masks.

Two line shapes are accepted:
- `{"messages": [{"role": ..., "content": ...}, ...]}`: rendered with the base tokenizer's chat
  template; the loss covers the assistant turns only (their text and the template's end-of-turn).
- `{"prompt": "...", "completion": "..."}`: plain text `prompt + completion + eos`; the loss covers
  the completion and the eos.
"""

import hashlib
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from trainer.errors import DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
MAX_REPORTED_ERRORS = 10


@dataclass(frozen=True)
class Chat:
    """One `{"messages": [...]}` line."""

    line: int
    messages: list[dict[str, str]]


@dataclass(frozen=True)
class Completion:
    """One `{"prompt": ..., "completion": ...}` line."""

    line: int
    prompt: str
    completion: str


Record = Chat | Completion


@dataclass(frozen=True)
class Example:
    """A tokenized record: `labels[i]` is `input_ids[i]` where the loss applies, else IGNORE_INDEX."""

    line: int
    input_ids: list[int]
    labels: list[int]

    @property
    def loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes (recorded in the model card)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_records(path: Path) -> list[Record]:
    """Parse and check every line of a JSONL file; raise one DataError naming each bad line."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    records: list[Record] = []
    errors: list[str] = []
    with path.open(encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                records.append(parse_line(text, number))
            except ValueError as exc:
                errors.append(f"{path}:{number}: {exc}")
    if errors:
        shown = errors[:MAX_REPORTED_ERRORS]
        if len(errors) > len(shown):
            shown.append(f"... and {len(errors) - len(shown)} more bad lines")
        raise DataError("bad data, nothing was trained:\n  " + "\n  ".join(shown))
    if not records:
        raise DataError(f"{path}: no data lines")
    return records


def parse_line(text: str, line: int) -> Record:
    """One JSONL line -> Record; ValueError says what is wrong with it."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    keys = set(obj)
    if keys == {"messages"}:
        return Chat(line, _check_messages(obj["messages"]))
    if keys == {"prompt", "completion"}:
        for key in ("prompt", "completion"):
            if not isinstance(obj[key], str):
                raise ValueError(f'"{key}" must be a string, got {type(obj[key]).__name__}')
        if not obj["completion"]:
            raise ValueError('"completion" is empty')
        return Completion(line, obj["prompt"], obj["completion"])
    raise ValueError(
        f"expected the keys messages, or prompt and completion; got {', '.join(sorted(keys)) or 'none'}"
    )


def _check_messages(messages: object) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise ValueError(f'messages[{i}] must be an object with exactly "role" and "content"')
        if message["role"] not in ROLES:
            raise ValueError(
                f"messages[{i}] has role {message['role']!r}; expected one of {', '.join(ROLES)}"
            )
        if not isinstance(message["content"], str):
            raise ValueError(f'messages[{i}] "content" must be a string')
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message, so nothing to learn")
    return messages


def encode(record: Record, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Example:
    """Tokenize a record, mark its loss tokens, and truncate it to max_length tokens."""
    if isinstance(record, Chat):
        text, spans = _render_chat(record, tokenizer)
        add_special = False  # the chat template already holds every special token
    else:
        text = record.prompt + record.completion
        spans = [(len(record.prompt), len(text))]
        add_special = True
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [
        token if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
        for token, (start, _) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    if isinstance(record, Completion) and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return Example(record.line, ids[:max_length], labels[:max_length])


def _render_chat(record: Chat, tokenizer: PreTrainedTokenizerBase) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    if not tokenizer.chat_template:
        raise DataError(
            f"line {record.line}: the base tokenizer has no chat template; use prompt/completion lines"
        )
    messages = record.messages
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through)):
            raise DataError(
                f"line {record.line}: the chat template does not render conversations "
                "turn by turn, so assistant turns cannot be found; use prompt/completion lines"
            )
        spans.append((len(before), len(through)))
    return text, spans


def load_examples(path: Path, tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[Example]:
    """Read, check and tokenize a JSONL file; drop (and log) examples left with no loss tokens."""
    examples = [encode(record, tokenizer, max_length) for record in read_records(path)]
    empty = [ex.line for ex in examples if ex.loss_tokens == 0]
    if empty:
        log.warning(
            "%s: %d lines have no answer tokens within --max-length %d and are skipped (lines %s)",
            path,
            len(empty),
            max_length,
            ", ".join(map(str, empty[:MAX_REPORTED_ERRORS])),
        )
    kept = [ex for ex in examples if ex.loss_tokens > 0]
    if not kept:
        raise DataError(f"{path}: no line has answer tokens within --max-length {max_length}")
    return kept


def split_examples(
    examples: list[Example], val_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Hold out a seeded random share of the examples (at least one when the share is above 0)."""
    if val_fraction == 0.0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(examples) * val_fraction))
    if n_val >= len(examples):
        raise DataError(f"--val-fraction {val_fraction} leaves no training data from {len(examples)} lines")
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [examples[i] for i in train], [examples[i] for i in val]


def collate(examples: list[Example], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad examples into input_ids, attention_mask and labels tensors, `multiple` tokens wide.

    A few distinct widths keep CPU kernels warm: oneDNN prepares each new shape anew, and with
    bf16 that costs more than the step itself.
    """
    width = -(-max(len(ex.input_ids) for ex in examples) // multiple) * multiple
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches(examples: list[Example], batch_size: int, seed: int, window: int = 16) -> Iterator[list[Example]]:
    """One epoch of seeded shuffled batches of similar lengths (less padding).

    Shuffle, sort each run of `window` batches' worth of examples by length, cut it into
    batches, and shuffle the batches.
    """
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    groups = []
    for start in range(0, len(order), batch_size * window):
        run = sorted(order[start : start + batch_size * window], key=lambda i: len(examples[i].input_ids))
        groups += [run[k : k + batch_size] for k in range(0, len(run), batch_size)]
    rng.shuffle(groups)
    for group in groups:
        yield [examples[i] for i in group]
