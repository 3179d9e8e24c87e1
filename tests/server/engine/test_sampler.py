"""Sampling: greedy, filters, seeds, and the distribution it draws from."""

from __future__ import annotations

import torch

from server.engine.sampler import SamplingParams, new_generator, sample


def logits_for(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs).log().unsqueeze(0)


def test_greedy_is_argmax():
    logits = torch.randn(3, 50)
    params = [SamplingParams(max_tokens=1, temperature=0.0)] * 3
    assert sample(logits, params, [new_generator(0)] * 3) == logits.argmax(-1).tolist()


def test_top_k_one_and_top_p_zero_are_greedy():
    logits = torch.randn(2, 50)
    params = [SamplingParams(1, temperature=1.5, top_k=1), SamplingParams(1, temperature=1.5, top_p=0.0)]
    assert sample(logits, params, [new_generator(None), new_generator(None)]) == logits.argmax(-1).tolist()


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = logits_for([0.5, 0.3, 0.15, 0.05])
    params = SamplingParams(1, temperature=1.0, top_p=0.7)
    draws = {sample(logits, [params], [new_generator(seed)])[0] for seed in range(300)}
    assert draws == {0, 1}


def test_top_k_limits_candidates():
    logits = logits_for([0.4, 0.3, 0.2, 0.1])
    params = SamplingParams(1, temperature=1.0, top_k=3)
    draws = {sample(logits, [params], [new_generator(seed)])[0] for seed in range(300)}
    assert draws == {0, 1, 2}


def test_draws_follow_the_distribution():
    probs = [0.6, 0.3, 0.1]
    logits = logits_for(probs)
    generator = new_generator(0)
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[sample(logits, [SamplingParams(1)], [generator])[0]] += 1
    assert torch.allclose(counts / counts.sum(), torch.tensor(probs), atol=0.03)


def test_temperature_sharpens():
    logits = logits_for([0.5, 0.3, 0.2])
    cold = SamplingParams(1, temperature=0.05)
    draws = [sample(logits, [cold], [new_generator(seed)])[0] for seed in range(100)]
    assert draws.count(0) >= 99


def test_seeded_rows_are_independent_of_neighbours():
    logits = torch.randn(4, 100)
    params = [
        SamplingParams(1, seed=5),
        SamplingParams(1, temperature=0.0),
        SamplingParams(1, seed=6),
        SamplingParams(1),
    ]
    first = sample(logits, params, [new_generator(p.seed) for p in params])
    alone = sample(logits[2:3], [params[2]], [new_generator(6)])
    assert first[2] == alone[0]
