"""Headless load test: serve a base model with K random LoRA adapters on a free loopback port, run
locust against it for a set time, then draw summary.png and print a one-screen summary.

    python -m loadtest.run --adapters 32 --users 8 --duration 60

Everything lands in --results (default loadtest/results/): locust's CSVs and HTML report, the
per-request CSV, summary.png, summary.txt, the server's log and its final /metrics. The exit code
is 0 only if every request succeeded (1 if any failed, 2 if the run could not be set up).
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from loadtest.report import draw_summary, format_summary, summarize
from loadtest.workload import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_MIN_TOKENS,
    DEFAULT_SEED,
    DEFAULT_ZIPF_S,
    read_requests,
    served_models,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
CSV_PREFIX = "locust"


class SetupError(RuntimeError):
    """The run could not start: no model config, a server that did not come up, a bad flag."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = parser.add_argument_group("the server under test")
    target.add_argument(
        "--model",
        default=None,
        help="base model for the server (--model of peftserve serve); default the embedded SmolLM2-135M",
    )
    target.add_argument(
        "--dtype", default=None, help="--dtype for the server (default: the server's own default, auto)"
    )
    target.add_argument(
        "--adapters",
        type=int,
        default=32,
        metavar="K",
        help="random LoRA adapters written to a temporary store and served (default 32)",
    )
    target.add_argument("--rank", type=int, default=8, help="LoRA rank of those adapters (default 8)")
    target.add_argument(
        "--port", type=int, default=0, help="port on 127.0.0.1 for the server (default 0: a free one)"
    )
    target.add_argument(
        "--server-args",
        default="",
        help='more flags for peftserve serve, as one string: --server-args="--max-active-adapters 8"',
    )
    target.add_argument(
        "--startup-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for the server's /health (default 300; the first start dequantizes the model)",
    )
    target.add_argument(
        "--url",
        default=None,
        help="test a server that is already running at this base URL instead of starting one; "
        "its own adapters are used, and the flags above are ignored",
    )
    load = parser.add_argument_group("the load")
    load.add_argument("--users", type=int, default=8, help="concurrent simulated users (default 8)")
    load.add_argument("--duration", type=int, default=60, help="seconds locust sends requests (default 60)")
    load.add_argument(
        "--spawn-rate", type=float, default=None, help="users started per second (default: all in 1 s)"
    )
    load.add_argument(
        "--zipf-s",
        type=float,
        default=DEFAULT_ZIPF_S,
        help="Zipf exponent of the adapter choice, P(rank k) ~ 1/k^s; 0 is uniform "
        f"(default {DEFAULT_ZIPF_S})",
    )
    load.add_argument(
        "--min-tokens",
        type=int,
        default=DEFAULT_MIN_TOKENS,
        help=f"least max_tokens of a request (default {DEFAULT_MIN_TOKENS})",
    )
    load.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help="most max_tokens of a request; requests draw uniformly from the range "
        f"(default {DEFAULT_MAX_TOKENS})",
    )
    load.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help=f"seed of the workload's draws (default {DEFAULT_SEED})",
    )
    load.add_argument(
        "--warm",
        action="store_true",
        help="before the timed run, send each adapter one 1-token request, so every adapter is loaded "
        "and the run measures steady state rather than cold start",
    )
    load.add_argument(
        "--drain-timeout",
        type=int,
        default=60,
        help="seconds the requests running at the end of --duration get to finish; those still "
        "running then count as failures (default 60)",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=REPO_ROOT / "loadtest" / "results",
        help="output folder, overwritten run after run (default loadtest/results)",
    )
    return parser


