"""The load test's results from the per-request CSV: a one-screen summary and summary.png.

Locust's own history keeps 10-second moving percentiles and no token counts, so the numbers here
come from the exact per-request rows the locustfile writes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loadtest.workload import RequestRecord, zipf_probabilities

# The plots over time split the run into at most this many buckets of at least a second each:
# enough points to see a trend, enough requests per bucket for a p95 to mean something.
MAX_BUCKETS = 20
MIN_BUCKET_SECONDS = 1.0


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 95)) -> list[float]:
    """The qs-th percentiles of values (linear interpolation); NaN for no values."""
    if not values:
        return [float("nan")] * len(qs)
    return [float(v) for v in np.percentile(np.asarray(values, dtype=float), qs)]


@dataclass
class Summary:
    requests: int  # finished requests, successful or not
    failures: int
    window_s: float  # from the first request sent to the last one finished
    output_tokens: int
    ttft_ms: list[float]  # p50, p95 of successful requests
    e2e_ms: list[float]
    per_model: Counter[str] = field(default_factory=Counter)  # successful requests per model
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.window_s if self.window_s > 0 else 0.0

    @property
    def requests_per_s(self) -> float:
        return (self.requests - self.failures) / self.window_s if self.window_s > 0 else 0.0


def summarize(records: Sequence[RequestRecord]) -> Summary:
    ok = [r for r in records if r.ok]
    window = max((r.finished for r in records), default=0.0) - min((r.started for r in records), default=0.0)
    return Summary(
        requests=len(records),
        failures=len(records) - len(ok),
        window_s=window,
        output_tokens=sum(r.output_tokens for r in ok),
        ttft_ms=percentiles([r.ttft_ms for r in ok]),
        e2e_ms=percentiles([r.e2e_ms for r in ok]),
        per_model=Counter(r.model for r in ok),
        errors=Counter(r.error for r in records if not r.ok),
    )


def _ms(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{value:,.0f} ms"


def format_summary(summary: Summary, top: int = 5) -> list[str]:
    """The summary's lines: requests, throughput, TTFT, latency, top models, failures."""
    ok = summary.requests - summary.failures
    lines = [
        f"requests      {ok} ok, {summary.failures} failed, {summary.requests_per_s:.2f} req/s",
        f"throughput    {summary.tokens_per_s:.1f} output tokens/s "
        f"({summary.output_tokens:,} tokens in {summary.window_s:.1f} s)",
        f"TTFT          p50 {_ms(summary.ttft_ms[0])}, p95 {_ms(summary.ttft_ms[1])}",
        f"latency       p50 {_ms(summary.e2e_ms[0])}, p95 {_ms(summary.e2e_ms[1])} (end to end)",
    ]
    if summary.per_model:
        shares = [f"{m} {n} ({100 * n / ok:.0f}%)" for m, n in summary.per_model.most_common(top)]
        lines.append(f"top models    {', '.join(shares)}  [{len(summary.per_model)} used]")
    for message, count in summary.errors.most_common(3):
        lines.append(f"failure       {count} x {message}")
    return lines


