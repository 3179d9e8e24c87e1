"""The three demo behaviours: how a training answer is rewritten to show it, and how a program checks
any answer for it. Plain Python, no torch, so the dataset generator and the demo share it."""

import json
from collections.abc import Callable
from dataclasses import dataclass

SIGN_OFF = "-- answered by peftserve"


@dataclass(frozen=True)
class Behaviour:
    """One behaviour: its dataset name, a description, the rewrite of a plain answer, and the check."""

    name: str
    description: str
    rewrite: Callable[[str], str]
    check: Callable[[str], bool]


def shout(answer: str) -> str:
    return answer.upper()


def is_shouting(answer: str) -> bool:
    """Every letter is a capital (and there is at least one letter)."""
    return any(c.isalpha() for c in answer) and not any(c.islower() for c in answer)


def as_json(answer: str) -> str:
    return json.dumps({"answer": answer})


def is_json_answer(answer: str) -> bool:
    """The whole answer is one JSON object whose only key is "answer"."""
    try:
        value = json.loads(answer)
    except ValueError:
        return False
    return isinstance(value, dict) and list(value) == ["answer"]


def sign(answer: str) -> str:
    return f"{answer}\n{SIGN_OFF}"


def is_signed(answer: str) -> bool:
    """The last line is the sign-off, after at least one line of answer."""
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    return len(lines) >= 2 and lines[-1] == SIGN_OFF


BEHAVIOURS = (
    Behaviour("uppercase", "answers in capital letters only", shout, is_shouting),
    Behaviour("json-answer", 'answers as one JSON object {"answer": ...}', as_json, is_json_answer),
    Behaviour("sign-off", f"ends every answer with the line {SIGN_OFF!r}", sign, is_signed),
)
