"""A static key/value cache: one row per running sequence, rows kept dense.

Running sequences always occupy rows ``0 .. n-1`` so a decode step attends over a plain
slice of the cache, never a gather. When a sequence leaves, the last row moves into its
place (a copy of that sequence's valid positions only).

The memory is allocated with torch.empty, so pages are only committed as they are written.
Attention reads positions a row has not written yet (masked, but 0 * NaN is still NaN), so
each row is zeroed block by block just before a step first reads that far.
"""

from __future__ import annotations

import torch

ZERO_BLOCK = 256


class KVCache:
    """Keys and values of every layer: (layers, 2, rows, kv_heads, max_len, head_dim)."""

    def __init__(
        self,
        num_layers: int,
        rows: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        # torch.empty leaves pages untouched, so memory grows with the tokens actually written.
        self.data = torch.empty(
            num_layers, 2, rows, num_kv_heads, max_len, head_dim, dtype=dtype, device=device
        )
        self.rows = rows
        self.max_len = max_len
        self._clean = [0] * rows  # positions [0, clean) of each row hold finite values

    def prepare(self, first_row: int, count: int, span: int) -> None:
        """Make positions [0, span) of rows first_row .. first_row + count - 1 safe to read."""
        for row in range(first_row, first_row + count):
            clean = self._clean[row]
            if clean < span:
                end = min(self.max_len, max(span, clean + ZERO_BLOCK))
                self.data[:, :, row, :, clean:end] = 0
                self._clean[row] = end

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer, each (rows, kv_heads, max_len, head_dim)."""
        return self.data[index, 0], self.data[index, 1]

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row `src` into row `dst`, in every layer."""
        self.data[:, :, dst, :, :length] = self.data[:, :, src, :, :length]
        self._clean[dst] = max(self._clean[dst], length)

    def write_prefix(self, row: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Place per-layer keys/values (layers, kv_heads, n, head_dim) at positions 0..n-1 of a row."""
        n = keys.shape[2]
        self.data[:, 0, row, :, :n] = keys
        self.data[:, 1, row, :, :n] = values
        self._clean[row] = max(self._clean[row], n)

    def bytes_per_token(self) -> int:
        layers, _, _, heads, _, dim = self.data.shape
        return 2 * layers * heads * dim * self.data.element_size()