def bucket_edges(window_s: float) -> np.ndarray:
    """Equal buckets covering [0, window]: at most MAX_BUCKETS, at least MIN_BUCKET_SECONDS wide."""
    count = max(1, min(MAX_BUCKETS, int(window_s // MIN_BUCKET_SECONDS)))
    return np.linspace(0.0, max(window_s, 1e-9), count + 1)


def throughput_series(records: Sequence[RequestRecord], edges: np.ndarray, t0: float) -> np.ndarray:
    """Output tokens/s per bucket. A request's tokens are spread evenly from its first token to its
    end, as they were generated, rather than all counted when it finishes."""
    ok = [r for r in records if r.ok]
    if not ok:
        return np.zeros(len(edges) - 1)
    first = np.array([r.first_token - t0 for r in ok])[:, None]
    end = np.array([r.finished - t0 for r in ok])[:, None]
    tokens = np.array([r.output_tokens for r in ok], dtype=float)[:, None]
    lo, hi = edges[None, :-1], edges[None, 1:]
    overlap = np.clip(np.minimum(end, hi) - np.maximum(first, lo), 0.0, None)
    span = end - first
    # A request whose first token was also its last counts wholly in the bucket where it ended.
    instant = (span == 0) & (end >= lo) & ((end < hi) | (hi == edges[-1]))
    share = np.where(span > 0, overlap / np.where(span > 0, span, 1.0), instant.astype(float))
    return (share * tokens).sum(axis=0) / np.diff(edges)


def requests_series(records: Sequence[RequestRecord], edges: np.ndarray, t0: float) -> np.ndarray:
    """Successful requests finished per second, per bucket."""
    finished = [r.finished - t0 for r in records if r.ok]
    counts, _ = np.histogram(finished, bins=edges)
    return counts / np.diff(edges)


def ttft_series(records: Sequence[RequestRecord], edges: np.ndarray, t0: float) -> np.ndarray:
    """TTFT p50 and p95 (ms) of the requests sent in each bucket; shape (buckets, 2), NaN where none."""
    starts = np.array([r.started - t0 for r in records if r.ok])
    ttfts = np.array([r.ttft_ms for r in records if r.ok])
    index = np.clip(np.searchsorted(edges, starts, side="right") - 1, 0, len(edges) - 2)
    return np.array([percentiles(list(ttfts[index == b])) for b in range(len(edges) - 1)]).reshape(-1, 2)


def draw_summary(
    records: Sequence[RequestRecord],
    path: Path,
    title: str,
    ranking: Sequence[str] | None = None,
    zipf_s: float | None = None,
) -> Path:
    """summary.png: throughput and TTFT percentiles over time, and requests per model by Zipf rank
    (`ranking`, rank 1 first; default the models seen, by name) against the law's expectation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min((r.started for r in records), default=0.0)
    window = summarize(records).window_s
    edges = bucket_edges(window)
    mids = (edges[:-1] + edges[1:]) / 2
    fig, (ax_tput, ax_ttft, ax_models) = plt.subplots(3, 1, figsize=(11, 11), constrained_layout=True)
    fig.suptitle(title)

    ax_tput.plot(mids, throughput_series(records, edges, t0), "o-", color="tab:blue", label="output tokens/s")
    ax_tput.set_ylabel("output tokens/s", color="tab:blue")
    ax_reqs = ax_tput.twinx()
    ax_reqs.plot(mids, requests_series(records, edges, t0), "s--", color="tab:orange", label="requests/s")
    ax_reqs.set_ylabel("requests/s", color="tab:orange")
    ax_tput.set_title(f"Throughput over time ({edges[1] - edges[0]:.1f} s buckets)")
    ax_tput.set_xlabel("seconds since the first request")
    ax_tput.set_xlim(0, window)
    ax_tput.set_ylim(bottom=0)
    ax_reqs.set_ylim(bottom=0)

    ttft = ttft_series(records, edges, t0)
    ax_ttft.plot(mids, ttft[:, 0], "o-", label="p50")
    ax_ttft.plot(mids, ttft[:, 1], "o-", label="p95")
    ax_ttft.set_title("Time to first token of the requests sent in each bucket")
    ax_ttft.set_xlabel("seconds since the first request")
    ax_ttft.set_ylabel("TTFT (ms)")
    ax_ttft.set_xlim(0, window)
    ax_ttft.set_ylim(bottom=0)
    ax_ttft.legend()

    names = list(ranking) if ranking else sorted({r.model for r in records})
    ok = Counter(r.model for r in records if r.ok)
    failed = Counter(r.model for r in records if not r.ok)
    x = np.arange(len(names))
    ok_counts = np.array([ok[n] for n in names])
    ax_models.bar(x, ok_counts, color="tab:green", label="ok")
    if failed:
        ax_models.bar(x, [failed[n] for n in names], bottom=ok_counts, color="tab:red", label="failed")
    if zipf_s is not None and names:
        sent = sum(ok[n] + failed[n] for n in names)
        expected = sent * np.array(zipf_probabilities(len(names), zipf_s))
        ax_models.plot(x, expected, "k.--", label=f"Zipf s={zipf_s:g} expectation")
    ax_models.set_xticks(x, names, rotation=90, fontsize=7 if len(names) > 16 else 9)
    ax_models.set_title("Requests per model, by Zipf rank")
    ax_models.set_ylabel("requests")
    ax_models.legend()

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
