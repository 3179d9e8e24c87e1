"""Our decoder forward against the HF model's own forward."""

from __future__ import annotations

import pytest
import torch

from server.adapters.context import BatchContext
from server.engine.kv_cache import KVCache
from server.engine.model import Decoder, StepInputs, decode_attention, sdpa_attention


def test_padded_prefill_then_decode_match_hf_logits(tiny_model):
    hf, shape = tiny_model.hf, tiny_model.shape
    decoder = Decoder(hf, shape)
    cache = KVCache(
        shape.num_layers, 4, shape.num_kv_heads, 64, shape.head_dim, torch.float32, torch.device("cpu")
    )
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in prompts])
    step = StepInputs(0, torch.arange(width).expand(3, width), lengths, BatchContext())
    logits = decoder.forward(decoder.embed(ids), step, cache)
    next_ids = torch.tensor([[20], [21], [22]])
    decode = StepInputs(0, lengths.unsqueeze(1), torch.ones(3, dtype=torch.long), BatchContext())
    decoded = decoder.forward(decoder.embed(next_ids), decode, cache)
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            full = hf(torch.tensor([[*prompt, 20 + i]])).logits[0]
        torch.testing.assert_close(logits[i], full[len(prompt) - 1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(decoded[i], full[len(prompt)], rtol=1e-4, atol=1e-4)


def test_rows_moved_in_the_cache_keep_their_keys(tiny_model):
    shape = tiny_model.shape
    cache = KVCache(
        shape.num_layers, 3, shape.num_kv_heads, 16, shape.head_dim, torch.float32, torch.device("cpu")
    )
    cache.data.normal_()
    expected = cache.data[:, :, 2, :, :5].clone()
    cache.move_row(2, 0, 5)
    torch.testing.assert_close(cache.data[:, :, 0, :, :5], expected)


def test_unwritten_cache_memory_never_reaches_the_output(tiny_model):
    shape = tiny_model.shape
    decoder = Decoder(tiny_model.hf, shape)
    cache = KVCache(
        shape.num_layers, 2, shape.num_kv_heads, 300, shape.head_dim, torch.float32, torch.device("cpu")
    )
    cache.data.fill_(float("nan"))  # what recycled memory may hold
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    step = StepInputs(0, torch.arange(4).expand(2, 4), torch.tensor([4, 2]), BatchContext())
    logits = decoder.forward(decoder.embed(ids), step, cache)
    assert torch.isfinite(logits).all()
    # A decode step far into the cache reads a fresh block.
    far = StepInputs(0, torch.tensor([[270], [4]]), torch.ones(2, dtype=torch.long), BatchContext())
    assert torch.isfinite(decoder.forward(decoder.embed(torch.tensor([[1], [2]])), far, cache)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_sdpa(dtype):
    # 6 query heads over 2 kv heads; rows see different numbers of keys, one only its first.
    torch.manual_seed(0)
    batch, heads, kv_heads, span, dim = 4, 6, 2, 9, 16
    q = torch.randn(batch, heads, 1, dim, dtype=dtype)
    keys, values = (torch.randn(batch, kv_heads, span, dim, dtype=dtype) for _ in range(2))
    positions = torch.tensor([[8], [3], [0], [5]])  # (B, 1)
    visible = torch.arange(span) <= positions.unsqueeze(-1)  # (B, 1, L)
    fast = decode_attention(q, keys, values, visible, dim**-0.5)
    reference = sdpa_attention(q, keys, values, visible, dim**-0.5)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fast, reference, atol=tolerance, rtol=tolerance)