def validate(args: argparse.Namespace) -> None:
    if args.url is None and args.adapters < 0:
        raise SetupError("--adapters must be >= 0")
    if args.users < 1 or args.duration < 1 or args.drain_timeout < 1:
        raise SetupError("--users, --duration and --drain-timeout must be >= 1")
    if not 1 <= args.min_tokens <= args.max_tokens:
        raise SetupError("need 1 <= --min-tokens <= --max-tokens")
    if args.zipf_s < 0:
        raise SetupError("--zipf-s must be >= 0")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_adapters(store: Path, model: str | None, count: int, rank: int) -> list[str]:
    """`count` random LoRA adapters named lora-00, lora-01, ... for the model's shape."""
    from transformers import AutoConfig

    from bench.adapters import write_lora
    from server.base_model import ModelLoadError, default_gguf_path, materialize_gguf, model_shape
    from server.config import ModelSettings

    cache = ModelSettings().cache
    if model is None:
        source = str(materialize_gguf(default_gguf_path(), cache))
    elif model.endswith(".gguf"):
        source = str(materialize_gguf(Path(model).expanduser(), cache))
    else:
        source = model
    try:
        shape = model_shape(AutoConfig.from_pretrained(source))
    except (OSError, ValueError, ModelLoadError) as exc:
        raise SetupError(f"cannot read the config of model {source}: {exc}") from exc
    width = max(2, len(str(count - 1)))
    names = [f"lora-{i:0{width}d}" for i in range(count)]
    for seed, name in enumerate(names):
        write_lora(store / name, shape, rank=rank, seed=seed)
    return names


