"""Per-request sampling over a batch of logits.

Every request owns a torch.Generator seeded from its `seed` (or a random one), and draws
exactly one uniform number per generated token from it, so a seeded request gives the same
tokens whatever else shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.engine.grammar import GrammarSpec


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens."""

    max_tokens: int
    """Tokens to generate at most; 0 prefills only (to score the prompt)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    """Report each sampled token's log-probability and this many most likely tokens; None: nothing."""
    prompt_logprobs: int | None = None
    """The same for every prompt token after the first; None: nothing (and the prefix cache may serve it)."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias added to its logit), applied before sampling, greedy rows included."""
    grammar: GrammarSpec | None = None
    """What the output must match; tokens it forbids are masked before sampling."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def new_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits (R, V); top_k (R,) with 0 = off; top_p (R,) with 1 = off. Masks the tail with -inf."""
    ordered, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device)
    k = torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
    drop = rank >= k  # (R, V) in sorted order
    probs = ordered.softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= (mass_before >= top_p.unsqueeze(1)) & (rank > 0)
    ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, ordered)


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
) -> list[int]:
    """(B, V) float32 logits -> one token id per row."""
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if len(sampled) < len(params):
        tokens = logits.argmax(dim=-1)
    else:  # no greedy row: an argmax over (B, V) float32 would cost as much as the sampling
        tokens = torch.empty(len(params), dtype=torch.long, device=logits.device)
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        rows = logits.index_select(0, index)
        temperature = torch.tensor([params[i].temperature for i in sampled], device=logits.device)
        rows = rows / temperature.unsqueeze(1)
        if any(params[i].top_k > 0 or params[i].top_p < 1.0 for i in sampled):
            top_k = torch.tensor([params[i].top_k for i in sampled], device=logits.device)
            top_p = torch.tensor([params[i].top_p for i in sampled], device=logits.device)
            rows = _filter_top_k_top_p(rows, top_k, top_p)
        tokens[index] = _inverse_cdf(rows.softmax(dim=-1), [generators[i] for i in sampled])
    return tokens.tolist()


def _inverse_cdf(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """probs (R, V) -> (R,) one draw per row: the first token whose cumulative probability reaches
    u * total, u in (0, 1] from the row's own generator.

    One number per row, not one per vocabulary entry as an argmax(p / Exp(1)) race needs: on the
    CPU that race drew 28 x 49152 exponentials per step, as long as the whole decode step. Each
    token's chance is its own cumulative step, off by one float32 rounding at most; a token of
    probability 0 adds nothing to the sum and is never reached (the clamp keeps a NaN row in range).
    """
    cdf = probs.cumsum(dim=-1)  # (R, V)
    u = 1.0 - torch.cat([torch.rand(1, generator=g) for g in generators]).to(probs.device)  # (R,)
    target = (u * cdf[:, -1]).unsqueeze(1)  # (R, 1)
    return torch.searchsorted(cdf, target).squeeze(1).clamp(max=probs.shape[-1] - 1)
