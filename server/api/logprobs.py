"""OpenAI's two logprobs shapes, from the engine's plain TokenLogprob entries.

Chat: `{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], "refusal": null}`.
Completions (legacy): `{tokens, token_logprobs, top_logprobs, text_offset}`, one entry per token,
where `top_logprobs` maps token text to log-probability and also holds the chosen token (as vLLM
does), and an echoed prompt's first token has `null` for both.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from server.engine.request import TokenLogprob

FLOOR = -9999.0
"""Log-probabilities below this are reported as it (as OpenAI does): JSON has no -Infinity."""


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the character each byte is written as, reversed."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


BYTE_ALPHABET = _byte_alphabet()


class TokenText:
    """Each token id's text (decoded alone, as vLLM reports it) and its exact UTF-8 bytes."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = json.loads(backend.to_str()).get("decoder") if backend is not None else None
        self.byte_level = bool(decoder) and decoder.get("type") == "ByteLevel"
        self.text = lru_cache(maxsize=1 << 16)(self._text)
        self.bytes = lru_cache(maxsize=1 << 16)(self._bytes)

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode(
            [token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def _bytes(self, token_id: int) -> tuple[int, ...]:
        """A token that is part of a character decodes to U+FFFD alone; its own bytes are still exact."""
        if self.byte_level:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and all(c in BYTE_ALPHABET for c in piece):
                return tuple(BYTE_ALPHABET[c] for c in piece)
        return tuple(self.text(token_id).encode("utf-8"))


def _value(logprob: float) -> float:
    return max(logprob, FLOOR)


def chat_content(text: TokenText, entries: Iterable[TokenLogprob]) -> list[dict[str, Any]]:
    """The `content` list of a chat choice's `logprobs`."""

    def one(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": text.text(token_id), "logprob": _value(logprob), "bytes": list(text.bytes(token_id))}

    return [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top]} for e in entries]


def chat_logprobs(text: TokenText, entries: Iterable[TokenLogprob]) -> dict[str, Any]:
    return {"content": chat_content(text, entries), "refusal": None}


def completion_logprobs(
    text: TokenText, entries: Iterable[tuple[int, TokenLogprob | None]], offset: int = 0
) -> tuple[dict[str, Any], int]:
    """The legacy shape for these (token id, its log-probability or None) pairs, whose text starts at
    character `offset` of the choice's text; returns it and the offset after them (streams carry it
    from chunk to chunk)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, entry in entries:
        token = text.text(token_id)
        out["tokens"].append(token)
        out["text_offset"].append(offset)
        offset += len(token)
        if entry is None:  # an echoed prompt's first token: nothing came before it
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        top = {text.text(t): _value(v) for t, v in entry.top}
        top.setdefault(token, _value(entry.logprob))
        out["token_logprobs"].append(_value(entry.logprob))
        out["top_logprobs"].append(top)
    return out, offset
