"""Log-probabilities for the rows that ask for them, as plain Python data.

Values are the log-softmax of the raw logits of the row's adapter, before temperature, top-k/top-p
or any other processing (what vLLM reports by default): the model's own distribution.
"""

from __future__ import annotations

import torch

from server.engine.request import TokenLogprob

MAX_LOGPROBS = 20
"""Most alternatives per position a request may ask for (OpenAI's chat limit)."""

POSITIONS_PER_PASS = 256
"""Prompt positions turned into (positions, vocab) log-probabilities at once: bounds the memory."""


def token_logprobs(logits: torch.Tensor, targets: list[int], top: list[int]) -> list[TokenLogprob]:
    """(R, V) raw logits, the token chosen at each row, and how many alternatives each row wants.

    One log-softmax over the R rows, one top-k of the widest request; the results leave the device
    in two transfers.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (R, V)
    index = torch.tensor(targets, device=logits.device).unsqueeze(1)
    chosen = logprobs.gather(1, index).squeeze(1).tolist()  # (R,)
    width = max(top, default=0)
    best_values, best_ids = ([[]] * len(targets), [[]] * len(targets))
    if width > 0:
        values, ids = logprobs.topk(width, dim=-1)  # (R, width), best first
        best_values, best_ids = values.tolist(), ids.tolist()
    return [
        TokenLogprob(token, value, tuple(zip(ids[:k], values[:k], strict=True)))
        for token, value, ids, values, k in zip(targets, chosen, best_ids, best_values, top, strict=True)
    ]


def prompt_logprobs(
    hidden: torch.Tensor, head, prompt_ids: list[int], top: int
) -> tuple[TokenLogprob | None, ...]:
    """(P, hidden) last-layer states at the prompt's positions -> each prompt token's log-probability.

    The state at position i predicts token i + 1; the first token has nothing before it (None).
    `head` maps (n, hidden) states to (n, vocab) logits.
    """
    out: list[TokenLogprob | None] = [None]
    for start in range(0, len(prompt_ids) - 1, POSITIONS_PER_PASS):
        end = min(start + POSITIONS_PER_PASS, len(prompt_ids) - 1)
        logits = head(hidden[start:end])  # (n, vocab)
        out += token_logprobs(logits, prompt_ids[start + 1 : end + 1], [top] * (end - start))
    return tuple(out)
