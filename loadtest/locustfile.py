"""Locust workload for peftserve: OpenAI streaming chat requests, each for an adapter drawn from a
Zipf law over the server's adapters. Run it from the repository root:

    python -m locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --zipf-s 1.0

Each simulated user sends one request after another (a closed loop, so --users is the number of
requests in flight). With --stop-timeout, the requests running when the run ends may finish; those
still running after it count as failures (without it, they are cut off and not counted).

Locust would time only a stream's headers, so every request reports its own measures as custom
entries instead:

    type "chat",     name = the adapter:  end-to-end latency (ms); "size" = output tokens
    type "TTFT",     name "first token":  time to the first token (ms)
    type "tokens/s", name "per request":  output tokens / end-to-end seconds (shown in the ms columns)

With --csv PREFIX every finished request is also a row of PREFIX_requests.csv, from which
`python -m loadtest.run` computes exact percentiles, throughput over time and per-adapter counts.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import gevent
import requests
from gevent import GreenletExit
from locust import User, constant, events, task
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment

try:
    from loadtest.workload import (
        DEFAULT_MAX_TOKENS,
        DEFAULT_MIN_TOKENS,
        DEFAULT_PROMPTS,
        DEFAULT_SEED,
        DEFAULT_ZIPF_S,
        RequestLog,
        RequestRecord,
        StreamError,
        StreamResult,
        Workload,
        ZipfChooser,
        load_prompts,
        read_chat_stream,
        served_models,
    )
except ModuleNotFoundError as exc:
    raise SystemExit(
        "run locust from the repository root: python -m locust -f loadtest/locustfile.py ..."
    ) from exc

log = logging.getLogger("peftserve.loadtest")

# Built once per test run by on_test_start, then shared by every user.
workload: Workload | None = None
request_log: RequestLog | None = None


@events.init_command_line_parser.add_listener
def add_options(parser: LocustArgumentParser) -> None:
    parser.add_argument(
        "--zipf-s",
        type=float,
        default=DEFAULT_ZIPF_S,
        help="Zipf exponent of the adapter choice, P(rank k) ~ 1/k^s over the server's adapters "
        f"sorted by name; 0 is uniform (default {DEFAULT_ZIPF_S})",
    )
    parser.add_argument(
        "--min-tokens",
        type=int,
        default=DEFAULT_MIN_TOKENS,
        help=f"least max_tokens of a request (default {DEFAULT_MIN_TOKENS})",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help="most max_tokens of a request; each request draws uniformly from the range and, "
        f"with ignore_eos, generates exactly that many (default {DEFAULT_MAX_TOKENS})",
    )
    parser.add_argument(
        "--prompts",
        default=str(DEFAULT_PROMPTS),
        help="prompt file, one user message per line (default: the shipped loadtest/prompts.txt)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help=f"seed of the adapter, prompt and length draws (default {DEFAULT_SEED})",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for a stream's next bytes before failing the request (default 300)",
    )


def _build_workload(environment: Environment) -> Workload:
    options = environment.parsed_options
    reply = requests.get(f"{environment.host}/v1/models", timeout=30)
    reply.raise_for_status()
    base, adapters = served_models(reply.json())
    if not adapters:
        log.warning("the server lists no adapters: every request goes to the base model %s", base)
    rng = random.Random(options.seed)
    return Workload(
        chooser=ZipfChooser(adapters or [base], options.zipf_s, rng),
        prompts=load_prompts(Path(options.prompts)),
        min_tokens=options.min_tokens,
        max_tokens=options.max_tokens,
        rng=rng,
    )


def _stop_with_error(environment: Environment, message: str) -> None:
    log.error(message)
    environment.process_exit_code = 2
    # Quitting from inside test_start would race with the spawning that follows it.
    gevent.spawn_later(0, environment.runner.quit)


@events.test_start.add_listener
def on_test_start(environment: Environment, **_kwargs) -> None:
    global workload, request_log
    try:
        workload = _build_workload(environment)
    except (requests.RequestException, ValueError, OSError) as exc:
        _stop_with_error(environment, f"cannot set up the workload against {environment.host}: {exc}")
        return
    names = workload.chooser.names
    log.info(
        "%d model(s) %s ... with Zipf s=%s; max_tokens %d-%d; %d prompts",
        len(names),
        names[:3],
        environment.parsed_options.zipf_s,
        workload.min_tokens,
        workload.max_tokens,
        len(workload.prompts),
    )
    prefix = environment.parsed_options.csv_prefix
    if prefix:
        request_log = RequestLog(Path(f"{prefix}_requests.csv"))


@events.test_stop.add_listener
def on_test_stop(environment: Environment, **_kwargs) -> None:
    global request_log
    if request_log is not None:
        request_log.close()
        request_log = None


class ChatUser(User):
    """One client sending streaming chat requests back to back."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.session = requests.Session()

    def on_stop(self) -> None:
        self.session.close()

    @task
    def chat(self) -> None:
        if workload is None:
            return
        body = workload.next_request()
        options = self.environment.parsed_options
        started_at = time.time()
        started = time.perf_counter()
        try:
            with self.session.post(
                f"{self.host}/v1/chat/completions",
                json=body,
                stream=True,
                timeout=(10, options.request_timeout),
            ) as reply:
                if reply.status_code != 200:
                    raise StreamError(f"HTTP {reply.status_code}: {reply.text[:200]}")
                result = read_chat_stream(reply.iter_lines())
        except (requests.RequestException, StreamError, ValueError) as exc:
            self._report(body["model"], started_at, started, None, exc)
            return
        except GreenletExit:
            # With --stop-timeout, locust lets running requests finish and kills only those still
            # running when it runs out: a server that stopped answering, which must not pass unseen.
            # Without it, every request running at the end is killed and none of them is a failure.
            if options.stop_timeout:
                cut_off = StreamError(f"unfinished {options.stop_timeout:g} s after the end of the run")
                self._report(body["model"], started_at, started, None, cut_off)
            raise
        self._report(body["model"], started_at, started, result, None)

    def _report(
        self,
        model: str,
        started_at: float,
        started: float,
        result: StreamResult | None,
        error: Exception | None,
    ) -> None:
        e2e = time.perf_counter() - started
        fire = self.environment.events.request.fire
        tokens = result.completion_tokens if result else 0
        fire(
            request_type="chat", name=model, response_time=e2e * 1000, response_length=tokens, exception=error
        )
        ttft = 0.0
        if result is not None:
            ttft = result.first_token - started
            fire(request_type="TTFT", name="first token", response_time=ttft * 1000, response_length=0)
            rate = tokens / e2e if e2e > 0 else 0.0
            fire(request_type="tokens/s", name="per request", response_time=rate, response_length=0)
        if request_log is not None:
            record = RequestRecord(
                started=started_at,
                model=model,
                ok=error is None,
                ttft_ms=round(ttft * 1000, 3),
                e2e_ms=round(e2e * 1000, 3),
                output_tokens=tokens,
                error="" if error is None else str(error)[:300],
            )
            request_log.write(record)
