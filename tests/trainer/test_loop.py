import math
from pathlib import Path

import pytest
import torch

from trainer.base import load_base
from trainer.config import make_config
from trainer.data import collate
from trainer.loop import PAD_MULTIPLE, batch_loss, planned_steps, train, warmup_cosine
from trainer.methods import attach_adapter
from trainer.run import load_data


def test_warmup_then_cosine_to_zero():
    factor = warmup_cosine(total_steps=100, warmup_fraction=0.1)
    warmup = [factor(s) for s in range(10)]
    assert warmup == sorted(warmup) and warmup[0] > 0 and warmup[-1] < 1
    assert factor(10) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.5)
    decay = [factor(s) for s in range(10, 100)]
    assert decay == sorted(decay, reverse=True)
    assert factor(100) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("settings", "steps"),
    [
        ({"epochs": 3, "batch_size": 8}, 3 * math.ceil(100 / 8)),
        ({"epochs": 2, "batch_size": 8, "grad_accum": 4}, math.ceil(2 * 13 / 4)),
        ({"max_steps": 7, "batch_size": 8}, 7),
    ],
)
def test_planned_steps(settings, steps, tmp_path):
    cfg = make_config(data=tmp_path / "d", out=tmp_path / "o", method="lora", **settings)
    assert planned_steps(100, cfg) == steps


def run_loop(tiny_base: Path, chat_data: Path, tmp_path: Path, **settings):
    cfg = make_config(data=chat_data, out=tmp_path / "o", base=str(tiny_base), batch_size=4, **settings)
    base = load_base(str(tiny_base))
    train_set, val_set, _ = load_data(cfg, base.tokenizer)
    adapter = attach_adapter(base.model, cfg, base.name)
    return train(adapter, train_set, val_set, cfg, base.tokenizer.pad_token_id)


def test_early_stopping_after_patience_evals_without_gain(tiny_base, chat_data, tmp_path):
    # IA3 scales start at 1.0; steps of 1e-12 cannot change them, so the eval loss never improves
    result = run_loop(
        tiny_base, chat_data, tmp_path, method="ia3", lr=1e-12, max_steps=50, eval_every=1, patience=2
    )
    assert result.stopped == "early stopping"
    assert result.steps == 3
    assert result.best_step == 1
    assert result.history.eval_steps == [1, 2, 3]


def test_no_validation_data_means_no_eval_and_no_early_stop(tiny_base, chat_data, tmp_path):
    result = run_loop(
        tiny_base, chat_data, tmp_path, method="lora", val_fraction=0.0, max_steps=4, eval_every=1
    )
    assert result.stopped == "completed" and result.steps == 4
    assert result.history.eval_loss == [] and result.best_eval_loss is None and result.final_eval_loss is None


def test_gradient_accumulation_checkpointing_and_bf16_train(tiny_base, chat_data, tmp_path):
    result = run_loop(
        tiny_base,
        chat_data,
        tmp_path,
        method="lora",
        lr=1e-2,
        max_steps=6,
        grad_accum=3,
        gradient_checkpointing=True,
        precision="bf16",
        eval_every=3,
    )
    assert result.steps == 6
    assert result.tokens > 0
    assert result.history.train_loss[-1] < result.history.train_loss[0]


@pytest.mark.parametrize("method", ["lora", "bottleneck", "prompt"])
def test_answer_only_logits_give_the_models_own_loss(method, tiny_base, chat_data, tmp_path):
    cfg = make_config(data=chat_data, out=tmp_path / "o", base=str(tiny_base), method=method)
    base = load_base(str(tiny_base))
    train_set, _, _ = load_data(cfg, base.tokenizer)
    adapter = attach_adapter(base.model, cfg, base.name)
    adapter.model.eval()
    batch = collate(train_set[:4], base.tokenizer.pad_token_id, PAD_MULTIPLE)
    with torch.no_grad():
        expected = float(adapter.model(**batch).loss)
        assert float(batch_loss(adapter, batch)) == pytest.approx(expected, rel=1e-5)
