"""Our decoder forward over the paged cache against the HF model's own forward; attention's fast paths
against their reference."""

from __future__ import annotations

import pytest
import torch

from server.adapters.context import BatchContext
from server.engine import attention
from server.engine.attention import (
    decode_attention,
    paged_attention_reference,
    paged_decode_attention,
    sdpa_attention,
)
from server.engine.kv_cache import PagedKVCache
from server.engine.model import Decoder, StepInputs

BLOCK = 4


def make_cache(shape, blocks: int = 32) -> PagedKVCache:
    return PagedKVCache(
        shape.num_layers,
        blocks,
        BLOCK,
        shape.num_kv_heads,
        shape.head_dim,
        torch.float32,
        torch.device("cpu"),
    )


def step_inputs(tables: list[list[int]], starts: list[int], lengths: list[int]) -> StepInputs:
    """Rows from `starts` with `lengths` real tokens, padded to the longest, over these block tables."""
    width = max(lengths)
    positions = torch.tensor(starts).unsqueeze(1) + torch.arange(width)
    table = torch.zeros(len(tables), max(map(len, tables)), dtype=torch.long)
    for i, blocks in enumerate(tables):
        table[i, : len(blocks)] = torch.tensor(blocks)
    real = torch.arange(width) < torch.tensor(lengths).unsqueeze(1)
    slots = torch.where(real, table.gather(1, positions // BLOCK) * BLOCK + positions % BLOCK, 0)
    return StepInputs(positions, table, slots)


def last_logits(
    decoder: Decoder, ids: torch.Tensor, step: StepInputs, lengths: list[int], cache
) -> torch.Tensor:
    """(B, T) ids, `lengths` real tokens per row, one rectangle -> (B, vocab) logits at each last one."""
    batch, width = ids.shape
    embeds = decoder.embed(ids, BatchContext()).view(batch * width, -1)
    hidden = decoder.hidden(embeds, [step], BatchContext(), cache)  # (B * T, hidden)
    last = torch.tensor([i * width + n - 1 for i, n in enumerate(lengths)])
    return decoder.logits(hidden[last], BatchContext())


def test_padded_prefill_then_decode_over_scattered_blocks_match_hf_logits(tiny_model):
    hf, shape = tiny_model.hf, tiny_model.shape
    decoder = Decoder(hf, shape)
    cache = make_cache(shape)
    cache.data.normal_()  # stale keys and values of earlier sequences: never read
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    tables = [[7, 3], [12], [2, 30]]  # out of order, and not adjacent
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    lengths = [len(p) for p in prompts]
    logits = last_logits(decoder, ids, step_inputs(tables, [0, 0, 0], lengths), lengths, cache)
    tables[2].append(9)  # the third row's next token opens a new block
    decode = step_inputs(tables, lengths, [1, 1, 1])
    decoded = last_logits(decoder, torch.tensor([[20], [21], [22]]), decode, [1, 1, 1], cache)
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            full = hf(torch.tensor([[*prompt, 20 + i]])).logits[0]
        torch.testing.assert_close(logits[i], full[len(prompt) - 1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(decoded[i], full[len(prompt)], rtol=1e-4, atol=1e-4)


def test_prefill_from_a_shared_prefix_matches_a_full_prefill(tiny_model):
    # Two sequences share the blocks of their first 8 tokens; the second prefills only its rest.
    hf, shape = tiny_model.hf, tiny_model.shape
    decoder = Decoder(hf, shape)
    cache = make_cache(shape)
    first, second = [5, 6, 7, 8, 9, 10, 11, 12, 13], [5, 6, 7, 8, 9, 10, 11, 12, 40, 41]
    last_logits(decoder, torch.tensor([first]), step_inputs([[4, 5, 6]], [0], [9]), [9], cache)
    rest = torch.tensor([second[8:]])
    logits = last_logits(decoder, rest, step_inputs([[4, 5, 8]], [8], [2]), [2], cache)
    with torch.no_grad():
        full = hf(torch.tensor([second])).logits[0, -1]
    torch.testing.assert_close(logits[0], full, rtol=1e-4, atol=1e-4)


def test_padding_tokens_write_only_the_null_block(tiny_model):
    shape = tiny_model.shape
    decoder = Decoder(tiny_model.hf, shape)
    cache = make_cache(shape)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [9, 10, 0, 0, 0, 0, 0, 0]])
    last_logits(decoder, ids, step_inputs([[1, 2], [3]], [0, 0], [8, 2]), [8, 2], cache)
    written = cache.data.abs().sum(dim=(0, 1, 4, 5)) != 0  # (blocks, block_size)
    assert written[3].tolist() == [True, True, False, False]  # the short row's block past its 2 tokens
    assert not written[4:].any()  # no block the step did not hold


def random_pools(blocks: int, kv_heads: int, dim: int, dtype: torch.dtype):
    return (torch.randn(blocks, BLOCK, kv_heads, dim, dtype=dtype) for _ in range(2))


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_attention_equals_the_reference(dtype, native):
    # 6 query heads over 2 kv heads; rows of different lengths over scattered blocks, one sees one key.
    torch.manual_seed(0)
    heads, kv_heads, dim = 6, 2, 64
    k_pool, v_pool = random_pools(40, kv_heads, dim, dtype)
    table = torch.randperm(39)[:16].view(4, 4) + 1
    positions = torch.tensor([[14], [3], [0], [9]])
    q = torch.randn(4, heads, 1, dim, dtype=dtype)
    fast = paged_decode_attention(q, k_pool, v_pool, table, positions, dim**-0.5, native=native)
    reference = paged_attention_reference(q, k_pool, v_pool, table, positions, dim**-0.5)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fast, reference, atol=tolerance, rtol=tolerance)


def test_the_native_decode_kernel_builds_here():
    assert attention._native_kernel() is not None


@pytest.mark.parametrize("dim", [64, 16])
def test_native_kernel_never_reads_past_a_sequence(dim):
    # Keys and values past each row's position are NaN: the kernel must not touch them.
    torch.manual_seed(1)
    k_pool, v_pool = random_pools(9, 3, dim, torch.float32)
    table = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    positions = torch.tensor([[13], [5]])
    reference = paged_attention_reference(
        q := torch.randn(2, 9, 1, dim), k_pool, v_pool, table, positions, dim**-0.5
    )
    for pool in (k_pool, v_pool):
        pool[4, 2:] = float("nan")
        pool[6, 2:] = float("nan")
        pool[0] = float("nan")
    fast = paged_decode_attention(q, k_pool, v_pool, table, positions, dim**-0.5)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)


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
