"""The paged key/value cache: fixed-size blocks in one pool per layer, sized from a memory budget.

A sequence holds a list of blocks (its block table); key t of it lives in block t // block_size
at offset t % block_size. Which blocks are free, shared or cached is bookkeeping in
server/engine/blocks.py; this module holds the tensors and decides how many blocks there are.

The pool is zeroed when it is made, so its memory is taken at start (on every device, the CPU
included) and every block always holds finite values. Block 0 is never given to a sequence:
padding tokens write into it and block tables are padded with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from server.base_model import ModelShape

log = logging.getLogger("peftserve.engine")

CPU_DEFAULT_BYTES = 4 * 1024**3
"""Default CPU budget (as vLLM's CPU backend), capped at half the available memory."""


def bytes_per_token(shape: ModelShape, dtype: torch.dtype) -> int:
    """Keys and values of one token in every layer."""
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * dtype.itemsize


def available_memory() -> int:
    """Bytes of RAM the system can give without swapping (MemAvailable)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable line")


@dataclass(frozen=True)
class Budget:
    """How much memory the cache takes, and where the figure came from (for the start-up log)."""

    bytes: int
    source: str


def choose_budget(
    device: torch.device,
    requested: int | None,
    gpu_memory_utilization: float,
    worst_case: int,
) -> Budget:
    """The cache's bytes: as requested, else a share of the device's memory, never above `worst_case`
    (every row of the batch at full length) unless requested."""
    if requested is not None:
        return Budget(requested, "--kv-cache-memory")
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        share = int(gpu_memory_utilization * total) - (total - free)
        source = f"--gpu-memory-utilization {gpu_memory_utilization:g} of {total / 1024**3:.1f} GiB"
    else:
        share = min(CPU_DEFAULT_BYTES, available_memory() // 2)
        source = "CPU default: 4 GiB, at most half the available memory"
    if share >= worst_case:
        return Budget(worst_case, "what --max-batch-size sequences of --max-model-len need")
    return Budget(max(share, 0), source)


class PagedKVCache:
    """Keys and values of every layer: (layers, 2, blocks, block_size, kv_heads, head_dim)."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_blocks < 2:
            raise ValueError(f"a KV cache needs at least 2 blocks (one is reserved); got {num_blocks}")
        self.data = torch.zeros(
            num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device
        )
        self.num_blocks = num_blocks
        self.block_size = block_size

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value pools of one layer, each (blocks, block_size, kv_heads, head_dim)."""
        return self.data[index, 0], self.data[index, 1]

    def write_prefix(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Place per-layer keys/values (layers, kv_heads, n, head_dim) at n flat cache slots (n,)."""
        layers, _, blocks, size, heads, dim = self.data.shape
        flat = self.data.view(layers, 2, blocks * size, heads, dim)
        flat[:, 0, slots] = keys.transpose(1, 2)  # (layers, n, kv_heads, head_dim)
        flat[:, 1, slots] = values.transpose(1, 2)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()
