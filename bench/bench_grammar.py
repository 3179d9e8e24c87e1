"""Grammar engines on CPU, on the default model's vocabulary (49,152 tokens), in one process.

Parts (all by default; --parts picks some):
  masks   per engine installed (xgrammar, llguidance, outlines-core): compile time of a JSON
          schema of nested objects, enums and arrays, and the mean / p90 / max time to compute one
          row's token mask, walking the tokens of a valid document (mask, then accept the token).
  batch   the engine: generated tokens/s of 16 greedy requests of 64 new tokens with no row
          constrained, and with half of them constrained to that schema (its tags array made
          long enough that every row writes all 64 tokens, so both runs do the same work), and
          their ratio, by wall time and by this process's CPU time (steadier on a shared
          machine); the best of --rounds rounds each, alternating.

    python -m bench.bench_grammar --out bench/results/grammar.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "owner": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Lima", "Oslo"]},
                "verified": {"type": "boolean"},
            },
            "required": ["city", "verified"],
        },
        "tags": {"type": "array", "items": {"enum": ["calm", "loud", "old"]}, "maxItems": 3},
    },
    "required": ["name", "kind", "age", "owner", "tags"],
}
DOCUMENT = '{"name": "Rex the second", "kind": "dog", "age": 7, "owner": {"city": "Oslo", "verified": true}, "tags": ["calm", "old"]}'  # noqa: E501


def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def walk_xgrammar(
    tokenizer: PreTrainedTokenizerBase, ids: list[int], vocab: int
) -> tuple[float, list[float]]:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info)
    compiled, compile_s = _timed(lambda: compiler.compile_json_schema(SCHEMA, any_whitespace=False))
    matcher = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, vocab)
    times = []
    for token in ids:
        started = time.perf_counter()
        matcher.fill_next_token_bitmask(mask, 0)
        times.append(time.perf_counter() - started)
        if not matcher.accept_token(token):
            raise RuntimeError(f"xgrammar refused token {token}")
    return compile_s, times


def walk_llguidance(
    tokenizer: PreTrainedTokenizerBase, ids: list[int], vocab: int
) -> tuple[float, list[float]]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    compact = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=compact)
    matcher, compile_s = _timed(lambda: llguidance.LLMatcher(lltok, grammar))
    if matcher.is_error():
        raise RuntimeError(matcher.get_error())
    mask = llguidance.torch.allocate_token_bitmask(1, vocab)
    times = []
    for token in ids:
        started = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        times.append(time.perf_counter() - started)
        if not matcher.consume_token(token):
            raise RuntimeError(f"llguidance refused token {token}: {matcher.get_error()}")
    return compile_s, times


# GPT-2's byte-level alphabet: these bytes stand for themselves, the others for chr(256 + n).
_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]


def _byte_level_vocabulary(tokenizer: PreTrainedTokenizerBase, vocab: int) -> dict[bytes, list[int]]:
    """Token -> ids as raw bytes (outlines-core's Vocabulary wants the decoded bytes of each token)."""
    decode = {chr(c): c for c in _PRINTABLE}
    decode.update({chr(256 + i): c for i, c in enumerate(c for c in range(256) if c not in _PRINTABLE)})
    special = set(tokenizer.all_special_ids)
    table: dict[bytes, list[int]] = {}
    for token, index in tokenizer.get_vocab().items():
        if index < vocab and index not in special:
            table.setdefault(bytes(decode[c] for c in token), []).append(index)
    return table


def walk_outlines(
    tokenizer: PreTrainedTokenizerBase, ids: list[int], vocab: int
) -> tuple[float, list[float]]:
    import outlines_core

    vocabulary = outlines_core.Vocabulary(tokenizer.eos_token_id, _byte_level_vocabulary(tokenizer, vocab))
    regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(SCHEMA))
    index, compile_s = _timed(lambda: outlines_core.Index(regex, vocabulary))
    guide = outlines_core.Guide(index)
    mask = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)
    times = []
    for token in ids:
        started = time.perf_counter()
        guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
        times.append(time.perf_counter() - started)
        guide.advance(token)
    return compile_s, times


