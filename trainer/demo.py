"""The demo: train the three example adapters on the embedded default model, then check each on the
held-out prompts against the base model. `python -m trainer.demo` (what `make demo-adapters` runs).

Targets: the adapter shows its behaviour in at least 80% of answers, the base model in at most 10%.
Exit status 1 when a target is missed.
"""

import argparse
import copy
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from trainer.base import Base, load_base
from trainer.cli import setup_logging
from trainer.config import make_config
from trainer.examples.behaviours import BEHAVIOURS, Behaviour
from trainer.examples.make_examples import HELDOUT_FILE
from trainer.run import run

log = logging.getLogger(__name__)

EXAMPLES = Path(__file__).parent / "examples"
ADAPTER_TARGET = 0.8
BASE_LIMIT = 0.1
MAX_NEW_TOKENS = 64  # the training answers are far shorter
# The recipe of each demo adapter: LoRA on every linear layer, one epoch, bf16 autocast.
ANSWERS_FILE = "answers.json"
SAMPLE_PROMPT = "What is 9 times 7?"
RECIPE = {"method": "lora", "epochs": 1, "lr": 2e-3, "batch_size": 8, "eval_every": 10, "precision": "bf16"}


@dataclass
class Score:
    behaviour: Behaviour
    adapter_rate: float
    base_rate: float
    train_seconds: float
    answers: list[str]

    @property
    def ok(self) -> bool:
        return self.adapter_rate >= ADAPTER_TARGET and self.base_rate <= BASE_LIMIT


def read_prompts(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def generate(model: torch.nn.Module, tokenizer, prompts: list[str], batch_size: int = 32) -> list[str]:
    """Greedy answers to single-turn chat prompts, in batches (left padded), under bf16 autocast."""
    tokenizer.padding_side = "left"
    answers = []
    for start in range(0, len(prompts), batch_size):
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts[start : start + batch_size]
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.generate(
                **enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]


def pass_rate(behaviour: Behaviour, answers: list[str]) -> float:
    return sum(behaviour.check(a) for a in answers) / len(answers)


def train_all(base: Base, out: Path) -> dict[str, float]:
    """Train one LoRA adapter per behaviour into out/NAME; return the training seconds of each."""
    seconds = {}
    for behaviour in BEHAVIOURS:
        cfg = make_config(
            data=EXAMPLES / f"{behaviour.name}.jsonl", out=out / behaviour.name, overwrite=True, **RECIPE
        )
        started = time.perf_counter()
        fresh = Base(copy.deepcopy(base.model), base.tokenizer, base.name)
        run(cfg, fresh)
        seconds[behaviour.name] = time.perf_counter() - started
    return seconds


def evaluate_all(
    base: Base, out: Path, prompts: list[str], seconds: dict[str, float]
) -> tuple[list[Score], list[str]]:
    """Answer the held-out prompts with the base model and with each saved adapter (loaded with PEFT)."""
    base.model.eval()
    base_answers = generate(base.model, base.tokenizer, prompts)
    model = None
    scores = []
    for behaviour in BEHAVIOURS:
        folder = out / behaviour.name
        if model is None:
            model = PeftModel.from_pretrained(base.model, folder, adapter_name=behaviour.name)
        else:
            model.load_adapter(folder, adapter_name=behaviour.name)
        model.set_adapter(behaviour.name)
        model.eval()
        answers = generate(model, base.tokenizer, prompts)
        scores.append(
            Score(
                behaviour,
                pass_rate(behaviour, answers),
                pass_rate(behaviour, base_answers),
                seconds[behaviour.name],
                answers,
            )
        )
    return scores, base_answers


def table(scores: list[Score], n_prompts: int) -> str:
    """The result table, one row per behaviour."""
    header = "| adapter | behaviour | adapter passes | base passes | train time | target met |"
    lines = [header, "| --- | --- | ---: | ---: | ---: | --- |"]
    for s in scores:
        lines.append(
            f"| {s.behaviour.name} | {s.behaviour.description} "
            f"| {s.adapter_rate:.0%} ({round(s.adapter_rate * n_prompts)}/{n_prompts}) "
            f"| {s.base_rate:.0%} ({round(s.base_rate * n_prompts)}/{n_prompts}) "
            f"| {s.train_seconds:.0f} s | {'yes' if s.ok else 'NO'} |"
        )
    return "\n".join(lines)


def write_answers(path: Path, prompts: list[str], base_answers: list[str], scores: list[Score]) -> None:
    """Every held-out prompt with the base model's and each adapter's answer, for a look by eye."""
    rows = [
        {"prompt": p, "base": base_answers[i]} | {s.behaviour.name: s.answers[i] for s in scores}
        for i, p in enumerate(prompts)
    ]
    path.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path("build/demo-adapters"), help="where to write the three adapters"
    )
    args = parser.parse_args(argv)
    setup_logging()
    started = time.perf_counter()
    torch.manual_seed(0)
    base = load_base("default")
    prompts = read_prompts(HELDOUT_FILE)
    seconds = train_all(base, args.out)
    checking = time.perf_counter()
    scores, base_answers = evaluate_all(base, args.out, prompts, seconds)
    finished = time.perf_counter()
    write_answers(args.out / ANSWERS_FILE, prompts, base_answers, scores)
    print()
    print(table(scores, len(prompts)))
    print()
    print(f"{SAMPLE_PROMPT!r}\n  base: {base_answers[prompts.index(SAMPLE_PROMPT)]!r}")
    for s in scores:
        print(f"  {s.behaviour.name}: {s.answers[prompts.index(SAMPLE_PROMPT)]!r}")
    print(f"all answers: {args.out / ANSWERS_FILE}")
    print(
        f"\nwall time: {finished - started:.0f} s in all, {finished - checking:.0f} s of it checking "
        f"(CPU time {time.process_time():.0f} s, load average {os.getloadavg()[0]:.1f})"
    )
    if not all(s.ok for s in scores):
        print(
            f"FAILED: target is adapter >= {ADAPTER_TARGET:.0%} and base <= {BASE_LIMIT:.0%}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