@dataclass
class ServerProcess:
    process: subprocess.Popen
    url: str
    log_path: Path

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SetupError(
                    f"the server exited with code {self.process.returncode} before it was ready; "
                    f"the end of {self.log_path}:\n{self.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise SetupError(f"the server did not answer /health within {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def start_server(args: argparse.Namespace, store: Path, log_path: Path) -> Iterator[ServerProcess]:
    port = args.port or free_port()
    command = [sys.executable, "-m", "server.cli", "serve", "--store", str(store)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    if args.model:
        command += ["--model", args.model]
    if args.dtype:
        command += ["--dtype", args.dtype]
    command += shlex.split(args.server_args)
    print(f"starting the server on port {port} (log: {log_path})", flush=True)
    with log_path.open("w") as log_file:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    try:
        server.wait_ready(args.startup_timeout)
        yield server
    finally:
        server.stop()


def clear_results(results: Path) -> None:
    """Remove the previous run's files, so nothing stale is read or shown as this run's."""
    results.mkdir(parents=True, exist_ok=True)
    for name in ("summary.png", "summary.txt", "report.html", "metrics.txt", "locust.log"):
        (results / name).unlink(missing_ok=True)
    for path in results.glob(f"{CSV_PREFIX}_*.csv"):
        path.unlink()


def run_locust(url: str, args: argparse.Namespace, results: Path) -> int:
    """Run locust headless against url; its console goes to results/locust.log. Its exit code."""
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary"]
    command += ["--host", url, "--users", str(args.users), "--run-time", f"{args.duration}s"]
    command += ["--spawn-rate", str(args.spawn_rate or args.users)]
    command += [
        "--csv",
        str(results / CSV_PREFIX),
        "--csv-full-history",
        "--html",
        str(results / "report.html"),
    ]
    command += ["--zipf-s", str(args.zipf_s), "--min-tokens", str(args.min_tokens)]
    command += ["--max-tokens", str(args.max_tokens), "--seed", str(args.seed)]
    command += ["--stop-timeout", str(args.drain_timeout)]
    print(f"running locust: {args.users} users for {args.duration} s against {url}", flush=True)
    with (results / "locust.log").open("w") as log_file:
        # Locust stops by itself after --run-time and the drain; the margin covers its start and reports.
        limit = args.duration + args.drain_timeout + 120
        done = subprocess.run(
            command, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT, timeout=limit
        )
    return done.returncode


def adapter_metric_lines(metrics_text: str) -> list[str]:
    """A summary line on adapter loads and evictions from Prometheus text, if it has those counters."""
    from prometheus_client.parser import text_string_to_metric_families

    loads: dict[str, float] = {}
    evictions = None
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "peftserve_adapter_loads_total":
                loads[sample.labels.get("source", "?")] = sample.value
            elif sample.name == "peftserve_adapter_evictions_total":
                evictions = sample.value
    if not loads and evictions is None:
        return []
    by_source = ", ".join(f"{source} {count:.0f}" for source, count in sorted(loads.items()))
    return [f"adapter loads {sum(loads.values()):.0f} ({by_source}), {evictions or 0:.0f} evictions"]


def save_metrics(url: str, results: Path) -> list[str]:
    """Save the server's final /metrics as metrics.txt; its summary lines (none without /metrics)."""
    try:
        reply = httpx.get(f"{url}/metrics", timeout=10)
    except httpx.HTTPError:
        return []
    if reply.status_code != 200:
        return []
    (results / "metrics.txt").write_text(reply.text)
    return adapter_metric_lines(reply.text)


def list_models(url: str) -> list[str]:
    reply = httpx.get(f"{url}/v1/models", timeout=30)
    reply.raise_for_status()
    base, adapters = served_models(reply.json())
    return adapters or [base]


def server_problems(server: ServerProcess) -> list[str]:
    """Summary lines for a server that died or logged a traceback during the run (none if neither)."""
    lines = []
    if server.process.poll() is not None:
        lines.append(f"server        exited with code {server.process.returncode} during the run")
    tracebacks = server.log_path.read_text(errors="replace").count("Traceback (most recent call last)")
    if tracebacks:
        lines.append(f"server        logged {tracebacks} traceback(s); see {server.log_path}")
    return lines


def verdict_line(requests: int, failures: int, locust_code: int, server_ok: bool = True) -> str:
    if requests == 0:
        return "FAILED: no request finished"
    if failures:
        return f"FAILED: {failures} of {requests} requests failed"
    if locust_code != 0:
        return "FAILED: locust reported errors"
    if not server_ok:
        return "FAILED: the server failed during the run"
    return "OK: every request succeeded"


def warm_up(url: str, models: list[str]) -> None:
    """One 1-token completion per model, in turn: each adapter is loaded before the timed run."""
    print(f"warming {len(models)} model(s): one 1-token request each", flush=True)
    with httpx.Client(base_url=url, timeout=120) as client:
        for model in models:
            reply = client.post("/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 1})
            if reply.status_code != 200:
                raise SetupError(f"warm-up request for {model} answered {reply.status_code}: {reply.text}")


def load_and_report(
    url: str, args: argparse.Namespace, results: Path, adapters: int, server: ServerProcess | None = None
) -> int:
    """Run locust against a ready server (ours, if `server` is given), then summarize. The exit code."""
    ranking = list_models(url)
    if args.warm:
        warm_up(url, ranking)
    locust_code = run_locust(url, args, results)
    problems = server_problems(server) if server is not None else []
    server_lines = [*save_metrics(url, results), *problems]
    requests_csv = results / f"{CSV_PREFIX}_requests.csv"
    if not requests_csv.is_file():
        print(f"locust wrote no {requests_csv.name} (exit code {locust_code}); see {results / 'locust.log'}")
        return 2
    records = read_requests(requests_csv)
    summary = summarize(records)
    title = (
        f"peftserve load test: {args.users} users for {args.duration} s, {adapters} adapters, "
        f"Zipf s={args.zipf_s:g}, max_tokens {args.min_tokens}-{args.max_tokens}"
        + (", adapters warmed first" if args.warm else "")
    )
    draw_summary(records, results / "summary.png", title, ranking=ranking, zipf_s=args.zipf_s)
    lines = [title, *format_summary(summary), *server_lines]
    lines.append(
        f"results       {results}/ (summary.png, report.html, {CSV_PREFIX}_*.csv, server and locust logs)"
    )
    if locust_code != 0:
        lines.append(f"locust        exited with code {locust_code}; see {results / 'locust.log'}")
    verdict = verdict_line(summary.requests, summary.failures, locust_code, server_ok=not problems)
    lines.append(verdict)
    text = "\n".join(lines)
    (results / "summary.txt").write_text(text + "\n")
    print("\n" + text)
    return 0 if verdict.startswith("OK") else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = args.results.resolve()
    try:
        validate(args)
        clear_results(results)
        if args.url:
            url = args.url.rstrip("/")
            return load_and_report(url, args, results, len(list_models(url)))
        with tempfile.TemporaryDirectory(prefix="peftserve-loadtest-") as store:
            print(f"writing {args.adapters} random LoRA adapters (rank {args.rank}) to {store}", flush=True)
            write_adapters(Path(store), args.model, args.adapters, args.rank)
            with start_server(args, Path(store), results / "server.log") as server:
                return load_and_report(server.url, args, results, args.adapters, server)
    except (SetupError, httpx.HTTPError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"load test not run: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
