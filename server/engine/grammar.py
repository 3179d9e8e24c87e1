"""Per-row logits processing between the forward pass and sampling: logit_bias and grammar masks.

A request may carry a bias per token id and a grammar (a JSON schema, any JSON, a regular
expression or a list of choices). Each running row that has either owns a `RowControl`; one call
per step, `apply_controls`, turns the batch's raw (B, V) logits into the ones sampling sees,
leaving rows without a control as they are. Grammars run on xgrammar (chosen on CPU mask cost,
see bench/bench_grammar.py): a matcher per row fills that row's bitmask, which allows the
end-of-sequence token only where the grammar accepts. A grammar is compiled once per distinct
spec (an LRU cache) and callers compile it off the engine thread before submitting.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import xgrammar as xgr
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from server.engine.request import InvalidRequest

GRAMMAR_CACHE_SIZE = 256
"""Distinct compiled grammars kept (a compiled JSON schema is tens of kB on this vocabulary)."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a row's output must match. `source`: the schema as JSON text (kind json; empty: any
    JSON value), the regular expression (regex), or a JSON list of strings (choice)."""

    kind: Literal["json", "regex", "choice"]
    source: str = ""
    param: str = "response_format"
    """The request field it came from, named in errors."""

    @classmethod
    def json_schema(cls, schema: dict | None, param: str) -> GrammarSpec:
        return cls("json", "" if schema is None else json.dumps(schema), param)


class GrammarCompiler:
    """Compiles specs for one tokenizer, once per distinct spec; thread safe."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_ids: Sequence[int]) -> None:
        self.vocab_size = vocab_size
        self._tokenizer, self._stop_ids = tokenizer, sorted(stop_ids)
        self._compiler: xgr.GrammarCompiler | None = None
        self._cache: OrderedDict[GrammarSpec, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0
        """Specs compiled so far (cache misses)."""

    def _xgr(self) -> xgr.GrammarCompiler:
        """The tokenizer's xgrammar compiler, built on first use (0.2 s for a 49k vocabulary)."""
        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self.vocab_size, stop_token_ids=self._stop_ids
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    def compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        """The compiled grammar of a spec; InvalidRequest naming spec.param if it is not one."""
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        compiler = self._xgr()
        try:
            compiled = self._compile(compiler, spec)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise InvalidRequest(
                spec.param, f"cannot build a grammar from `{spec.param}`: {_reason(exc)}"
            ) from exc
        if not _admits_a_token(compiled, self.vocab_size):
            raise InvalidRequest(spec.param, f"`{spec.param}` admits no output at all")
        with self._lock:
            self.compiled += 1
            self._cache[spec] = compiled
            while len(self._cache) > GRAMMAR_CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    @staticmethod
    def _compile(compiler: xgr.GrammarCompiler, spec: GrammarSpec) -> xgr.CompiledGrammar:
        if spec.kind == "json":
            if not spec.source:
                return compiler.compile_builtin_json_grammar()
            # Compact separators: a free-whitespace grammar lets a small model pad forever.
            grammar = xgr.Grammar.from_json_schema(spec.source, any_whitespace=False)
            return compiler.compile_grammar(_no_raw_control_characters(grammar))
        if spec.kind == "regex":
            return compiler.compile_regex(spec.source)
        choices = json.loads(spec.source)
        # ensure_ascii=False: xgrammar's EBNF strings take UTF-8 and the escapes JSON uses for
        # quotes, backslashes and control characters.
        rule = " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
        return compiler.compile_grammar(xgr.Grammar.from_ebnf(f"root ::= {rule}"))


def _reason(exc: Exception) -> str:
    """xgrammar's message without its log prefix ("[12:00:00] /project/cpp/file.cc:94: ")."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", first)


def _admits_a_token(compiled: xgr.CompiledGrammar, vocab_size: int) -> bool:
    """Whether anything may be written first (a schema like {"allOf": [...]} may admit nothing)."""
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    xgr.GrammarMatcher(compiled).fill_next_token_bitmask(bitmask, 0)
    return bool(bitmask.any())


def _no_raw_control_characters(grammar: xgr.Grammar) -> xgr.Grammar:
    """xgrammar 0.2.9 lets a length-bounded string ("maxLength") hold raw control characters, which
    JSON forbids (json.loads refuses them): narrow that class to the one its other strings use."""
    text = str(grammar)
    fixed = text.replace(r"[^\"\\\r\n]", r"[^\0-\x1f\"\\\r\n]")
    return grammar if fixed == text else xgr.Grammar.from_ebnf(fixed)


class RowControl:
    """One row's logits processing: a bias per token id and/or a grammar matcher."""

    def __init__(
        self, bias: Sequence[tuple[int, float]] = (), grammar: xgr.CompiledGrammar | None = None
    ) -> None:
        self.bias_ids = torch.tensor([t for t, _ in bias], dtype=torch.long)
        self.bias_values = torch.tensor([b for _, b in bias], dtype=torch.float32)
        self.matcher = xgr.GrammarMatcher(grammar) if grammar is not None else None

    def accept(self, token: int) -> bool:
        """Advance the grammar past a sampled token; False if the grammar refuses it."""
        return self.matcher is None or self.matcher.accept_token(token)

    @property
    def ended(self) -> bool:
        """The grammar took its end-of-sequence token: nothing more may follow."""
        return self.matcher is not None and self.matcher.is_terminated()


def apply_controls(logits: torch.Tensor, controls: Sequence[RowControl | None]) -> torch.Tensor:
    """(B, V) raw logits -> (B, V) with each row's bias added, then its grammar mask (-inf where
    the grammar forbids the token). Returns the input itself when no row has a control, else a copy,
    so callers that read the raw logits (logprobs) still can."""
    if all(c is None for c in controls):
        return logits
    out = logits.clone()
    masked = []
    for row, control in enumerate(controls):
        if control is None:
            continue
        if control.bias_ids.numel():
            ids = control.bias_ids.to(out.device)
            out[row].index_add_(0, ids, control.bias_values.to(out.device, out.dtype))
        if control.matcher is not None:
            masked.append(row)
    if masked:
        bitmask = xgr.allocate_token_bitmask(len(controls), out.shape[-1])  # (B, ceil(V / 32)) int32
        for row in masked:
            controls[row].matcher.fill_next_token_bitmask(bitmask, row)
        xgr.apply_token_bitmask_inplace(out, bitmask.to(out.device), indices=masked)
    return out
