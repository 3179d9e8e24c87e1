"""The locustfile's workload: prompts, the Zipf adapter choice, request bodies, stream checks, the
per-request log."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from loadtest.workload import (
    DEFAULT_PROMPTS,
    RequestLog,
    RequestRecord,
    StreamError,
    Workload,
    ZipfChooser,
    load_prompts,
    read_chat_stream,
    read_requests,
    served_models,
    zipf_probabilities,
)


def test_the_shipped_prompt_set_loads():
    prompts = load_prompts()
    assert len(prompts) >= 50
    assert len(set(prompts)) == len(prompts)
    assert not any(p.startswith("#") or not p.strip() for p in prompts)
    assert DEFAULT_PROMPTS.read_text().count("\n") > len(prompts)  # the comments were skipped


def test_a_prompt_file_without_prompts_is_refused(tmp_path: Path):
    path = tmp_path / "prompts.txt"
    path.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(path)


def test_zipf_probabilities_follow_one_over_k_to_the_s():
    assert zipf_probabilities(4, 0.0) == pytest.approx([0.25] * 4)
    harmonic = 1 + 1 / 2 + 1 / 3
    assert zipf_probabilities(3, 1.0) == pytest.approx([1 / harmonic, 1 / 2 / harmonic, 1 / 3 / harmonic])
    assert zipf_probabilities(2, 2.0) == pytest.approx([0.8, 0.2])
    with pytest.raises(ValueError):
        zipf_probabilities(3, -1.0)
    with pytest.raises(ValueError):
        zipf_probabilities(0, 1.0)


def draw(names: list[str], s: float, count: int) -> Counter[str]:
    chooser = ZipfChooser(names, s, random.Random(1))
    return Counter(chooser.choose() for _ in range(count))


def test_s_zero_chooses_uniformly():
    names = [f"a{i}" for i in range(5)]
    counts = draw(names, 0.0, 50_000)
    assert set(counts) == set(names)
    # 3 standard deviations of a binomial(50000, 0.2) share is about 0.0054.
    assert all(abs(counts[n] / 50_000 - 0.2) < 0.006 for n in names)


def test_s_one_chooses_rank_k_with_probability_one_over_k():
    names = [f"lora-{i:02d}" for i in range(8)]
    counts = draw(names, 1.0, 100_000)
    shares = [counts[n] / 100_000 for n in names]
    harmonic = sum(1 / k for k in range(1, 9))
    for k, share in enumerate(shares, start=1):
        assert share == pytest.approx(1 / k / harmonic, abs=0.006)
    # Rank 1 is drawn about twice as often as rank 2 and four times as often as rank 4.
    assert shares[0] / shares[1] == pytest.approx(2, rel=0.06)
    assert shares[0] / shares[3] == pytest.approx(4, rel=0.08)


def test_served_models_ranks_adapters_by_name():
    payload = {
        "data": [
            {"id": "base", "parent": None},
            {"id": "lora-10", "parent": "base"},
            {"id": "lora-02", "parent": "base"},
        ]
    }
    assert served_models(payload) == ("base", ["lora-02", "lora-10"])
    with pytest.raises(ValueError, match="no base model"):
        served_models({"data": []})


def test_requests_draw_model_prompt_and_length_from_the_workload():
    workload = Workload(
        chooser=ZipfChooser(["x", "y"], 1.0, random.Random(0)),
        prompts=["p1", "p2"],
        min_tokens=3,
        max_tokens=5,
        rng=random.Random(0),
    )
    bodies = [workload.next_request() for _ in range(200)]
    assert {b["model"] for b in bodies} == {"x", "y"}
    assert {b["max_tokens"] for b in bodies} == {3, 4, 5}
    assert {b["messages"][0]["content"] for b in bodies} == {"p1", "p2"}
    assert all(b["stream"] and b["ignore_eos"] and b["stream_options"]["include_usage"] for b in bodies)


def test_a_workload_with_an_empty_token_range_is_refused():
    with pytest.raises(ValueError, match="min tokens"):
        Workload(ZipfChooser(["x"], 1.0, random.Random(0)), ["p"], 8, 4, random.Random(0))


def sse(*chunks: dict | str) -> list[bytes]:
    """SSE lines as requests' iter_lines yields them: data lines separated by empty ones."""
    lines = []
    for chunk in chunks:
        lines += [f"data: {chunk if isinstance(chunk, str) else json.dumps(chunk)}".encode(), b""]
    return lines


def choice(delta: dict, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": None}


GOOD_STREAM = [
    choice({"role": "assistant", "content": ""}),
    choice({"content": "Hel"}),
    choice({"content": "lo"}),
    choice({}, "length"),
    {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}},
    "[DONE]",
]


def test_a_good_stream_gives_first_token_time_and_usage():
    ticks = iter(range(100, 200))
    result = read_chat_stream(sse(*GOOD_STREAM), clock=lambda: next(ticks))
    # The role chunk is sent before any token: the first token is the first chunk with text.
    assert result.first_token == 100
    assert result.finish_reason == "length"
    assert result.completion_tokens == 2


@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        (GOOD_STREAM[:-1], r"\[DONE\]"),
        ([GOOD_STREAM[0], {"error": {"message": "boom"}}, "[DONE]"], "boom"),
        ([choice({"content": "x"}), *GOOD_STREAM[3:]], "role"),
        ([*GOOD_STREAM[:3], GOOD_STREAM[4], "[DONE]"], "finish_reason"),
        ([*GOOD_STREAM[:4], "[DONE]"], "usage"),
    ],
    ids=["no-done", "error-chunk", "no-role", "no-finish", "no-usage"],
)
def test_a_broken_stream_is_a_failure(chunks: list, message: str):
    with pytest.raises(StreamError, match=message):
        read_chat_stream(sse(*chunks))


def test_the_request_log_reads_back_what_was_written(tmp_path: Path):
    records = [
        RequestRecord(1000.5, "lora-00", True, 120.25, 900.0, 32, ""),
        RequestRecord(1001.0, "lora-01", False, 0.0, 50.0, 0, "HTTP 429: queue full"),
    ]
    log = RequestLog(tmp_path / "sub" / "x_requests.csv")
    for record in records:
        log.write(record)
    log.close()
    assert read_requests(tmp_path / "sub" / "x_requests.csv") == records
    assert records[0].first_token == pytest.approx(1000.62025)
    assert records[0].finished == pytest.approx(1001.4)
