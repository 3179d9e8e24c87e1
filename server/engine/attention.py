"""Attention over the paged KV cache, with the torch reference the fast paths are held to.

A sequence's key t lives in block `block_table[b, t // block_size]` at offset `t % block_size` of
a pool shaped (blocks, block_size, kv_heads, head_dim). The reference gathers a sequence's
blocks into a dense (kv_heads, L, head_dim) tensor and runs SDPA over it; prefill does just that
(it is compute-bound, the gather is small beside it). Decode has one query per sequence and is
bound by reading the cache: on the CPU a native kernel (paged_attention.c) reads each block in
place, elsewhere (a GPU, float16, no compiler) the gather is followed by two batched matmuls.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from server.adapters.lowrank import CFLAGS, KernelBuildError, build_kernel, load_kernel_function

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("paged_attention.c")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def sdpa_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scale: float
) -> torch.Tensor:
    """q (B, heads, T, D); keys, values (B, kv_heads, L, D); visible (B, T, L) -> (B, heads, T, D)."""
    mask = visible.unsqueeze(1)  # (B, 1, T, L)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scale: float
) -> torch.Tensor:
    """sdpa_attention for one new token per row (T = 1), as two batched matmuls.

    CPU SDPA runs its flash kernel even for a single query: at batch 64 that is ~4x slower than
    this.
    """
    batch, heads, _, dim = q.shape
    kv_heads, span = keys.shape[1], keys.shape[2]
    q = q.reshape(batch, kv_heads, heads // kv_heads, dim)  # query heads grouped by their kv head
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * scale  # (B, kv_heads, group, L)
    scores = scores.masked_fill(~visible.view(batch, 1, 1, span), float("-inf"))
    probs = scores.softmax(-1).to(values.dtype)
    return torch.matmul(probs, values).view(batch, heads, 1, dim)


def gather_blocks(pool: torch.Tensor, block_table: torch.Tensor, span: int) -> torch.Tensor:
    """pool (blocks, block_size, kv_heads, D), block_table (B, nb) -> (B, kv_heads, span, D), dense."""
    block_size = pool.shape[1]
    needed = -(-span // block_size)
    dense = pool[block_table[:, :needed]]  # (B, needed, block_size, kv_heads, D)
    return dense.flatten(1, 2)[:, :span].transpose(1, 2)


def paged_attention_reference(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    span: int | None = None,
) -> torch.Tensor:
    """q (B, heads, T, D) at positions (B, T) -> (B, heads, T, D); key j is seen from position p if j <= p.

    span: max(positions) + 1, which the caller knows on the host; None reads it from `positions`,
    a host sync on a GPU.
    """
    span = int(positions.max()) + 1 if span is None else span
    visible = torch.arange(span, device=q.device) <= positions.unsqueeze(-1)  # (B, T, L)
    keys, values = gather_blocks(k_pool, block_table, span), gather_blocks(v_pool, block_table, span)
    return sdpa_attention(q, keys, values, visible, scale)


def paged_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    span: int | None = None,
    native: bool = True,
) -> torch.Tensor:
    """paged_attention_reference for T = 1: the native kernel where it runs, else gather + matmuls."""
    kernel = _native_kernel() if native and _kernel_runs(q, k_pool) else None
    if kernel is not None:
        return kernel.decode(q, k_pool, v_pool, block_table, positions, scale)
    span = int(positions.max()) + 1 if span is None else span
    visible = torch.arange(span, device=q.device) <= positions.unsqueeze(-1)  # (B, 1, L)
    keys, values = gather_blocks(k_pool, block_table, span), gather_blocks(v_pool, block_table, span)
    return decode_attention(q, keys, values, visible, scale)


def _kernel_runs(q: torch.Tensor, pool: torch.Tensor) -> bool:
    return q.is_cpu and pool.is_cpu and pool.dtype in _KERNEL_DTYPES and q.dtype == pool.dtype


class PagedKernel:
    """The compiled paged_attention.c, called through ctypes."""

    def __init__(self, path: Path) -> None:
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, ctypes.c_float, i32, i32]
        lib, fn = load_kernel_function(path, "peftserve_paged_decode", argtypes)
        self._lib = lib  # keeps the library loaded as long as this object lives
        self._fn = fn

    def decode(
        self,
        q: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        block_table: torch.Tensor,
        positions: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """q (B, heads, 1, D) -> (B, heads, 1, D); pools must be contiguous."""
        batch, heads, _, dim = q.shape
        if not (k_pool.is_contiguous() and v_pool.is_contiguous()):
            raise ValueError("the paged kernel needs contiguous key and value pools")
        q = q.contiguous()
        table = block_table.to(torch.int32).contiguous()
        lengths = (positions.view(batch) + 1).to(torch.int32)
        out = torch.empty_like(q)
        rc = self._fn(
            q.data_ptr(),
            k_pool.data_ptr(),
            v_pool.data_ptr(),
            table.data_ptr(),
            lengths.data_ptr(),
            out.data_ptr(),
            batch,
            heads,
            k_pool.shape[2],
            dim,
            k_pool.shape[1],
            table.shape[1],
            scale,
            int(q.dtype == torch.bfloat16),
            torch.get_num_threads(),
        )
        if rc == 2:
            raise MemoryError("the paged attention kernel could not allocate its scratch memory")
        if rc != 0:
            raise ValueError(f"the paged attention kernel rejected its arguments (code {rc})")
        return out


_lock = threading.Lock()
_kernel: PagedKernel | None = None
_kernel_tried = False


def _native_kernel() -> PagedKernel | None:
    """The kernel, built and loaded on first use; None (with one warning) if it cannot be."""
    global _kernel, _kernel_tried
    if _kernel_tried:
        return _kernel
    with _lock:
        if not _kernel_tried:
            try:
                _kernel = PagedKernel(build_kernel(CFLAGS, _SOURCE))
            except KernelBuildError as e:
                log.warning("decode attention uses the slower torch path: %s", e)
            _kernel_tried = True
    return _kernel