ENGINES = {"xgrammar": walk_xgrammar, "llguidance": walk_llguidance, "outlines_core": walk_outlines}


def masks(model_dir: Path, vocab: int) -> dict[str, dict[str, float]]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(DOCUMENT, add_special_tokens=False).input_ids
    results: dict[str, dict[str, float]] = {}
    for name, walk in ENGINES.items():
        if importlib.util.find_spec(name) is None:
            print(f"{name}: not installed, skipped", file=sys.stderr)
            continue
        compile_s, times = walk(tokenizer, ids, vocab)
        times_us = sorted(t * 1e6 for t in times)
        results[name] = {
            "compile_ms": compile_s * 1e3,
            "mask_us_mean": statistics.fmean(times_us),
            "mask_us_p90": times_us[int(0.9 * (len(times_us) - 1))],
            "mask_us_max": times_us[-1],
            "tokens": len(ids),
        }
        print(f"{name}: {json.dumps({k: round(v, 1) for k, v in results[name].items()})}", file=sys.stderr)
    return results


def batch(rows: int, new_tokens: int, rounds: int) -> dict[str, float | str]:
    from server.base_model import load_base_model
    from server.config import Settings
    from server.engine.engine import Engine
    from server.engine.grammar import GrammarSpec
    from server.engine.request import Finished
    from server.engine.sampler import SamplingParams

    model = load_base_model(Settings.load({}).model)
    engine = Engine(model, Settings.load({"max_batch_size": rows}).engine)
    prompt = engine.encode_chat([{"role": "user", "content": "Describe a pet as JSON."}])
    long_tags = {**SCHEMA["properties"]["tags"], "minItems": 40, "maxItems": 50}
    spec = GrammarSpec.json_schema(
        {**SCHEMA, "properties": {**SCHEMA["properties"], "tags": long_tags}}, "bench"
    )

    def run(constrained: int) -> tuple[float, float]:
        """(tokens per wall second, tokens per CPU second of this process)."""
        params = [
            SamplingParams(
                max_tokens=new_tokens,
                temperature=0.0,
                ignore_eos=True,
                grammar=spec if i < constrained else None,
            )
            for i in range(rows)
        ]
        handles = [engine.submit(prompt, p) for p in params]
        started, cpu, generated = time.perf_counter(), time.process_time(), 0
        while handles:
            engine.step()
            for handle in list(handles):
                for event in handle.drain():
                    if isinstance(event, Finished):
                        generated += event.completion_tokens
                        handles.remove(handle)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        if generated != rows * new_tokens:
            raise RuntimeError(
                f"{generated} tokens instead of {rows * new_tokens}: the runs would not compare"
            )
        return generated / wall, generated / cpu

    run(rows // 2)  # compiles the grammar (cached from then on) and warms the model
    best = {"none": (0.0, 0.0), "half": (0.0, 0.0)}
    for _ in range(rounds):
        for name, constrained in (("none", 0), ("half", rows // 2)):
            wall, cpu = run(constrained)
            best[name] = (max(best[name][0], wall), max(best[name][1], cpu))
    out = {
        "dtype": str(model.dtype).removeprefix("torch."),
        "tokens_per_s_none": best["none"][0],
        "tokens_per_s_half_constrained": best["half"][0],
        "ratio": best["half"][0] / best["none"][0],
        "tokens_per_cpu_s_none": best["none"][1],
        "tokens_per_cpu_s_half_constrained": best["half"][1],
        "cpu_ratio": best["half"][1] / best["none"][1],
    }
    print(f"batch of {rows}: {json.dumps(out)}", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", nargs="+", default=["masks", "batch"], choices=["masks", "batch"])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from server.base_model import default_gguf_path, materialize_gguf
    from server.config import ModelSettings

    model_dir = materialize_gguf(default_gguf_path(), ModelSettings().cache)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    results: dict[str, object] = {"cpu": platform.processor() or platform.machine(), "vocab": vocab}
    if "masks" in args.parts:
        results["masks"] = masks(model_dir, vocab)
    if "batch" in args.parts:
        results["batch"] = batch(args.rows, args.new_tokens, args.rounds)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
