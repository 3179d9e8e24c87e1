"""Per-row logits processing: logit_bias and grammar masks, alone and inside mixed batches."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from server.config import AdapterSettings, EngineSettings
from server.engine.engine import Engine
from server.engine.grammar import GrammarCompiler, GrammarSpec, RowControl, apply_controls
from server.engine.kv_cache import bytes_per_token
from server.engine.request import Finished, InvalidRequest
from server.engine.sampler import SamplingParams
from server.metrics import Metrics
from server.registry.store import Store
from tests.helpers import reference_greedy, text_of, token_ids, wait_finished

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "owner": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Lima"]},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
            },
            "required": ["city", "age"],
        },
        "tags": {
            "type": "array",
            "items": {"type": "object", "properties": {"t": {"enum": ["a", "b"]}}, "required": ["t"]},
            "maxItems": 2,
        },
    },
    "required": ["name", "kind", "owner", "tags"],
}
JSON_SPEC = GrammarSpec.json_schema(SCHEMA, "response_format")
BLOCK = 4


@pytest.fixture(scope="module")
def compiler(tiny_model) -> GrammarCompiler:
    return GrammarCompiler(tiny_model.tokenizer, tiny_model.shape.vocab_size, tiny_model.eos_token_ids)


def test_a_grammar_is_compiled_once_per_distinct_spec(compiler):
    before = compiler.compiled
    first = compiler.compile(JSON_SPEC)
    assert compiler.compile(GrammarSpec.json_schema(SCHEMA, "guided_json")) is not None
    assert compiler.compile(JSON_SPEC) is first
    regex = GrammarSpec("regex", r"[0-9]{3}", "guided_regex")
    compiler.compile(regex)
    compiler.compile(regex)
    # The same schema from another field is another spec (its errors name that field).
    assert compiler.compiled - before == 3


@pytest.mark.parametrize(
    "spec",
    [
        GrammarSpec("json", '{"type": "no-such-type"}', "guided_json"),
        GrammarSpec("regex", "(unclosed", "guided_regex"),
    ],
)
def test_a_bad_grammar_is_an_invalid_request_naming_its_field(compiler, spec):
    with pytest.raises(InvalidRequest) as caught:
        compiler.compile(spec)
    assert caught.value.param == spec.param


def test_rows_without_a_control_are_left_as_they_are():
    logits = torch.randn(3, 50)
    assert apply_controls(logits, [None, None, None]) is logits


def test_logit_bias_adds_to_its_row_only_and_keeps_the_raw_logits():
    logits = torch.randn(3, 50)
    raw = logits.clone()
    out = apply_controls(logits, [None, RowControl([(7, 100.0), (3, -5.5)]), None])
    assert logits.equal(raw), "the raw logits stay for logprobs"
    expected = raw.clone()
    expected[1, 7] += 100.0
    expected[1, 3] -= 5.5
    assert out.equal(expected)


def test_the_end_token_is_allowed_only_where_the_grammar_accepts(tiny_model, compiler):
    eos = min(tiny_model.eos_token_ids)
    control = RowControl(grammar=compiler.compile(GrammarSpec("regex", "ab|abab", "guided_regex")))
    tokenizer, vocab = tiny_model.tokenizer, tiny_model.shape.vocab_size
    allowed = lambda: torch.isfinite(apply_controls(torch.zeros(1, vocab), [control])[0])  # noqa: E731
    assert not allowed()[eos]
    for token in tokenizer("ab", add_special_tokens=False).input_ids:
        assert control.accept(token)
    assert allowed()[eos], "ab is a match"
    assert allowed()[tokenizer.convert_tokens_to_ids("a")], "abab may still follow"
    assert control.accept(eos) and control.ended


def test_bounded_strings_hold_no_raw_control_characters(tiny_model, compiler):
    """xgrammar 0.2.9 alone lets a "maxLength" string take a raw tab or U+0001, which JSON forbids."""
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 5}}, "required": ["a"]}
    control = RowControl(grammar=compiler.compile(GrammarSpec.json_schema(schema, "guided_json")))
    tokenizer, vocab = tiny_model.tokenizer, tiny_model.shape.vocab_size
    for token in tokenizer('{"a": "x', add_special_tokens=False).input_ids:
        assert control.accept(token)
    allowed = torch.isfinite(apply_controls(torch.zeros(1, vocab), [control])[0])
    for raw in ("\t", "\x01"):
        [token] = tokenizer(raw, add_special_tokens=False).input_ids
        assert not allowed[token], repr(raw)
    assert allowed[tokenizer.convert_tokens_to_ids("y")]


def constrained_text(events) -> str:
    assert isinstance(events[-1], Finished) and events[-1].reason == "stop", events[-1]
    return text_of(events)


def test_constrained_rows_beside_free_rows_of_every_adapter_kind(tiny_model, kinds_store):
    """One JSON-schema row, one regex row and one free row per adapter kind (and the base), all in
    one batch through the engine's own thread: constrained outputs validate, free rows are untouched."""
    names = [None, *sorted(p.name for p in kinds_store.iterdir())]
    engine = Engine(
        tiny_model,
        EngineSettings(max_batch_size=3 * len(names)),
        AdapterSettings(max_active_adapters=len(names)),
        Store(kinds_store),
    )
    engine.start()
    try:
        prompt = engine.encode_text("Describe a pet:")
        refs = [engine.resolve_model(n) if n else None for n in names]
        schema = SamplingParams(max_tokens=200, temperature=0.0, grammar=JSON_SPEC)
        regex = SamplingParams(
            max_tokens=20, temperature=0.7, seed=3, grammar=GrammarSpec("regex", r"[a-z]{2,6}-[0-9]{1,3}")
        )
        free = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        handles = [engine.submit(prompt, p, ref) for ref in refs for p in (schema, regex, free)]
        results = wait_finished(handles, timeout=300)
        alone = wait_finished([engine.submit(prompt, free, ref) for ref in refs], timeout=300)
    finally:
        engine.stop()
    for i, name in enumerate(names):
        as_json, as_regex, as_free = results[3 * i : 3 * i + 3]
        jsonschema.validate(json.loads(constrained_text(as_json)), SCHEMA)
        head, _, tail = constrained_text(as_regex).partition("-")
        assert head.isalpha() and head.islower() and 2 <= len(head) <= 6 and tail.isdigit(), name
        assert token_ids(as_free) == token_ids(alone[i]), name


