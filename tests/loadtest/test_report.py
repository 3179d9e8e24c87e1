"""The load test's summary numbers and summary.png, from a small fake per-request CSV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loadtest.report import (
    bucket_edges,
    draw_summary,
    format_summary,
    requests_series,
    summarize,
    throughput_series,
    ttft_series,
)
from loadtest.workload import RequestRecord, read_requests

# started, model, ok, ttft_ms, e2e_ms, output_tokens, error
FAKE_CSV = """\
started,model,ok,ttft_ms,e2e_ms,output_tokens,error
100.0,lora-00,1,100.0,2100.0,20,
100.5,lora-00,1,300.0,4300.0,40,
101.0,lora-01,1,200.0,1200.0,10,
103.0,lora-00,0,0.0,10.0,0,HTTP 429: queue full
104.0,lora-02,1,500.0,6000.0,55,
108.0,lora-00,1,400.0,2000.0,16,
"""


@pytest.fixture
def records(tmp_path: Path) -> list[RequestRecord]:
    path = tmp_path / "locust_requests.csv"
    path.write_text(FAKE_CSV)
    return read_requests(path)


def test_summary_counts_rates_and_percentiles(records):
    summary = summarize(records)
    assert (summary.requests, summary.failures) == (6, 1)
    assert summary.window_s == pytest.approx(10.0)  # 100.0 -> 110.0 (108 + 2 s)
    assert summary.output_tokens == 141
    assert summary.tokens_per_s == pytest.approx(14.1)
    assert summary.requests_per_s == pytest.approx(0.5)
    assert summary.ttft_ms == pytest.approx([300.0, 480.0])  # numpy's linear percentiles of 5 values
    assert summary.e2e_ms == pytest.approx([2100.0, 5660.0])
    assert summary.per_model == {"lora-00": 3, "lora-01": 1, "lora-02": 1}
    assert summary.errors == {"HTTP 429: queue full": 1}


def test_summary_lines_name_the_numbers(records):
    text = "\n".join(format_summary(summarize(records)))
    assert "5 ok, 1 failed" in text
    assert "14.1 output tokens/s" in text
    assert "p50 300 ms, p95 480 ms" in text
    assert "lora-00 3 (60%)" in text
    assert "1 x HTTP 429: queue full" in text


def test_a_summary_of_nothing_says_so():
    summary = summarize([])
    assert summary.requests == 0 and summary.tokens_per_s == 0
    assert "TTFT          p50 n/a" in "\n".join(format_summary(summary))


def test_buckets_are_at_least_a_second_and_at_most_twenty():
    assert list(bucket_edges(3.5)) == pytest.approx([0, 3.5 / 3, 7 / 3, 3.5])
    assert len(bucket_edges(60.0)) == 21 and bucket_edges(60.0)[1] == pytest.approx(3.0)
    assert list(bucket_edges(0.2)) == pytest.approx([0, 0.2])


def test_throughput_over_time_keeps_every_token(records):
    edges = np.array([0.0, 5.0, 10.0])
    tokens_per_s = throughput_series(records, edges, t0=100.0)
    assert (tokens_per_s * np.diff(edges)).sum() == pytest.approx(141)
    # Second bucket (105-110 s): all 16 tokens of the request generating 108.4-110.0, and 5/5.5 of
    # the 55 tokens of the one generating 104.5-110.0.
    assert tokens_per_s[1] * 5 == pytest.approx(16 + 55 * 5 / 5.5)
    assert requests_series(records, edges, t0=100.0) * 5 == pytest.approx([3, 2])


def test_ttft_percentiles_over_time_group_requests_by_when_they_were_sent(records):
    ttft = ttft_series(records, np.array([0.0, 5.0, 10.0]), t0=100.0)
    assert ttft.shape == (2, 2)
    assert ttft[0] == pytest.approx([250.0, 470.0])  # sent in 0-5 s: 100, 300, 200, 500
    assert ttft[1] == pytest.approx([400.0, 400.0])


def test_summary_png_is_drawn_from_the_csv(records, tmp_path: Path):
    import matplotlib.image

    path = draw_summary(
        records,
        tmp_path / "out" / "summary.png",
        "test run",
        ranking=["lora-00", "lora-01", "lora-02", "lora-03"],
        zipf_s=1.0,
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(path).shape
    assert (width, height) == (1100, 1100)
