"""Many block-diagonal input rotations inside one linear layer, one adapter per row (OFT's served form).

For every row n whose slot s has a rotation at this site:

    x[n] = concat_i(x[n, block i] @ R_s,i)      R_s,i (b, b), i over the in / b blocks

A `RotationTable` keeps one site's rotations for every slot, stacked (slots, k, b, b), for one
block size b (a site gets a table per block size in use). `rotate_rows` applies any mix of
slots at once: rows of a slot with at least GROUP_ROWS rows in the batch share one batched
matmul over their slot's blocks; the other rows each gather their slot's blocks and go
through one batched matmul together. Rows of slots without a rotation here are left as they
are (the identity), and `x` itself is never written: the same input feeds q, k and v.
`rotate_rows_reference` is the per-row loop the tests hold it to.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from server.adapters.lowrank import stacked_zeros

GROUP_ROWS = 4
"""A slot with at least this many rows in a step reads its blocks once for all of them."""
GATHER_CHUNK_BYTES = 64 * 1024 * 1024
"""Rows that gather their blocks do so in chunks whose gathered blocks stay under this."""


class RotationTable:
    """One site's rotations of block size b, every slot stacked; only installed slots are ever read."""

    def __init__(
        self, num_slots: int, count: int, block: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.count, self.block = count, block
        # Pages of slots never installed cost nothing (anonymous zero memory on the CPU).
        self.data = stacked_zeros((num_slots, count, block, block), dtype, device)
        self.slots: set[int] = set()

    def set(self, slot: int, blocks: torch.Tensor) -> None:
        if tuple(blocks.shape) != (self.count, self.block, self.block):
            raise ValueError(
                f"rotation blocks must be ({self.count}, {self.block}, {self.block}), "
                f"got {tuple(blocks.shape)}"
            )
        self.data[slot].copy_(blocks)
        self.slots.add(slot)

    def clear(self, slot: int) -> None:
        self.slots.discard(slot)

    def wipe(self, slot: int) -> None:
        """Nothing to zero: rows read only the rotations of installed slots."""


@dataclass(frozen=True, eq=False)
class RotationRows:
    """Which rows of a step use which slot's rotation of one table; built once per step and slot set."""

    groups: tuple[tuple[int, torch.Tensor], ...]  # (slot, (m,) int64 rows) of slots with many rows
    rows: torch.Tensor | None  # (M,) int64 rows that gather their blocks, None if none
    slots: torch.Tensor | None  # (M,) int64 slot of each of them

    @classmethod
    def build(cls, slot_of: list[int], members: set[int], device: torch.device) -> RotationRows:
        by_slot: dict[int, list[int]] = {}
        for n, s in enumerate(slot_of):
            if s in members:
                by_slot.setdefault(s, []).append(n)
        groups, rows, slots = [], [], []
        for s, ns in sorted(by_slot.items()):
            if len(ns) >= GROUP_ROWS:
                groups.append((s, torch.tensor(ns, dtype=torch.int64).to(device)))
            else:
                rows += ns
                slots += [s] * len(ns)
        as_index = functools.partial(torch.tensor, dtype=torch.int64)
        return cls(
            tuple(groups),
            as_index(rows).to(device) if rows else None,
            as_index(slots).to(device) if slots else None,
        )


def rotate_rows(x: torch.Tensor, table: RotationTable, rows: RotationRows) -> torch.Tensor:
    """(N, in) -> (N, in): the rows of `rows` rotated by their slot's blocks, the others as they are."""
    k, b = table.count, table.block
    out = x.clone()
    for slot, idx in rows.groups:
        xs = x.index_select(0, idx).view(-1, k, b).transpose(0, 1)  # (k, m, b)
        out.index_copy_(0, idx, torch.bmm(xs, table.data[slot]).transpose(0, 1).reshape(-1, k * b))
    if rows.rows is not None:
        chunk = max(1, GATHER_CHUNK_BYTES // (k * b * b * table.data.element_size()))
        for lo in range(0, rows.rows.shape[0], chunk):
            idx, slots = rows.rows[lo : lo + chunk], rows.slots[lo : lo + chunk]
            xs = x.index_select(0, idx).view(-1, k, 1, b)  # (m, k, 1, b)
            rotated = torch.matmul(xs, table.data.index_select(0, slots))  # (m, k, 1, b)
            out.index_copy_(0, idx, rotated.view(-1, k * b))
    return out


def rotate_rows_reference(x: torch.Tensor, table: RotationTable, slot_of: list[int]) -> torch.Tensor:
    """`rotate_rows`, one row at a time in float32, for tests."""
    out = x.clone()
    for n, s in enumerate(slot_of):
        if s not in table.slots:
            continue
        blocks = x[n].float().view(table.count, 1, table.block)  # (k, 1, b)
        out[n] = (blocks @ table.data[s].float()).reshape(-1).to(x.dtype)
    return out
