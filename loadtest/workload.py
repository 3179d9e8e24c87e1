"""The load test's workload and its per-request record, free of locust so that tests and the report
can import it (importing locust monkey-patches the whole process with gevent)."""

from __future__ import annotations

import csv
import json
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import astuple, dataclass, fields
from itertools import accumulate
from pathlib import Path
from typing import Any, TextIO

DEFAULT_PROMPTS = Path(__file__).with_name("prompts.txt")
# The workload's defaults, shared by the locustfile's flags and loadtest.run's.
DEFAULT_ZIPF_S = 1.0
DEFAULT_MIN_TOKENS = 16
DEFAULT_MAX_TOKENS = 64
DEFAULT_SEED = 0


def load_prompts(path: Path = DEFAULT_PROMPTS) -> list[str]:
    """One user message per line; blank lines and `#` comments are skipped."""
    lines = (line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one per line; # starts a comment)")
    return prompts


def zipf_probabilities(population: int, s: float) -> list[float]:
    """P(rank k) for k = 1..population, proportional to 1/k^s; s = 0 is uniform."""
    if population < 1:
        raise ValueError("a Zipf law needs at least one item")
    if s < 0:
        raise ValueError(f"the Zipf exponent must be >= 0, got {s}")
    weights = [1.0 / k**s for k in range(1, population + 1)]
    total = sum(weights)
    return [w / total for w in weights]


class ZipfChooser:
    """Draws names by rank: the first name is rank 1, the most likely one when s > 0."""

    def __init__(self, names: Sequence[str], s: float, rng: random.Random) -> None:
        self.names = list(names)
        self.probabilities = zipf_probabilities(len(self.names), s)
        self._cumulative = list(accumulate(self.probabilities))
        self._rng = rng

    def choose(self) -> str:
        return self._rng.choices(self.names, cum_weights=self._cumulative)[0]


def served_models(models: dict[str, Any]) -> tuple[str, list[str]]:
    """(base model id, adapter ids sorted by name) from a `GET /v1/models` payload.

    Sorting makes the Zipf ranks reproducible: rank 1 is the alphabetically first adapter."""
    entries = models.get("data", [])
    bases = [m["id"] for m in entries if m.get("parent") is None]
    if not bases:
        raise ValueError("/v1/models lists no base model (an entry with parent null)")
    return bases[0], sorted(m["id"] for m in entries if m.get("parent") is not None)


@dataclass
class Workload:
    """What every simulated user draws its next request from."""

    chooser: ZipfChooser
    prompts: list[str]
    min_tokens: int
    max_tokens: int
    rng: random.Random

    def __post_init__(self) -> None:
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"need 1 <= min tokens <= max tokens, got {self.min_tokens} and {self.max_tokens}"
            )

    def next_request(self) -> dict[str, Any]:
        """A streaming chat request body for a Zipf-drawn model."""
        return {
            "model": self.chooser.choose(),
            "messages": [{"role": "user", "content": self.rng.choice(self.prompts)}],
            "max_tokens": self.rng.randint(self.min_tokens, self.max_tokens),
            # Every request generates exactly max_tokens, so the drawn range is the output length.
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }


class StreamError(Exception):
    """The server answered, but not with a well-formed, successful chat stream."""


@dataclass
class StreamResult:
    first_token: float  # clock time of the first chunk with text (or of the finish, if none had text)
    finish_reason: str
    completion_tokens: int


def read_chat_stream(
    lines: Iterable[bytes | str], clock: Callable[[], float] = time.perf_counter
) -> StreamResult:
    """Consume an OpenAI chat SSE stream and check its shape: the role comes first, one choice
    finishes, a usage chunk follows, `[DONE]` ends it. Raises StreamError on anything else."""
    first_token = None
    finish_reason = None
    usage = None
    saw_role = False
    for raw in lines:
        line = raw.decode() if isinstance(raw, bytes) else raw
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ").strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise StreamError(f"error in stream: {chunk['error'].get('message', chunk['error'])}")
        for choice in chunk.get("choices", []):
            delta = choice.get("delta", {})
            saw_role = saw_role or delta.get("role") == "assistant"
            if not saw_role:
                raise StreamError("the first delta did not carry the assistant role")
            if first_token is None and (delta.get("content") or choice.get("finish_reason")):
                first_token = clock()
            finish_reason = choice.get("finish_reason") or finish_reason
        usage = chunk.get("usage") or usage
    else:
        raise StreamError("the stream ended without data: [DONE]")
    if finish_reason is None or first_token is None:
        raise StreamError("the stream ended without a finish_reason")
    if usage is None:
        raise StreamError("the stream carried no usage chunk")
    return StreamResult(first_token, finish_reason, int(usage["completion_tokens"]))


@dataclass
class RequestRecord:
    """One finished request, as a row of the `<prefix>_requests.csv` the locustfile writes."""

    started: float  # unix time the request was sent
    model: str
    ok: bool
    ttft_ms: float  # 0 when the request failed
    e2e_ms: float
    output_tokens: int
    error: str

    @property
    def first_token(self) -> float:
        return self.started + self.ttft_ms / 1000

    @property
    def finished(self) -> float:
        return self.started + self.e2e_ms / 1000


REQUEST_FIELDS = [f.name for f in fields(RequestRecord)]


class RequestLog:
    """Appends RequestRecords to a CSV file as they finish, so a cut-short run keeps its rows."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = path.open("w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        self._writer.writerow(REQUEST_FIELDS)

    def write(self, record: RequestRecord) -> None:
        row = list(astuple(record))
        row[REQUEST_FIELDS.index("ok")] = int(record.ok)
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_requests(path: Path) -> list[RequestRecord]:
    with Path(path).open(newline="", encoding="utf-8") as file:
        return [
            RequestRecord(
                started=float(row["started"]),
                model=row["model"],
                ok=row["ok"] == "1",
                ttft_ms=float(row["ttft_ms"]),
                e2e_ms=float(row["e2e_ms"]),
                output_tokens=int(row["output_tokens"]),
                error=row["error"],
            )
            for row in csv.DictReader(file)
        ]
