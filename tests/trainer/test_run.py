"""Every method trains on a tiny random model, its loss goes down, and the saved folder, loaded back
with PEFT (or our bottleneck loader), gives the same logits and greedy tokens as the trained model;
served by peftserve, it gives those greedy tokens too."""

import json
from pathlib import Path
from statistics import mean

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from server.base_model import load_base_model
from server.config import AdapterSettings, EngineSettings, Settings
from server.engine.engine import Engine
from server.engine.sampler import SamplingParams
from server.registry.store import Store
from tests.helpers import reference_greedy, run_until_done, token_ids
from trainer.base import load_base
from trainer.bitfit import load_bitfit
from trainer.bottleneck import load_bottleneck
from trainer.config import METHODS, make_config
from trainer.loop import evaluate
from trainer.methods import PeftAdapter
from trainer.run import load_data, run

EXAMPLES = Path(__file__).resolve().parents[2] / "trainer" / "examples"

# learning rates that move each method's loss clearly within a dozen steps on the tiny model
TEST_LR = {
    "lora": 1e-2,
    "qlora": 1e-2,
    "dora": 1e-2,
    "ia3": 1e-1,
    "prompt": 1e-1,
    "ptuning": 1e-2,
    "prefix": 1e-1,
    "bottleneck": 1e-2,
    "bitfit": 1e-1,
    "ln-tuning": 1e-1,
    "adalora": 3e-2,
    "vera": 5e-2,
    "oft": 1e-2,
}
PEFT_TYPES = {
    "lora": "LORA",
    "qlora": "LORA",
    "dora": "LORA",
    "ia3": "IA3",
    "prompt": "PROMPT_TUNING",
    "ptuning": "P_TUNING",
    "prefix": "PREFIX_TUNING",
    "bottleneck": "BOTTLENECK",
    "bitfit": "BITFIT",
    "ln-tuning": "LN_TUNING",
    "adalora": "ADALORA",
    "vera": "VERA",
    "oft": "OFT",
}


def prompt_ids(tokenizer) -> dict[str, torch.Tensor]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Count to 4."}], tokenize=False, add_generation_prompt=True
    )
    return dict(tokenizer(text, return_tensors="pt", add_special_tokens=False))