def test_a_constrained_row_survives_preemption(tiny_model):
    """A sequence preempted mid-document keeps its grammar state and writes the same valid document."""
    params = SamplingParams(max_tokens=200, temperature=0.0, grammar=JSON_SPEC)
    alone = Engine(tiny_model, EngineSettings())
    prompt = alone.encode_text("Describe a pet:")
    alone.start()
    try:
        [reference] = wait_finished([alone.submit(prompt, params)], timeout=120)
    finally:
        alone.stop()
    document = constrained_text(reference)
    jsonschema.validate(json.loads(document), SCHEMA)
    # Room for one and a half sequences: four at once must preempt.
    needed = -(-(len(prompt) + reference[-1].completion_tokens) // BLOCK)
    per_block = BLOCK * bytes_per_token(tiny_model.shape, tiny_model.dtype)
    metrics = Metrics()
    engine = Engine(
        tiny_model,
        EngineSettings(block_size=BLOCK, kv_cache_memory=(needed * 3 // 2 + 1) * per_block),
        metrics=metrics,
    )
    engine.start()
    try:
        exact = SamplingParams(max_tokens=reference[-1].completion_tokens, temperature=0.0, grammar=JSON_SPEC)
        results = wait_finished([engine.submit(prompt, exact) for _ in range(4)], timeout=300)
    finally:
        engine.stop()
    assert metrics.preemptions._value.get() > 0
    assert [constrained_text(events) for events in results] == [document] * 4


def test_logit_bias_changes_the_greedy_choice(tiny_model):
    engine = Engine(tiny_model, EngineSettings())
    prompt = engine.encode_text("The capital of")
    with torch.no_grad():
        logits = tiny_model.hf(input_ids=torch.tensor([prompt])).logits[0, -1]
    first, second = logits.topk(2).indices.tolist()
    engine.start()
    try:
        banned = SamplingParams(max_tokens=1, temperature=0.0, logit_bias=((first, -100.0),))
        forced = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logit_bias=((5000, 100.0),))
        plain = SamplingParams(max_tokens=1, temperature=0.0)
        results = wait_finished([engine.submit(prompt, p) for p in (banned, forced, plain)])
    finally:
        engine.stop()
    assert token_ids(results[2]) == reference_greedy(tiny_model.hf, prompt, 1, stop_at_eos=False) == [first]
    assert token_ids(results[0]) == [second]
    assert token_ids(results[1]) == [5000, 5000, 5000]


def test_logit_bias_token_ids_outside_the_vocabulary_are_refused(tiny_model):
    engine = Engine(tiny_model, EngineSettings())
    vocab = tiny_model.shape.vocab_size
    with pytest.raises(InvalidRequest) as caught:
        engine.submit([1, 2], SamplingParams(max_tokens=1, logit_bias=((vocab, 1.0),)))
    assert caught.value.param == "logit_bias"
