import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.trainer.conftest import chat_rows, write_jsonl
from trainer.data import (
    IGNORE_INDEX,
    collate,
    encode,
    load_examples,
    parse_line,
    read_records,
    split_examples,
)
from trainer.errors import DataError


@pytest.fixture(scope="module")
def tokenizer(tiny_base: Path):
    return AutoTokenizer.from_pretrained(tiny_base)


def labelled_text(tokenizer, example) -> str:
    return tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    )


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say one."},
    {"role": "assistant", "content": "ONE"},
    {"role": "user", "content": "Say two."},
    {"role": "assistant", "content": "TWO"},
]


def test_chat_loss_covers_assistant_turns_only(tokenizer):
    example = encode(parse_line(json.dumps({"messages": CONVERSATION}), line=1), tokenizer, max_length=512)
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert labelled_text(tokenizer, example) == "ONE<|im_end|>\nTWO<|im_end|>\n"


def test_completion_loss_covers_completion_and_eos(tokenizer):
    record = parse_line(json.dumps({"prompt": "Q: two plus two?\nA:", "completion": " four"}), line=3)
    example = encode(record, tokenizer, max_length=512)
    assert labelled_text(tokenizer, example) == " four" + tokenizer.eos_token
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example.input_ids).startswith("Q: two plus two?\nA:")


def test_truncation_keeps_the_start(tokenizer):
    record = parse_line(json.dumps({"prompt": "a", "completion": " b" * 100}), line=1)
    example = encode(record, tokenizer, max_length=16)
    assert len(example.input_ids) == len(example.labels) == 16


def test_lines_without_answer_tokens_after_truncation_are_dropped(tokenizer, tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": "word " * 50, "completion": " x"}, {"prompt": "hi", "completion": " there"}],
    )
    examples = load_examples(path, tokenizer, max_length=20)
    assert [ex.line for ex in examples] == [2]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"prompt": "a"}', "expected the keys messages, or prompt and completion; got prompt"),
        ('{"prompt": "a", "completion": 3}', '"completion" must be a string'),
        ('{"prompt": "a", "completion": ""}', '"completion" is empty'),
        ('{"messages": []}', '"messages" must be a non-empty list'),
        (
            '{"messages": [{"role": "user"}]}',
            'messages[0] must be an object with exactly "role" and "content"',
        ),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "messages[0] has role 'bot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
        ('{"messages": [{"role": "user", "content": ["x"]}]}', 'messages[0] "content" must be a string'),
        ('{"messages": [], "id": 1}', "got id, messages"),
    ],
)
def test_bad_lines_say_what_is_wrong(line, message):
    with pytest.raises(ValueError) as info:
        parse_line(line, line=1)
    assert message in str(info.value)


def test_bad_lines_are_reported_with_their_line_numbers(tmp_path):
    good = json.dumps(chat_rows(1)[0])
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([good, "{oops", good, "", '{"prompt": "p"}', good]) + "\n")
    with pytest.raises(DataError) as info:
        read_records(path)
    text = str(info.value)
    assert f"{path}:2: not valid JSON" in text
    assert f"{path}:5: expected the keys" in text
    assert ":1:" not in text and ":3:" not in text and ":6:" not in text


def test_blank_lines_are_skipped_but_an_empty_file_is_an_error(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n\n" + json.dumps(chat_rows(1)[0]) + "\n\n")
    assert [r.line for r in read_records(path)] == [3]
    path.write_text("\n")
    with pytest.raises(DataError, match="no data lines"):
        read_records(path)


def test_split_is_seeded_and_disjoint(tokenizer, tmp_path):
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl", chat_rows(20)), tokenizer, 512)
    train_a, val_a = split_examples(examples, 0.25, seed=1)
    _, val_b = split_examples(examples, 0.25, seed=1)
    _, val_c = split_examples(examples, 0.25, seed=2)
    assert [e.line for e in val_a] == [e.line for e in val_b] != [e.line for e in val_c]
    assert len(val_a) == 5 and len(train_a) == 15
    assert {e.line for e in train_a}.isdisjoint(e.line for e in val_a)
    assert split_examples(examples, 0.0, seed=1) == (examples, [])


def test_collate_pads_right_and_masks_padding(tokenizer, tmp_path):
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl", chat_rows(3)), tokenizer, 512)
    batch = collate(examples, pad_id=0)
    lengths = [len(e.input_ids) for e in examples]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, n in enumerate(lengths):
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["labels"][row, :n].tolist() == examples[row].labels