def logits_and_greedy(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """The prompt's logits, and 8 reference greedy tokens (full forwards without a KV cache)."""
    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits[:, -inputs["input_ids"].shape[1] :]
    return logits, reference_greedy(model, inputs["input_ids"][0].tolist(), 8)


def reload(method: str, tiny_base: Path, folder: Path) -> torch.nn.Module:
    base = load_base(str(tiny_base), four_bit=method == "qlora").model
    if method == "bottleneck":
        load_bottleneck(base, folder)
        return base
    if method == "bitfit":
        load_bitfit(base, folder)
        return base
    return PeftModel.from_pretrained(base, folder)


def served_greedy(method: str, tiny_base: Path, store: Path, prompt: list[int], n: int) -> list[int]:
    """The adapter store/<method>, served by a peftserve engine on the same (4-bit for QLoRA) base."""
    quantize = "nf4" if method == "qlora" else "none"
    settings = Settings.load({"model": str(tiny_base), "dtype": "float32", "quantize": quantize})
    engine = Engine(load_base_model(settings.model), EngineSettings(), AdapterSettings(), Store(store))
    params = SamplingParams(max_tokens=n, temperature=0.0)
    handle = engine.submit(prompt, params, engine.resolve_model(method))
    return token_ids(run_until_done(engine, [handle])[0])


@pytest.mark.parametrize(
    "method, targets",
    [(m, None) for m in METHODS] + [("lora", ["q_proj", "embed_tokens", "lm_head"])],
    ids=[*METHODS, "lora-embed_tokens-lm_head"],
)
def test_method_trains_and_reloads_with_the_same_outputs(
    method: str, targets: list[str] | None, tiny_base: Path, chat_data: Path, tmp_path
):
    """(The tiny base ties lm_head to the embeddings: embedding / lm_head LoRA on a tied base.)"""
    out = tmp_path / "store" / method
    cfg = make_config(
        data=chat_data,
        method=method,
        out=out,
        base=str(tiny_base),
        max_steps=12,
        batch_size=4,
        eval_every=4,
        lr=TEST_LR[method],
        patience=0,
        **({} if targets is None else {"target_modules": targets}),
    )
    base = load_base(str(tiny_base), four_bit=method == "qlora")
    inputs = prompt_ids(base.tokenizer)
    base_logits, _ = logits_and_greedy(base.model, inputs)

    outcome = run(cfg, base)

    losses = outcome.result.history.train_loss
    assert len(losses) == 12
    assert mean(losses[-3:]) < mean(losses[:3]) - 0.05
    assert {p.name for p in out.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "loss.png",
    }
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == PEFT_TYPES[method]
    assert load_file(out / "adapter_model.safetensors")  # safetensors, not pickle
    if method == "adalora":  # the budget pruned ranks, and the saved file holds only the kept ones
        assert json.loads((out / "adapter_config.json").read_text())["rank_pattern"]
        ranks = [t.shape[0] for n, t in load_file(out / "adapter_model.safetensors").items() if "lora_A" in n]
        assert min(ranks) < cfg.r and sum(ranks) < cfg.r * len(ranks)

    trained_logits, trained_tokens = logits_and_greedy(outcome.adapter.model, inputs)
    loaded_logits, loaded_tokens = logits_and_greedy(reload(method, tiny_base, out), inputs)
    assert not torch.allclose(trained_logits, base_logits, atol=1e-3), "the adapter changed nothing"
    torch.testing.assert_close(loaded_logits, trained_logits, atol=1e-5, rtol=1e-5)
    assert loaded_tokens == trained_tokens

    prompt = inputs["input_ids"][0].tolist()
    assert served_greedy(method, tiny_base, out.parent, prompt, 8) == loaded_tokens


def test_best_checkpoint_is_what_gets_saved(tiny_base: Path, chat_data: Path, tmp_path):
    """With a learning rate this high the eval loss bounces; the saved weights must be the best ones."""
    cfg = make_config(
        data=chat_data,
        method="lora",
        out=tmp_path / "adapter",
        base=str(tiny_base),
        max_steps=10,
        batch_size=4,
        eval_every=1,
        lr=0.3,
        patience=0,
        val_fraction=0.25,
    )
    base = load_base(str(tiny_base))
    result = run(cfg, base).result
    history = result.history
    assert result.best_eval_loss == min(history.eval_loss)
    assert result.best_step == history.eval_steps[history.eval_loss.index(result.best_eval_loss)]

    _, val_set, _ = load_data(cfg, base.tokenizer)  # the same seeded split as in training
    reloaded = PeftAdapter(reload("lora", tiny_base, cfg.out))
    saved_loss = evaluate(reloaded, val_set, cfg, base.tokenizer.pad_token_id)
    assert saved_loss == pytest.approx(result.best_eval_loss, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_default_model_adapter_reloads_with_the_same_greedy_tokens(method: str, tmp_path):
    """The real model, briefly: training runs, and the saved adapter reproduces the trained model."""
    cfg = make_config(
        data=EXAMPLES / "uppercase.jsonl",
        method=method,
        out=tmp_path / "adapter",
        max_steps=2,
        batch_size=4,
        val_fraction=0.0,
        lr=2e-3,
    )
    base = load_base("default", four_bit=method == "qlora")
    inputs = prompt_ids(base.tokenizer)
    base_logits, _ = logits_and_greedy(base.model, inputs)
    outcome = run(cfg, base)
    config = json.loads((cfg.out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"

    trained_logits, trained_tokens = logits_and_greedy(outcome.adapter.model, inputs)
    reloaded = PeftModel.from_pretrained(load_base("default", four_bit=method == "qlora").model, cfg.out)
    loaded_logits, loaded_tokens = logits_and_greedy(reloaded, inputs)
    assert not torch.allclose(trained_logits, base_logits, atol=1e-3)
    torch.testing.assert_close(loaded_logits, trained_logits, atol=1e-4, rtol=1e-4)
    assert loaded_tokens == trained_tokens
