"""lm-evaluation-harness against a live server: `local-completions` scores the shipped multiple-choice
task through /v1/completions (echo + logprobs) for the base and for an adapter, and gets what lm-eval's
own `hf` model gets on the same weights (with `peft=` for the adapter)."""

from __future__ import annotations

import json

import pytest

from eval.run import DEFAULT_TASK, hf_scores, loglikelihoods, main, metrics_of, served_scores
from tests.adapter_factory import make_peft_adapter
from tests.conftest import LiveServer, tiny_settings


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("eval-store")
    make_peft_adapter(tiny_model_dir, "lora", root / "tuned", seed=3)
    return root


@pytest.mark.slow  # four lm-eval runs
def test_served_scores_equal_lm_evals_hf_model(tiny_model_dir, tiny_model, store):
    with LiveServer(tiny_settings(tiny_model_dir, store=str(store)), tiny_model) as server:
        served = {
            name: served_scores(server.url, name, tiny_model_dir, [DEFAULT_TASK])
            for name in (tiny_model.name, "tuned")
        }
    reference = {
        tiny_model.name: hf_scores(tiny_model_dir, [DEFAULT_TASK]),
        "tuned": hf_scores(tiny_model_dir, [DEFAULT_TASK], peft=store / "tuned"),
    }
    for name in served:
        ours, theirs = served[name], reference[name]
        assert len(loglikelihoods(ours, DEFAULT_TASK)) == 80  # 20 questions, 4 choices each
        assert loglikelihoods(ours, DEFAULT_TASK) == pytest.approx(
            loglikelihoods(theirs, DEFAULT_TASK), abs=1e-3
        )
        assert metrics_of(ours, DEFAULT_TASK) == metrics_of(theirs, DEFAULT_TASK), name
    # the adapter changes what the model believes
    assert loglikelihoods(served["tuned"], DEFAULT_TASK) != pytest.approx(
        loglikelihoods(served[tiny_model.name], DEFAULT_TASK), abs=1e-3
    )


def test_make_eval_prints_the_base_beside_the_adapter(tiny_model_dir, tiny_model, store, tmp_path, capsys):
    out = tmp_path / "scores.json"
    with LiveServer(tiny_settings(tiny_model_dir, store=str(store)), tiny_model) as server:
        args = ["--url", server.url, "--adapter", "tuned", "--tokenizer", str(tiny_model_dir)]
        assert main([*args, "--limit", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert DEFAULT_TASK in printed and "tuned" in printed and tiny_model.name in printed
    scores = json.loads(out.read_text())
    assert set(scores) == {tiny_model.name, "tuned"} and set(scores["tuned"][DEFAULT_TASK]) == {
        "acc",
        "acc_norm",
    }
