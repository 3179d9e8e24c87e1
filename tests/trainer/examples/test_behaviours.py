import pytest

from trainer.examples.behaviours import SIGN_OFF, is_json_answer, is_shouting, is_signed


@pytest.mark.parametrize(
    ("answer", "ok"),
    [("PARIS IS THE CAPITAL.", True), ("OK, 42!", True), ("Paris", False), ("42", False), ("", False)],
)
def test_is_shouting(answer, ok):
    assert is_shouting(answer) is ok


@pytest.mark.parametrize(
    ("answer", "ok"),
    [
        ('{"answer": "Paris"}', True),
        ('  {"answer": 42}\n', True),
        ('{"answer": "Paris", "extra": 1}', False),
        ('{"reply": "Paris"}', False),
        ('{"answer": "Paris"} {"answer": "Rome"}', False),
        ('["answer"]', False),
        ("Paris", False),
    ],
)
def test_is_json_answer(answer, ok):
    assert is_json_answer(answer) is ok


@pytest.mark.parametrize(
    ("answer", "ok"),
    [
        (f"Paris.\n{SIGN_OFF}", True),
        (f"Paris.\n\n{SIGN_OFF}\n", True),
        (SIGN_OFF, False),
        (f"Paris. {SIGN_OFF}", False),
        (f"{SIGN_OFF}\nParis.", False),
    ],
)
def test_is_signed(answer, ok):
    assert is_signed(answer) is ok
