"""Log-probabilities through the threaded engine: prompt (echo) and sampled tokens equal the log-softmax
of an uncached PEFT (or reference) forward, for every adapter kind in one mixed batch; rows that ask
for nothing get nothing; the prefix cache and preemption neither drop nor repeat any."""

from __future__ import annotations

import pytest
import torch

from server.config import AdapterSettings, EngineSettings
from server.engine.engine import Engine
from server.engine.kv_cache import bytes_per_token
from server.engine.request import Delta, Finished, InvalidRequest, PromptLogprobs, TokenLogprob
from server.engine.sampler import SamplingParams
from server.metrics import Metrics
from server.registry.store import Store
from tests.adapter_factory import reference_logprobs
from tests.helpers import wait_finished

KINDS = ["lora", "rslora", "dora", "ia3", "prompt", "ptuning", "prefix", "bottleneck"]
TOP = 3
NEW_TOKENS = 4
ATOL = 1e-4


def prompt_scores(events) -> list[tuple[TokenLogprob | None, ...]]:
    return [e.logprobs for e in events if isinstance(e, PromptLogprobs)]


def sampled_scores(events) -> list[TokenLogprob]:
    return [lp for e in events if isinstance(e, Delta) for lp in e.logprobs]


def check_against(reference: torch.Tensor, ids: list[int], scores, top: int) -> None:
    """Each entry i (token ids[i + 1]) against row i of the reference's (T, vocab) log-softmax."""
    for i, score in enumerate(scores):
        row = reference[i]
        assert score.token_id == ids[i + 1]
        assert score.logprob == pytest.approx(row[ids[i + 1]].item(), abs=ATOL), i
        values, best = row.topk(top)
        assert [t for t, _ in score.top] == best.tolist(), i
        assert [v for _, v in score.top] == pytest.approx(values.tolist(), abs=ATOL)


def test_every_kind_in_one_mixed_batch_equals_an_uncached_forward(tiny_model, tiny_model_dir, kinds_store):
    tok = tiny_model.tokenizer
    prompts = [tok(t).input_ids for t in ("The cat sat on the mat", "1 2 3 4 5")]
    engine = Engine(tiny_model, EngineSettings(block_size=4), AdapterSettings(), Store(kinds_store))
    scored = SamplingParams(
        max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=TOP, prompt_logprobs=TOP
    )
    plain = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    # Every model on both prompts, scored; and beside them, in the same batch, rows that ask for nothing.
    jobs = [(name, i, p) for i in range(len(prompts)) for name in [None, *KINDS] for p in (scored, plain)]
    engine.start()
    try:
        handles = [
            engine.submit(prompts[i], params, engine.resolve_model(name) if name else None)
            for name, i, params in jobs
        ]
        results = wait_finished(handles, timeout=300)
    finally:
        engine.stop()
    for (name, i, params), events in zip(jobs, results, strict=True):
        if params is plain:
            assert not prompt_scores(events) and not sampled_scores(events), name
            continue
        [prompt] = prompt_scores(events)
        assert prompt[0] is None and len(prompt) == len(prompts[i])
        generated = [t for e in events if isinstance(e, Delta) for t in e.token_ids]
        whole = prompts[i] + generated
        reference = reference_logprobs(tiny_model_dir, kinds_store / name if name else None, whole)
        check_against(reference, whole, prompt[1:], TOP)
        sampled = sampled_scores(events)
        assert len(sampled) == NEW_TOKENS
        check_against(reference[len(prompts[i]) - 1 :], whole[len(prompts[i]) - 1 :], sampled, TOP)
        # the sampled token is the greedy one
        assert all(s.token_id == s.top[0][0] for s in sampled), name


