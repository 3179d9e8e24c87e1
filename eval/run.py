"""Evaluate served models with lm-evaluation-harness: the base and its adapters, side by side.

lm-eval's `local-completions` model scores each choice of a multiple-choice task through the
server's /v1/completions (`echo` + `logprobs`, one request per batch of choices), so an adapter is
scored exactly as it is served: in the mixed batch, with its own slot. `hf_scores` runs lm-eval's
`hf` model over the same weights in-process (with `peft=` for an adapter), the reference the tests
hold the served scores to.

    python -m eval.run --url http://127.0.0.1:8000 --adapter my-adapter

Everything runs offline: the tasks and their data are local (eval/tasks), and the tokenizer that
lm-eval needs to count context tokens is read from a local folder (--tokenizer; by default the
embedded default model's).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "eval" / "tasks"
DEFAULT_TASK = "peftserve_mc"
METRICS = ("acc", "acc_norm")

# lm-eval and the datasets library it reads local JSON with must not try the hub.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _offline() -> None:
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)


def task_config(name: str, include_path: Path = TASKS) -> dict[str, Any]:
    """A task's YAML as a dict, with its local data files made absolute (so any working folder works)."""
    [path] = list(include_path.rglob(f"{name}.yaml"))
    config = yaml.safe_load(path.read_text())
    files = config.get("dataset_kwargs", {}).get("data_files", {})
    for split, file in list(files.items()):
        if not Path(file).is_absolute():
            files[split] = str(ROOT / file) if (ROOT / file).exists() else str(path.parent / Path(file).name)
    return config


def _evaluate(model: str, model_args: dict[str, Any], tasks: list[str], **options: Any) -> dict[str, Any]:
    _offline()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # Only the local tasks: indexing lm-eval's thousands of built-in ones takes most of a minute.
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    return simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[copy.deepcopy(task_config(t)) for t in tasks],
        task_manager=manager,
        log_samples=True,
        **options,
    )


def served_scores(
    url: str,
    model: str,
    tokenizer: str | Path,
    tasks: list[str],
    batch_size: int = 8,
    limit: int | None = None,
    api_key: str | None = None,
) -> dict[str, Any]:
    """lm-eval's `local-completions` against a running server, for one served model (base or adapter)."""
    args: dict[str, Any] = {
        "model": model,
        "base_url": f"{url.rstrip('/')}/v1/completions",
        "tokenizer": str(tokenizer),
        "tokenizer_backend": "huggingface",
        "tokenized_requests": True,
        "max_retries": 1,
    }
    if api_key:
        args["header"] = {"Authorization": f"Bearer {api_key}"}
    return _evaluate("local-completions", args, tasks, limit=limit, batch_size=batch_size)


def hf_scores(
    pretrained: str | Path, tasks: list[str], peft: str | Path | None = None, limit: int | None = None
) -> dict[str, Any]:
    """lm-eval's own `hf` model on the same weights (float32 on CPU), with `peft=` for an adapter."""
    args: dict[str, Any] = {"pretrained": str(pretrained), "dtype": "float32", "device": "cpu"}
    if peft is not None:
        args["peft"] = str(peft)
    return _evaluate("hf", args, tasks, limit=limit, batch_size=8)


def metrics_of(results: dict[str, Any], task: str) -> dict[str, float]:
    """{metric: value} of one task in simple_evaluate's results (filter `none`)."""
    row = results["results"][task]
    return {m: row[f"{m},none"] for m in METRICS if f"{m},none" in row}


def loglikelihoods(results: dict[str, Any], task: str) -> list[float]:
    """Every choice's summed log-likelihood, in document order (what the metrics are computed from)."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [float(r[0]) for s in samples for r in s["filtered_resps"]]


def _served_base(url: str, api_key: str | None) -> str:
    """The name of the server's base model: the first entry of /v1/models."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    first = httpx.get(f"{url.rstrip('/')}/v1/models", params={"limit": 1}, headers=headers, timeout=30)
    first.raise_for_status()
    return first.json()["data"][0]["id"]


def _tokenizer_for(base: str) -> Path:
    """The embedded default model's tokenizer folder, if that is what the server runs."""
    from server.base_model import DEFAULT_SERVED_NAME, default_gguf_path, materialize_gguf
    from server.config import ModelSettings

    if base != DEFAULT_SERVED_NAME:
        raise SystemExit(f"the server runs {base!r}: pass its tokenizer folder with --tokenizer DIR")
    return materialize_gguf(default_gguf_path(), ModelSettings().cache)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the running peftserve server")
    parser.add_argument("--adapter", action="append", default=[], help="adapter to score beside the base")
    parser.add_argument("--tasks", default=DEFAULT_TASK, help="comma-separated lm-eval task names")
    parser.add_argument(
        "--tokenizer",
        help="the base model's tokenizer folder (default: the embedded default model's)",
    )
    parser.add_argument("--limit", type=int, help="documents per task (default all)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per request")
    parser.add_argument(
        "--api-key", default=os.environ.get("PEFTSERVE_API_KEY"), help="the server's --api-key"
    )
    parser.add_argument("--out", type=Path, help="write the scores as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    tasks = args.tasks.split(",")
    base = _served_base(args.url, args.api_key)
    tokenizer = args.tokenizer or _tokenizer_for(base)
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for model in [base, *args.adapter]:
        results = served_scores(args.url, model, tokenizer, tasks, args.batch_size, args.limit, args.api_key)
        scores[model] = {t: metrics_of(results, t) for t in tasks}
    width = max(len(m) for m in scores)
    for task in tasks:
        print(f"\n{task}")
        print(f"  {'model':<{width}}  " + "  ".join(f"{m:>8}" for m in METRICS))
        for model, per_task in scores.items():
            row = per_task[task]
            print(f"  {model:<{width}}  " + "  ".join(f"{row.get(m, float('nan')):>8.4f}" for m in METRICS))
    if args.out:
        args.out.write_text(json.dumps(scores, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
