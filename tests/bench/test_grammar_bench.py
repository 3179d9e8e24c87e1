"""bench/bench_grammar.py's mask walk: every grammar engine accepts the same document token by token."""

from __future__ import annotations

import json

import jsonschema
import pytest

from bench.bench_grammar import DOCUMENT, ENGINES, SCHEMA, masks


@pytest.mark.slow  # outlines-core builds an index over the whole vocabulary
def test_every_engine_walks_the_whole_document(tiny_model_dir, tiny_model):
    jsonschema.validate(json.loads(DOCUMENT), SCHEMA)
    results = masks(tiny_model_dir, tiny_model.shape.vocab_size)
    assert set(results) == set(ENGINES), "the dev extra installs all three"
    tokens = len(tiny_model.tokenizer(DOCUMENT, add_special_tokens=False).input_ids)
    for figures in results.values():
        assert figures["tokens"] == tokens
        assert 0 < figures["mask_us_mean"] <= figures["mask_us_max"]
