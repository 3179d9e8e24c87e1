"""Soak test: a long run of mixed streaming traffic over more adapters than device slots, while
adapters are uploaded, re-versioned and deleted and some clients hang up mid-stream.

    python -m loadtest.soak --duration 600

It serves the base model with K random LoRA adapters on a free loopback port (fewer device slots
than adapters, so they are evicted and reloaded all the time), then runs --users client threads
and one registry thread until --duration is over, and reports requests ok / refused / failed,
latency p50/p95, and the server's RSS after the warm-up and at the end.

The run fails (exit 1) on any 5xx, any request that does not finish within --request-timeout
(a stall), any broken stream, a server that dies or logs a traceback, or RSS growth beyond
--max-rss-growth-mb. A 4xx is not a failure: a request may name an adapter deleted a moment ago.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from loadtest.run import REPO_ROOT, ServerProcess, SetupError, server_problems, start_server, write_adapters
from loadtest.workload import DEFAULT_SEED, StreamError, Workload, ZipfChooser, load_prompts, read_chat_stream


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=600, help="seconds of traffic (default 600)")
    parser.add_argument("--users", type=int, default=8, help="concurrent streaming clients (default 8)")
    parser.add_argument("--adapters", type=int, default=16, help="random LoRA adapters at start (default 16)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the adapters (default 8)")
    parser.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent of the adapter choice")
    parser.add_argument("--min-tokens", type=int, default=4, help="least max_tokens of a request (default 4)")
    parser.add_argument(
        "--max-tokens", type=int, default=32, help="most max_tokens of a request (default 32)"
    )
    parser.add_argument(
        "--disconnect-rate",
        type=float,
        default=0.1,
        help="fraction of requests whose client hangs up after the first chunk (default 0.1)",
    )
    parser.add_argument(
        "--churn-every",
        type=float,
        default=5.0,
        help="seconds between registry changes: an upload, a new version, a delete, in turn (default 5)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=180.0,
        help="a request not finished after this many seconds counts as stalled (default 180)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds of traffic before the first RSS reading (default 10%% of --duration, at least 5)",
    )
    parser.add_argument(
        "--max-rss-growth-mb",
        type=float,
        default=256.0,
        help="most the server's RSS may grow from the end of the warm-up to the end, in MiB (default 256)",
    )
    parser.add_argument("--model", default=None, help="base model (default the embedded SmolLM2-135M)")
    parser.add_argument("--dtype", default=None, help="--dtype for the server (default: its own, auto)")
    parser.add_argument(
        "--server-args",
        default="--max-active-adapters 4",
        help='more flags for peftserve serve (default "--max-active-adapters 4": fewer slots than adapters)',
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default 0: a free one)")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for /health")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the workload's draws")
    parser.add_argument(
        "--results",
        type=Path,
        default=REPO_ROOT / "loadtest" / "results",
        help="folder for soak.txt and the server's log (default loadtest/results)",
    )
    return parser


@dataclass
class Tally:
    """What the client threads saw; every field is guarded by `lock`."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    registry: Counter = field(default_factory=Counter)

    def record(self, outcome: str, latency: float | None = None, why: str | None = None) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if latency is not None:
                self.latencies.append(latency)
            if why is not None:
                self.failures.append(why)


class Models:
    """The adapter names clients draw from; the registry thread changes them as it goes."""

    def __init__(self, names: list[str], zipf_s: float, rng: random.Random) -> None:
        self.lock = threading.Lock()
        self.names, self.zipf_s, self.rng = list(names), zipf_s, rng
        self.chooser = ZipfChooser(self.names, zipf_s, rng)

    def choose(self) -> str:
        with self.lock:
            return self.chooser.choose()

    def add(self, name: str) -> None:
        with self.lock:
            self.names.append(name)
            self.chooser = ZipfChooser(self.names, self.zipf_s, self.rng)

    def remove(self, name: str) -> None:
        with self.lock:
            self.names.remove(name)
            self.chooser = ZipfChooser(self.names, self.zipf_s, self.rng)


def one_request(http: httpx.Client, body: dict, hang_up: bool, timeout: float, tally: Tally) -> None:
    started = time.perf_counter()
    try:
        with http.stream("POST", "/v1/chat/completions", json=body, timeout=timeout) as reply:
            if reply.status_code >= 500:
                reply.read()
                tally.record("failed", why=f"{reply.status_code} for {body['model']}: {reply.text[:200]}")
            elif reply.status_code >= 400:
                reply.read()
                tally.record(f"refused {reply.status_code}")
            elif hang_up:
                next(reply.iter_lines(), None)
                tally.record("hung up")
            else:
                read_chat_stream(reply.iter_lines())
                tally.record("ok", latency=time.perf_counter() - started)
    except httpx.TimeoutException:
        tally.record("failed", why=f"no answer within {timeout:.0f} s for {body['model']} (a stall)")
    except (httpx.HTTPError, StreamError) as exc:
        tally.record("failed", why=f"{type(exc).__name__} for {body['model']}: {exc}")


def client(url: str, workload: Workload, args: argparse.Namespace, deadline: float, tally: Tally) -> None:
    with httpx.Client(base_url=url) as http:
        while time.monotonic() < deadline:
            body = workload.next_request()
            hang_up = workload.rng.random() < args.disconnect_rate
            one_request(http, body, hang_up, args.request_timeout, tally)


