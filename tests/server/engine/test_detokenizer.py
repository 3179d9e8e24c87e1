"""Incremental text and stop strings, with the default model's real tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from server.engine.detokenizer import Detokenizer


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


def stream(tokenizer, text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], Detokenizer]:
    prompt = tokenizer("Say something:").input_ids
    detok = Detokenizer(tokenizer, prompt, stop)
    pieces = []
    for token in tokenizer(text, add_special_tokens=False).input_ids:
        pieces.append(detok.add(token))
        if detok.stopped:
            break
    pieces.append(detok.finish())
    return pieces, detok


@pytest.mark.parametrize(
    "text", ["Hello world, how are you?", "naïve café — 日本語 🎉 ok", "  spaced\n\nlines\t"]
)
def test_pieces_add_up_to_the_decoded_text(tokenizer, text):
    pieces, _ = stream(tokenizer, text)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stop_string_truncates_and_is_never_released(tokenizer):
    pieces, detok = stream(tokenizer, "The answer is 42. END of story", stop=("END",))
    assert "".join(pieces) == "The answer is 42. "
    assert detok.stopped


def test_partial_stop_string_is_held_back_until_ruled_out(tokenizer):
    detok = Detokenizer(tokenizer, [], ("STOPPING",))
    released = ""
    for token in tokenizer("Go STOP now", add_special_tokens=False).input_ids:
        released += detok.add(token)
        assert "STOP" not in released or "now" in released
    released += detok.finish()
    assert released == "Go STOP now"
    assert not detok.stopped


def test_earliest_of_several_stop_strings_wins(tokenizer):
    pieces, _ = stream(tokenizer, "alpha beta gamma delta", stop=("delta", "beta"))
    assert "".join(pieces) == "alpha "
