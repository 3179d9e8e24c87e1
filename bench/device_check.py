"""`make device-check`: the GPU path checked on a CUDA machine, in one command, in under 8 minutes.

1. Without an NVIDIA GPU (no `nvidia-smi`, or it lists none) it says so and exits 0.
2. Creates its own venv (.venv-cuda) with the CUDA build of torch (`make install TORCH=torch`),
   or, with --python, uses an interpreter that already has it and peftserve's needs (a machine
   with no network: see the README's GPU section).
3. Runs the reference-equality tests on cuda (PEFTSERVE_TEST_DEVICE=cuda): every kind in one mixed
   batch against PEFT / our references, in float32, bfloat16 and float16, with and without
   --quantize nf4 (tests/server/adapters/test_low_precision.py, test_batched_reference.py), and
   decode steps replayed from CUDA graphs (tests/server/engine/test_graphs.py).
4. Starts the server on the GPU with the default model (and with a larger public model if one is in
   the local Hugging Face cache) and asks it for a completion.
5. Runs the engine bench there (bench.bench_adapters: no adapters, K=8 and K=64 LoRA adapters,
   adapter load from disk into a GPU slot), with decode graphs and without, and prints one table.

Exits 1, loudly, on any mismatch or failure. Run from the repository root with system python:

    python3 bench/device_check.py [--venv .venv-cuda | --python /path/to/python]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LARGER_MODELS = (
    "Qwen/Qwen2.5-1.5B-Instruct",
    "Qwen/Qwen2.5-0.5B-Instruct",
    "meta-llama/Llama-3.2-1B-Instruct",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "HuggingFaceTB/SmolLM2-360M-Instruct",
)
"""Tried in this order when present in the local Hugging Face cache (nothing is downloaded)."""


class CheckFailed(RuntimeError):
    """A step of the device check failed; the message says which."""


def gpus() -> list[str]:
    """The NVIDIA GPUs `nvidia-smi -L` lists; empty without the tool or a GPU."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return []
    try:
        out = subprocess.run([tool, "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return (
        [line for line in out.stdout.splitlines() if line.startswith("GPU ")] if out.returncode == 0 else []
    )


def run(cmd: list[str], what: str, env: dict | None = None, timeout: float | None = None) -> None:
    print(f"\n$ {' '.join(cmd)}", flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise CheckFailed(f"{what}: timed out after {timeout:.0f} s") from e
    if proc.returncode != 0:
        raise CheckFailed(f"{what}: exit status {proc.returncode}")


def local_larger_model() -> str | None:
    hub = Path(
        os.environ.get("HF_HUB_CACHE")
        or Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub"
    )
    for model_id in LARGER_MODELS:
        folder = hub / ("models--" + model_id.replace("/", "--")) / "snapshots"
        if any(folder.glob("*/config.json")):
            return model_id
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_ask(python: Path, model: str | None, timeout: float = 240) -> float:
    """Start `peftserve serve` on cuda, wait for /health, ask for one completion; its tokens/s."""
    port = free_port()
    cmd = [str(python), "-m", "server.cli", "serve", "--device", "cuda", "--port", str(port)]
    cmd += ["--model", model] if model else []
    print(f"\n$ {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise CheckFailed(f"the server ({model or 'default model'}) exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise CheckFailed(
                    f"the server ({model or 'default model'}) did not become healthy in {timeout} s"
                )
            time.sleep(1)
        with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as reply:
            served = json.load(reply)["data"][0]["id"]
        body = {"model": served, "prompt": "The capital of France is", "max_tokens": 32, "temperature": 0}
        request = urllib.request.Request(
            f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=120) as reply:
            usage = json.load(reply)["usage"]
        return usage["completion_tokens"] / (time.perf_counter() - started)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def equality_table(report: Path) -> tuple[str, bool]:
    rows = (
        [json.loads(line) for line in report.read_text().splitlines() if line.strip()]
        if report.exists()
        else []
    )
    if not rows:
        return "(the equality tests reported nothing)", False
    columns = sorted({(r["dtype"], r["quantize"]) for r in rows}, key=lambda c: (c[0], c[1] != "none", c[1]))
    kinds = sorted({r["kind"] for r in rows})
    cell = {(r["kind"], r["dtype"], r["quantize"]): r["equal"] for r in rows}
    head = "| kind | " + " | ".join(f"{d}{'' if q == 'none' else ' ' + q}" for d, q in columns) + " |"
    lines = [head, "| --- |" + " --- |" * len(columns)]
    for kind in kinds:
        marks = [{True: "equal", False: "NOT EQUAL", None: "-"}[cell.get((kind, d, q))] for d, q in columns]
        lines.append(f"| {kind} | " + " | ".join(marks) + " |")
    return "\n".join(lines), all(r["equal"] for r in rows)


def equality_tests(python: Path, report: Path) -> None:
    tests = ["tests/server/adapters/test_low_precision.py", "tests/server/adapters/test_batched_reference.py"]
    tests.append("tests/server/engine/test_graphs.py")
    cmd = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow or not slow", *tests]
    cmd += ["-k", "low_precision or every_kind or more_adapters_than_slots or graphs"]
    env = {"PEFTSERVE_TEST_DEVICE": "cuda", "PEFTSERVE_TEST_REPORT": str(report)}
    run(cmd, "the reference-equality tests on cuda", env, timeout=300)


def engine_bench(python: Path, out: Path, graphs: str) -> None:
    cmd = [str(python), "-m", "bench.bench_adapters", "--parts", "small", "--ks", "8,64", "--repeats", "1"]
    cmd += ["--dtype", "bfloat16", "--no-baselines", "--decode-graphs", graphs, "--out", str(out)]
    run(cmd, f"the engine bench on cuda, --decode-graphs {graphs}", timeout=150)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", default=".venv-cuda", help="the venv to create with torch's CUDA build")
    parser.add_argument(
        "--python",
        type=Path,
        default=None,
        help="use this interpreter as it is (with torch's CUDA build and peftserve's needs), not --venv",
    )
    args = parser.parse_args()
    found = gpus()
    if not found:
        print("device-check: no NVIDIA GPU on this machine (nvidia-smi lists none): nothing to check.")
        return 0
    print("device-check on " + "; ".join(found), flush=True)
    started = time.monotonic()
    python = args.python or ROOT / args.venv / "bin" / "python"
    failures: list[str] = []
    served: dict[str, float] = {}
    larger = local_larger_model()
    with tempfile.TemporaryDirectory(prefix="peftserve-device-check-") as tmp:
        report = Path(tmp) / "equality.jsonl"
        bench_json = {graphs: Path(tmp) / f"bench-{graphs}.json" for graphs in ("on", "off")}
        try:
            if args.python is None:
                run(["make", "install", f"VENV={args.venv}", "TORCH=torch"], "make install TORCH=torch")
                # The equality tests need pytest, which only `make install-dev` brings (with Docker
                # Compose, Helm, Ray and lm-eval for the other tests, none of them needed here).
                pins = ["-c", "constraints.txt", "pytest", "pytest-timeout"]
                run([str(python), "-m", "pip", "install", "-q", *pins], "pip install pytest")
            steps = [
                ("equality tests", lambda: equality_tests(python, report)),
                ("server, default model", lambda: served.update(default=serve_and_ask(python, None))),
                ("bench, decode graphs", lambda: engine_bench(python, bench_json["on"], "on")),
                ("bench, no decode graphs", lambda: engine_bench(python, bench_json["off"], "off")),
            ]
            if larger:
                steps.append(
                    (f"server, {larger}", lambda: served.update({larger: serve_and_ask(python, larger)}))
                )
            for name, step in steps:
                try:
                    step()
                except CheckFailed as e:
                    failures.append(f"{name}: {e}")
        except CheckFailed as e:
            failures.append(str(e))
        table, all_equal = equality_table(report)
        bench = {g: json.loads(path.read_text()) if path.exists() else {} for g, path in bench_json.items()}
    print_summary(table, bench, served, larger)
    print(f"\ntook {time.monotonic() - started:.0f} s")
    if not all_equal:
        failures.append("a kind did not equal its float32 reference (table above), or none was compared")
    if failures:
        print("\nDEVICE CHECK FAILED:\n- " + "\n- ".join(failures), file=sys.stderr)
        return 1
    print("device-check: all equal, all steps passed")
    return 0


def print_summary(table: str, bench: dict[str, dict], served: dict[str, float], larger: str | None) -> None:
    rates = {graphs: run.get("tokens_per_s", {}) for graphs, run in bench.items()}
    print("\n## device-check\n")
    print(table + "\n")
    print("| engine (bfloat16, in-process), tokens/s | decode graphs | no decode graphs |")
    print("| --- | --- | --- |")
    for label in ("engine, no adapters", "engine K=8", "engine K=64"):
        cells = [f"{r[label]:.1f}" if label in r else "(not measured)" for r in (rates["on"], rates["off"])]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if "adapter_load_seconds_median" in bench["on"]:
        ms = bench["on"]["adapter_load_seconds_median"] * 1e3
        print(f"\nadapter load, disk -> GPU slot (rank 16, every linear layer): {ms:.0f} ms (median)")
    for model, rate in served.items():
        print(f"server on cuda, {model} model: {rate:.1f} tokens/s (one 32-token completion over HTTP)")
    print(f"larger local model: {larger or 'none in the Hugging Face cache'}")


if __name__ == "__main__":
    sys.exit(main())