def registry_call(http: httpx.Client, tally: Tally, what: str, method: str, path: str, **kwargs) -> bool:
    try:
        reply = http.request(method, path, timeout=120, **kwargs)
    except httpx.HTTPError as exc:
        tally.record("failed", why=f"{what}: {type(exc).__name__}: {exc}")
        return False
    if reply.status_code >= 500:
        tally.record("failed", why=f"{what}: {reply.status_code} {reply.text[:200]}")
    elif reply.status_code >= 400:
        with tally.lock:
            tally.registry[f"{what} refused {reply.status_code}"] += 1
    else:
        with tally.lock:
            tally.registry[what] += 1
    return reply.is_success


def upload(http: httpx.Client, tally: Tally, what: str, name: str, folder: Path) -> bool:
    files = [
        ("file", (p.name, p.read_bytes()))
        for p in sorted(folder.iterdir())
        if p.name == "adapter_config.json" or p.suffix == ".safetensors"
    ]
    return registry_call(http, tally, what, "POST", "/v1/adapters", data={"name": name}, files=files)


def churn(url: str, sources: list[Path], models: Models, every: float, deadline: float, tally: Tally) -> None:
    """Upload a new adapter, re-version one, delete one, in turn, until the deadline."""
    added: list[str] = []
    with httpx.Client(base_url=url) as http:
        for turn in range(sys.maxsize):
            if time.monotonic() + every >= deadline:
                return
            time.sleep(every)
            source = sources[turn % len(sources)]
            if turn % 3 == 0:
                name = f"soak-{turn:05d}"
                if upload(http, tally, "uploads", name, source):
                    added.append(name)
                    models.add(name)
            elif turn % 3 == 1 and added:
                upload(http, tally, "new versions", added[-1], source)
            elif added:
                name = added.pop(0)
                models.remove(name)  # clients stop choosing it first; one may still be on its way
                registry_call(http, tally, "deletes", "DELETE", f"/v1/adapters/{name}")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise SetupError(f"no VmRSS for process {pid}")


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def report_lines(args, tally: Tally, rss: tuple[float, float], problems: list[str]) -> tuple[list[str], bool]:
    outcomes, latencies = tally.outcomes, tally.latencies
    lines = [
        f"peftserve soak: {args.duration:.0f} s, {args.users} users, {args.adapters} adapters at start, "
        f"server args {args.server_args!r}",
        "requests      " + ", ".join(f"{count} {what}" for what, count in sorted(outcomes.items())),
        "registry      "
        + (", ".join(f"{count} {what}" for what, count in sorted(tally.registry.items())) or "-"),
    ]
    if latencies:
        p50, p95 = (percentile(latencies, q) * 1000 for q in (50, 95))
        lines.append(f"latency       p50 {p50:,.0f} ms, p95 {p95:,.0f} ms (requests that ran to the end)")
    growth = rss[1] - rss[0]
    lines.append(
        f"server RSS    {rss[0]:,.0f} MiB after the warm-up, {rss[1]:,.0f} MiB at the end "
        f"({growth:+,.0f} MiB; bound {args.max_rss_growth_mb:,.0f} MiB)"
    )
    lines += problems
    lines += [f"failure       {why}" for why in tally.failures[:20]]
    failed = outcomes["failed"] > 0 or bool(problems) or growth > args.max_rss_growth_mb or not outcomes["ok"]
    lines.append("FAILED" if failed else "OK: no 5xx, no stall, RSS within its bound")
    return lines, not failed


def soak(args: argparse.Namespace, server: ServerProcess, names: list[str], sources: list[Path]) -> bool:
    rng = random.Random(args.seed)
    models = Models(names, args.zipf_s, rng)
    tally = Tally()
    start = time.monotonic()
    deadline = start + args.duration
    threads = [
        threading.Thread(target=churn, args=(server.url, sources, models, args.churn_every, deadline, tally))
    ]
    for user in range(args.users):
        workload = Workload(
            models, load_prompts(), args.min_tokens, args.max_tokens, random.Random(args.seed + user)
        )
        threads.append(threading.Thread(target=client, args=(server.url, workload, args, deadline, tally)))
    for thread in threads:
        thread.start()
    warmup = args.warmup if args.warmup is not None else max(5.0, args.duration / 10)
    time.sleep(min(warmup, args.duration))
    rss_start = rss_mib(server.process.pid)
    for thread in threads:
        thread.join()
    rss_end = rss_mib(server.process.pid) if server.process.poll() is None else float("nan")
    lines, ok = report_lines(args, tally, (rss_start, rss_end), server_problems(server))
    text = "\n".join(lines)
    (args.results / "soak.txt").write_text(text + "\n")
    print("\n" + text)
    return ok


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.results = args.results.resolve()
    args.results.mkdir(parents=True, exist_ok=True)
    if (
        args.users < 1
        or args.adapters < 1
        or args.duration <= 0
        or not 1 <= args.min_tokens <= args.max_tokens
    ):
        print(
            "need --users >= 1, --adapters >= 1, --duration > 0, 1 <= --min-tokens <= --max-tokens",
            file=sys.stderr,
        )
        return 2
    store = Path(tempfile.mkdtemp(prefix="peftserve-soak-"))
    try:
        names = write_adapters(store / "store", args.model, args.adapters, args.rank)
        sources = [store / "uploads" / name for name in ("a", "b", "c")]
        for seed, folder in enumerate(sources, start=10_000):
            shutil.copytree(store / "store" / names[seed % len(names)], folder)
        with start_server(args, store / "store", args.results / "soak-server.log") as server:
            return 0 if soak(args, server, names, sources) else 1
    except (SetupError, httpx.HTTPError, OSError) as exc:
        print(f"soak not run: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