def test_prompt_logprobs_after_the_prefix_cache_holds_the_prompt(tiny_model, tiny_model_dir, kinds_store):
    """A prompt whose blocks are cached has no logits there: an echo request must compute them anyway."""
    prompt = tiny_model.tokenizer("one two three four five six seven eight nine ten eleven").input_ids
    engine = Engine(tiny_model, EngineSettings(block_size=4), AdapterSettings(), Store(kinds_store))
    engine.start()
    try:
        for name in (None, "prefix"):
            adapter = engine.resolve_model(name) if name else None
            wait_finished([engine.submit(prompt, SamplingParams(max_tokens=1, temperature=0.0), adapter)])
            echo = SamplingParams(max_tokens=0, prompt_logprobs=1)
            [events] = wait_finished([engine.submit(prompt, echo, adapter)])
            [scores] = prompt_scores(events)
            assert isinstance(events[-1], Finished) and events[-1].reason == "length"
            assert events[-1].completion_tokens == 0 and not sampled_scores(events)
            reference = reference_logprobs(tiny_model_dir, kinds_store / name if name else None, prompt)
            check_against(reference, prompt, scores[1:], 1)
    finally:
        engine.stop()


def test_preemption_neither_repeats_nor_drops_logprobs(tiny_model, kinds_store):
    # Room for 24 blocks of 4 tokens; 4 requests of 40 tokens each need 40: some must be preempted.
    per_block = 4 * bytes_per_token(tiny_model.shape, tiny_model.dtype)
    prompts = [[100 + i, 200, 300 + 7 * i, 400, 17, 18, 19, 20, 21, 22 + i] for i in range(4)]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, logprobs=2, prompt_logprobs=2)

    def run(memory: int | None, metrics: Metrics) -> list[list]:
        settings = EngineSettings(block_size=4, kv_cache_memory=memory)
        engine = Engine(tiny_model, settings, AdapterSettings(), Store(kinds_store), metrics)
        engine.start()
        try:
            return wait_finished(
                [
                    engine.submit(p, params, engine.resolve_model(n) if n else None)
                    for p, n in zip(prompts, [None, "lora", "prefix", "prompt"], strict=True)
                ],
                timeout=120,
            )
        finally:
            engine.stop()

    tight = Metrics()
    preempted, roomy = run(25 * per_block, tight), run(None, Metrics())
    assert tight.preemptions._value.get() > 0
    for events, expected in zip(preempted, roomy, strict=True):
        assert len(prompt_scores(events)) == 1 and len(sampled_scores(events)) == 30
        for got, want in zip(sampled_scores(events), sampled_scores(expected), strict=True):
            assert got.token_id == want.token_id
            assert got.logprob == pytest.approx(want.logprob, abs=ATOL)


def test_an_eos_that_ends_the_request_keeps_its_logprob(tiny_model):
    """lm-eval drops the last reported token of a max_tokens=1 request: it must be there, even an EOS."""
    eos = next(iter(tiny_model.eos_token_ids))
    lm_head = tiny_model.hf.lm_head.weight
    saved = lm_head[eos].clone()
    engine = Engine(tiny_model, EngineSettings())
    try:
        with torch.no_grad():
            lm_head[eos] = tiny_model.hf.model.norm.weight.sign() * 10  # EOS wins every position
        engine.start()
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=1, prompt_logprobs=1)
        [events] = wait_finished([engine.submit([5, 6, 7], params)])
    finally:
        engine.stop()
        with torch.no_grad():
            lm_head[eos] = saved
    assert events[-1].reason == "stop" and events[-1].completion_tokens == 1
    [score] = sampled_scores(events)
    assert score.token_id == eos and score.top[0][0] == eos
    assert all(not e.token_ids for e in events if isinstance(e, Delta))


@pytest.mark.parametrize(
    "params, param",
    [
        (SamplingParams(max_tokens=1, logprobs=21), "logprobs"),
        (SamplingParams(max_tokens=1, prompt_logprobs=-1), "prompt_logprobs"),
        (SamplingParams(max_tokens=-1), "max_tokens"),
    ],
)
def test_out_of_range_requests_are_refused(tiny_model, params, param):
    engine = Engine(tiny_model, EngineSettings())
    with pytest.raises(InvalidRequest) as error:
        engine.submit([1, 2, 3], params)
    assert error.value.param == param
