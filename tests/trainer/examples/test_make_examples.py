import json

from trainer.examples.behaviours import BEHAVIOURS
from trainer.examples.make_examples import HELDOUT_FILE, HERE, write_examples


def test_committed_files_are_what_the_generator_writes(tmp_path):
    for path in write_examples(tmp_path):
        assert path.read_bytes() == (HERE / path.name).read_bytes(), f"{path.name}: rerun make_examples"


def test_datasets_teach_their_behaviour_on_a_few_hundred_lines():
    heldout = set(HELDOUT_FILE.read_text().splitlines())
    assert len(heldout) == 30
    for behaviour in BEHAVIOURS:
        rows = [json.loads(line) for line in (HERE / f"{behaviour.name}.jsonl").read_text().splitlines()]
        assert 200 <= len(rows) <= 500
        messages = [m for row in rows for m in row["messages"]]
        assert all(behaviour.check(m["content"]) for m in messages if m["role"] == "assistant")
        assert heldout.isdisjoint(m["content"] for m in messages if m["role"] == "user")
