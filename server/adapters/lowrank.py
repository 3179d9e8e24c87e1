"""Many different low-rank adapters inside one linear layer, one adapter per row.

LoRA and bottleneck adapters both reduce to, for every row n whose slot s is set:

    y[n] += b_s^T @ act(a_s @ x[n] + a_bias_s) + b_bias_s

with a_s of shape (r_s, in) and b_s of shape (r_s, out). A `LowRankTable` keeps every slot's
weights stacked and preallocated, ranks padded with zeros to --max-lora-rank (the layout of
vLLM's punica ops). `low_rank_apply` has two paths behind one interface:

- the torch path (SGMV semantics, in torch): rows sorted by slot are cut into equal segments,
  each segment gathers its slot's stacked A and B, and two batched matmuls apply any mix of
  adapters at once, no Python loop over adapters, no host sync. At decode a segment is one row
  (BGMV); at prefill, as long as a prompt, so weights are gathered per segment, not per token.
  It is the reference for every fast path and the path on every device but the CPU.
- on the CPU, the rows grouped by slot once per step (`RowGroups`) go to a native C kernel
  (lowrank_kernel.c) that reads each adapter's weights once per step; groups of at least the
  table's `big_group_rows` rows go to per-group torch matmuls instead. That threshold is not a
  constant: lowrank_choice.py measures both paths per layer shape on this CPU at start-up.
  `set_native(False)` switches the kernel off, so the CPU runs exactly the code a GPU runs.

`low_rank_apply_reference` is the plain per-row loop the tests hold both to.

`LowRankTable.set`/`clear` must not run while a call on the same table is in flight: the
kernel reads the table's pointers without a lock.
"""

from __future__ import annotations

import array
import ctypes
import functools
import hashlib
import logging
import mmap
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F

from server.adapters import pack

log = logging.getLogger(__name__)

Activation = Literal["relu", "gelu", "silu", "tanh"] | None

_ACT_CODES: dict[str | None, int] = {None: 0, "relu": 1, "gelu": 2, "silu": 3, "tanh": 4}
_KERNEL_DTYPES = {torch.float32: 0, torch.bfloat16: 1}

NEVER_BIG = 1 << 62
"""A `big_group_rows` no group reaches: every group goes to the native kernel."""


class LowRankError(ValueError):
    """A low-rank table or a call into it got tensors of the wrong shape, dtype or device."""


class KernelBuildError(RuntimeError):
    """The native kernel could not be compiled or loaded."""


# ---------------------------------------------------------------------------- row groups


@dataclass(frozen=True, eq=False)
class RowGroups:
    """A batch's rows grouped by adapter slot; built once per forward step, used by every site.

    Besides `order`, `starts` and `slots` it keeps what each call needs already split by
    group size (`split`, memoised per threshold): Python spans for the torch path and a packed
    int32 array for the kernel, so a call never reads tensor values.
    """

    order: torch.Tensor  # (M,) int32: rows with slot >= 0, sorted by slot (stable)
    starts: torch.Tensor  # (G+1,) int32: group g is order[starts[g]:starts[g+1]]
    slots: torch.Tensor  # (G,) int32: slot of each group, ascending
    num_rows: int  # N, the batch size the groups were built for
    max_slot: int  # largest slot used, -1 when no row has an adapter
    spans: tuple[tuple[int, int, int], ...]  # (slot, lo, hi) per group, lo/hi into order
    big_group_rows: int | None  # groups this big go to torch; None: each table's own threshold
    device: torch.device  # where the torch path's indices live
    slot_of: tuple[int, ...]  # (N,) the slot of every row, -1 for none
    _packed: torch.Tensor = field(repr=False)  # every group in the kernel's layout
    _splits: dict[int, tuple[tuple[tuple[int, int, int], ...], torch.Tensor | None]] = field(
        default_factory=dict, repr=False
    )
    _segments: dict[int, Segments] = field(default_factory=dict, repr=False)  # per max_rank

    @classmethod
    def build(
        cls,
        row_slots: torch.Tensor | list[int],
        big_group_rows: int | None = None,
        device: torch.device | str | None = None,
    ) -> RowGroups:
        """Group rows by slot; `row_slots` is (N,) int, -1 meaning no adapter, best on the host.

        `big_group_rows` fixes the kernel/torch threshold for every table (tests, benchmarks);
        unset, each table's measured `big_group_rows` decides. `device` is where the torch
        path's indices go (default: row_slots' device); they are built here on the host and
        copied there once, when first used.
        """
        if isinstance(row_slots, torch.Tensor):
            if row_slots.dim() != 1 or row_slots.is_floating_point() or row_slots.is_complex():
                raise LowRankError(
                    f"row_slots must be a 1-D integer tensor, got {tuple(row_slots.shape)} {row_slots.dtype}"
                )
            device = row_slots.device if device is None else device
            row_slots = row_slots.tolist()  # a host sync only when the caller left the slots on a device
        # Plain Python: for a decode batch this is several times faster than torch's sort.
        slot_of = row_slots
        order = sorted((n for n, s in enumerate(slot_of) if s >= 0), key=slot_of.__getitem__)
        spans, lo = [], 0
        while lo < len(order):
            slot, hi = slot_of[order[lo]], lo + 1
            while hi < len(order) and slot_of[order[hi]] == slot:
                hi += 1
            spans.append((slot, lo, hi))
            lo = hi
        packed = _pack_groups(order, spans)
        g = len(spans)
        return cls(
            order=packed[2 * g + 3 :],
            starts=packed[2 : g + 3],
            slots=packed[g + 3 : 2 * g + 3],
            num_rows=len(slot_of),
            max_slot=spans[-1][0] if spans else -1,
            spans=tuple(spans),
            big_group_rows=big_group_rows,
            device=torch.device("cpu" if device is None else device),
            slot_of=tuple(slot_of),
            _packed=packed,
        )

    def split(self, big_group_rows: int) -> tuple[tuple[tuple[int, int, int], ...], torch.Tensor | None]:
        """(spans of the groups for torch, the other groups packed for the kernel or None)."""
        cached = self._splits.get(big_group_rows)
        if cached is None:
            big = tuple(sp for sp in self.spans if sp[2] - sp[1] >= big_group_rows)
            small = [sp for sp in self.spans if sp[2] - sp[1] < big_group_rows]
            order = self.order.tolist() if big and small else None
            kernel = None if not small else self._packed if not big else _pack_groups(order, small)
            cached = self._splits[big_group_rows] = (big, kernel)
        return cached

    @property
    def big_spans(self) -> tuple[tuple[int, int, int], ...]:
        """The groups for the torch path under this batch's fixed threshold (NEVER_BIG if unset)."""
        return self.split(NEVER_BIG if self.big_group_rows is None else self.big_group_rows)[0]

    @property
    def kernel_groups(self) -> torch.Tensor | None:
        """The other groups packed for the kernel, None if none."""
        return self.split(NEVER_BIG if self.big_group_rows is None else self.big_group_rows)[1]

    @functools.cached_property
    def index(self) -> torch.Tensor:
        """(M,) `order` as int64 on the device, for the per-group torch path."""
        return self.order.to(self.device, torch.int64)

    def segments_host(self, max_rank: int) -> tuple[int, torch.Tensor]:
        """The gather path's layout for tables of this max rank: (segment length, its one host buffer).

        Each group's rows (sorted by slot) are cut into segments of L rows, the last one padded
        by repeating its first row. The length minimises what the path moves per step: L * (in +
        out) values per segment's rows plus max_rank * (in + out) weights gathered per segment,
        i.e. padded rows + max_rank * segments. At decode (a row or two per group) that is L = 1,
        BGMV; for a prefill, segments as long as the prompts. See `Segments` for the buffer.
        """
        sizes = [hi - lo for _, lo, hi in self.spans]
        candidates = [1 << k for k in range(max(sizes, default=1).bit_length() + 1)]

        def moved(length: int) -> int:
            count = sum(-(-n // length) for n in sizes)
            return count * length + max_rank * count

        length = min(candidates, key=moved)
        order = self.order.tolist()
        stack, rows, positions = [], [], []
        for slot, lo, hi in self.spans:
            for start in range(lo, hi, length):
                piece = order[start : min(start + length, hi)]
                positions.extend(range(len(rows), len(rows) + len(piece)))
                rows.extend(piece + piece[:1] * (length - len(piece)))
                stack.append(slot + 1)
        return length, torch.tensor([*stack, *rows, *positions, *order], dtype=torch.int64)

    def segments(self, max_rank: int) -> Segments:
        """`segments_host` on the device: copied on first use, unless `use_segments` gave it."""
        found = self._segments.get(max_rank)
        if found is None:
            length, host = self.segments_host(max_rank)
            buffer = host.to(self.device, non_blocking=True) if self.device.type != "cpu" else host
            found = self._segments[max_rank] = Segments.of(length, buffer, len(self.order))
        return found

    def use_segments(self, max_rank: int, length: int, buffer: torch.Tensor) -> None:
        """Take `segments(max_rank)` from the caller's one copy of every index a step needs (BatchContext)."""
        self._segments[max_rank] = Segments.of(length, buffer, len(self.order))


class Segments(NamedTuple):
    """Rows with an adapter as S segments of `length` rows of one slot each: the gather path's input.

    One int64 buffer on the device holds, in turn, the four index tensors below."""

    length: int
    stack_index: torch.Tensor  # (S,) each segment's index into the stacked tables: slot + 1
    rows: torch.Tensor  # (S * length,) the row of x each position reads (padding repeats a row)
    positions: torch.Tensor  # (M,) where each row with an adapter sits among the S * length positions
    targets: torch.Tensor  # (M,) that row: `order`

    @classmethod
    def of(cls, length: int, buffer: torch.Tensor, rows_with_adapter: int) -> Segments:
        m = rows_with_adapter
        count = (buffer.shape[0] - 2 * m) // (length + 1)
        stack, rows, positions, targets = buffer.split([count, count * length, m, m])
        return cls(length, stack, rows, positions, targets)


def _pack_groups(order: list[int], spans: list[tuple[int, int, int]]) -> torch.Tensor:
    """The kernel's int32 layout of these groups: G, M, starts (G+1), slots (G), order (M)."""
    starts, rows = [0], []
    for _, lo, hi in spans:
        starts.append(starts[-1] + hi - lo)
        rows.extend(order[lo:hi])
    packed = array.array("i", [len(spans), len(rows), *starts, *(s for s, _, _ in spans), *rows])
    return torch.frombuffer(packed, dtype=torch.int32)


# ---------------------------------------------------------------------------- the table


class LowRankWeights(NamedTuple):
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (r, out), scaling folded in
    a_bias: torch.Tensor | None  # (r,)
    b_bias: torch.Tensor | None  # (out,)


def stacked_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros of `shape`; on the CPU in anonymous memory, so pages no slot ever writes cost nothing."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = max(1, dtype.itemsize * int(torch.Size(shape).numel()))
    buffer = mmap.mmap(-1, nbytes)  # zero-filled, committed page by page on first write
    return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).view(shape)


class LowRankTable:
    """The adapters of one site (e.g. layer 3 q_proj), one per slot, stacked and preallocated.

    Layout (index 0 is all zeros and stands for "no adapter", slot s lives at s + 1):
    a (slots + 1, max_rank, in), b (slots + 1, max_rank, out) (B transposed, scaling folded
    in), a_bias (slots + 1, max_rank), b_bias (slots + 1, out). A slot of rank r fills rows
    :r; rows r: stay zero, so padded ranks add nothing. The kernel's per-slot pointers point
    into these stacks.
    """

    def __init__(
        self,
        num_slots: int,
        in_features: int,
        out_features: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        *,
        max_rank: int,
    ) -> None:
        if min(num_slots, in_features, out_features, max_rank) < 1:
            raise LowRankError(
                f"num_slots, in_features, out_features and max_rank must be >= 1, "
                f"got {num_slots}, {in_features}, {out_features}, {max_rank}"
            )
        self.num_slots = num_slots
        self.in_features = in_features
        self.out_features = out_features
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = torch.device(device)
        stacks = num_slots + 1
        self.a = stacked_zeros((stacks, max_rank, in_features), dtype, self.device)
        self.b = stacked_zeros((stacks, max_rank, out_features), dtype, self.device)
        self.a_bias = stacked_zeros((stacks, max_rank), dtype, self.device)
        self.b_bias = stacked_zeros((stacks, out_features), dtype, self.device)
        self._ranks = [0] * num_slots
        self._written = [0] * num_slots  # rows of a slot that may hold old values (zeroed on reuse)
        self._biased: list[tuple[bool, bool]] = [(False, False)] * num_slots
        self.has_bias = False  # whether any slot has a bias: the torch path then adds them
        # The kernel's view of the table (lowrank_kernel.c): in, out, dtype code, slots, then
        # per slot the data pointers of a, b, a_bias, b_bias (0 = absent), then the ranks.
        self._meta = torch.zeros(4 + 5 * num_slots, dtype=torch.int64)
        self._meta[:4] = torch.tensor([in_features, out_features, _KERNEL_DTYPES.get(dtype, -1), num_slots])
        # Plain machine words over the same memory: set/clear write them without torch's
        # per-element indexing, which would cost more than the rest of an install.
        self._words = (ctypes.c_int64 * self._meta.numel()).from_address(self._meta.data_ptr())
        self.native = dtype in _KERNEL_DTYPES and self.device.type == "cpu"
        """Whether calls may use the native kernel (False: the torch gather path, as on a GPU)."""
        self.big_group_rows = NEVER_BIG
        """Groups of at least this many rows take torch matmuls, the rest the kernel (lowrank_choice.py)."""

    def set(
        self,
        slot: int,
        a: torch.Tensor,
        b: torch.Tensor,
        a_bias: torch.Tensor | None = None,
        b_bias: torch.Tensor | None = None,
        *,
        b_scale: float = 1.0,
    ) -> None:
        """Copy an adapter into `slot`: a (r, in), b (r, out) times b_scale, a_bias (r,), b_bias (out,)."""
        pack.copy_all(self.prepare(slot, a, b, a_bias, b_bias, b_scale=b_scale))

    def prepare(
        self,
        slot: int,
        a: torch.Tensor,
        b: torch.Tensor,
        a_bias: torch.Tensor | None = None,
        b_bias: torch.Tensor | None = None,
        *,
        b_scale: float = 1.0,
    ) -> list[pack.Copy]:
        """Check an adapter for `slot` and take its rows; the copies that fill them (`set` runs them).

        Sources may be in any float dtype, on any device, with any strides (b a transposed view
        of the file): the copies convert and move them, b scaled in float32 and rounded once.
        """
        self._check_slot(slot)
        if a.dim() != 2 or a.shape[1] != self.in_features or a.shape[0] < 1:
            raise LowRankError(f"a must be (rank, {self.in_features}), got {tuple(a.shape)}")
        rank = a.shape[0]
        if rank > self.max_rank:
            raise LowRankError(f"rank {rank} is above the table's max_rank {self.max_rank} (--max-lora-rank)")
        if tuple(b.shape) != (rank, self.out_features):
            raise LowRankError(
                f"b must be (rank={rank}, {self.out_features}) (transposed from nn.Linear), "
                f"got {tuple(b.shape)}"
            )
        if a_bias is not None and tuple(a_bias.shape) != (rank,):
            raise LowRankError(f"a_bias must be ({rank},), got {tuple(a_bias.shape)}")
        if b_bias is not None and tuple(b_bias.shape) != (self.out_features,):
            raise LowRankError(f"b_bias must be ({self.out_features},), got {tuple(b_bias.shape)}")
        for name, t in (("a", a), ("b", b), ("a_bias", a_bias), ("b_bias", b_bias)):
            if t is not None and not t.is_floating_point():
                raise LowRankError(f"{name} is {t.dtype}; adapter weights are float tensors")
        i, stale = slot + 1, self._written[slot]
        if stale > rank:  # set twice without a clear: the larger adapter's rows must become padding
            self.a[i, rank:stale].zero_()
            self.b[i, rank:stale].zero_()
        if any(self._biased[slot]) or a_bias is not None or b_bias is not None:
            self.a_bias[i].zero_()
            self.b_bias[i].zero_()
        copies = [pack.Copy(a, self.a, i), pack.Copy(b, self.b, i, b_scale)]
        if a_bias is not None:
            copies.append(pack.Copy(a_bias, self.a_bias, i))
        if b_bias is not None:
            copies.append(pack.Copy(b_bias, self.b_bias, i))
        self._ranks[slot], self._written[slot] = rank, max(rank, stale)
        self._biased[slot] = (a_bias is not None, b_bias is not None)
        self.has_bias = self.has_bias or a_bias is not None or b_bias is not None
        # Pointers to slot i's rows by arithmetic: a view per stack would cost more than the copy.
        for k, (stack, present) in enumerate(
            (
                (self.a, True),
                (self.b, True),
                (self.a_bias, a_bias is not None),
                (self.b_bias, b_bias is not None),
            )
        ):
            row = stack.data_ptr() + i * stack.stride(0) * stack.element_size()
            self._words[4 + k * self.num_slots + slot] = row if present else 0
        self._words[4 + 4 * self.num_slots + slot] = rank
        return copies

    def clear(self, slot: int) -> None:
        """Empty `slot`: its rows then get no adapter, on every path.

        The rows keep their values until the slot's next occupant: no path reads the rows of a
        slot no row uses, `prepare` zeroes what the next adapter leaves over, and `wipe` zeroes
        them where the next occupant does not use this site. So an eviction costs no copy.
        """
        self._check_slot(slot)
        self._ranks[slot] = 0
        for k in range(5):  # the four pointers, then the rank
            self._words[4 + k * self.num_slots + slot] = 0

    def wipe(self, slot: int) -> None:
        """Zero an empty slot's old rows: the gather path reads every row of a slot in use."""
        i, written = slot + 1, self._written[slot]
        self.a[i, :written].zero_()
        self.b[i, :written].zero_()
        if any(self._biased[slot]):
            self.a_bias[i].zero_()
            self.b_bias[i].zero_()
        self._written[slot], self._biased[slot] = 0, (False, False)

    def get(self, slot: int) -> LowRankWeights | None:
        """Views of `slot`'s weights in the stacks, None when empty."""
        self._check_slot(slot)
        rank = self._ranks[slot]
        if rank == 0:
            return None
        i, (has_a_bias, has_b_bias) = slot + 1, self._biased[slot]
        return LowRankWeights(
            self.a[i, :rank],
            self.b[i, :rank],
            self.a_bias[i, :rank] if has_a_bias else None,
            self.b_bias[i] if has_b_bias else None,
        )

    def rank(self, slot: int) -> int:
        self._check_slot(slot)
        return self._ranks[slot]

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise LowRankError(f"slot {slot} is outside this table's 0..{self.num_slots - 1}")


# ---------------------------------------------------------------------------- applying


_native_enabled = True


def set_native(enabled: bool) -> None:
    """Switch the CPU's native kernel on or off; off, every device runs the torch gather path."""
    global _native_enabled
    _native_enabled = enabled


def low_rank_apply(
    x: torch.Tensor,
    y: torch.Tensor,
    table: LowRankTable,
    groups: RowGroups,
    act: Activation = None,
    use_native: bool = True,
) -> None:
    """y[n] += b_s^T act(a_s x[n] + a_bias_s) + b_bias_s for every row n with a slot, in place.

    x: (N, in), y: (N, out), both of the table's dtype; `x is y` is allowed. `use_native=False`
    runs the torch gather path (for tests and comparisons).
    """
    _check_call(x, y, table, groups, act)
    if not groups.spans:
        return
    kernel = _native_for(x, y, table) if use_native and _native_enabled else None
    if kernel is None:
        gather_apply(x, y, table, groups.segments(table.max_rank), act)
        return
    fixed = groups.big_group_rows
    big, small = groups.split(table.big_group_rows if fixed is None else fixed)
    # Big and small groups own disjoint rows, so their order does not matter, even in place.
    if big:
        torch_groups(x, y, table, groups, big, act)
    if small is not None:
        kernel.apply(x, y, table, small, act)


GATHER_CHUNK_BYTES = 64 * 1024 * 1024
"""Rows are gathered in chunks whose gathered weights stay under this many bytes."""


def gather_apply(
    x: torch.Tensor, y: torch.Tensor, table: LowRankTable, seg: Segments, act: Activation = None
) -> None:
    """The torch path: each segment of rows gathers its slot's stacked weights, two bmm, no loop
    over adapters (SGMV semantics over padded segments; BGMV when segments are one row long).

    The matmuls run in the table's dtype, so the rank-r intermediate is rounded to that dtype
    between them, as PEFT's own layers do. Rows without an adapter are not touched (+ exactly 0).
    Every x row is read before any y row is written, so `x is y` is fine.
    """
    count, length, in_f, out_f = seg.stack_index.shape[0], seg.length, table.in_features, table.out_features
    size = table.a.element_size()
    per_segment = (table.max_rank + length) * (in_f + out_f) * size
    chunk = max(1, GATHER_CHUNK_BYTES // per_segment)
    deltas = x.new_empty(count * length, out_f)  # (S * L, out)
    for lo in range(0, count, chunk):  # a fixed bound on memory, not a loop over adapters
        idx = seg.stack_index[lo : lo + chunk]  # (s,)
        rows = seg.rows[lo * length : (lo + chunk) * length]  # (s * L,)
        xs = x.index_select(0, rows).view(-1, length, in_f)  # (s, L, in)
        h = torch.bmm(xs, table.a.index_select(0, idx).transpose(1, 2))  # (s, L, r_max)
        if table.has_bias:
            h = h + table.a_bias.index_select(0, idx).unsqueeze(1)
        h = _act_torch(h, act)
        d = torch.bmm(h, table.b.index_select(0, idx))  # (s, L, out)
        if table.has_bias:
            d = d + table.b_bias.index_select(0, idx).unsqueeze(1)
        deltas[lo * length : (lo + chunk) * length] = d.view(-1, out_f)
    y.index_add_(0, seg.targets, deltas.index_select(0, seg.positions))


def low_rank_apply_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    table: LowRankTable,
    row_slots: torch.Tensor,
    act: Activation = None,
) -> None:
    """The same as `low_rank_apply`, one row at a time in float32, for tests."""
    x32 = x.to(torch.float32, copy=True)  # x may be y
    for n, slot in enumerate(row_slots.tolist()):
        w = table.get(slot) if slot >= 0 else None
        if w is None:
            continue
        h = w.a.float() @ x32[n]  # (r,)
        if w.a_bias is not None:
            h = h + w.a_bias.float()
        d = w.b.float().t() @ _act_torch(h, act)  # (out,)
        if w.b_bias is not None:
            d = d + w.b_bias.float()
        y[n] = (y[n].float() + d).to(y.dtype)


def _check_call(
    x: torch.Tensor, y: torch.Tensor, table: LowRankTable, groups: RowGroups, act: Activation
) -> None:
    # Called for every site of every step: plain comparisons only, no tensor ops.
    n = groups.num_rows
    if x.shape != (n, table.in_features) or y.shape != (n, table.out_features):
        raise LowRankError(
            f"x must be ({n}, {table.in_features}) and y ({n}, {table.out_features}), "
            f"got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.dtype != table.dtype or y.dtype != table.dtype:
        raise LowRankError(f"x and y must be {table.dtype} like the table, got {x.dtype} and {y.dtype}")
    if groups.max_slot >= table.num_slots:
        raise LowRankError(f"row slot {groups.max_slot} is outside the table's {table.num_slots} slots")
    if act not in _ACT_CODES:
        raise LowRankError(f"act must be one of {sorted(k for k in _ACT_CODES if k)} or None, got {act!r}")


def _act_torch(h: torch.Tensor, act: Activation) -> torch.Tensor:
    if act == "relu":
        return F.relu(h)
    if act == "gelu":
        return F.gelu(h)
    if act == "silu":
        return F.silu(h)
    if act == "tanh":
        return torch.tanh(h)
    return h


def torch_groups(
    x: torch.Tensor,
    y: torch.Tensor,
    table: LowRankTable,
    groups: RowGroups,
    spans: tuple[tuple[int, int, int], ...],
    act: Activation,
) -> None:
    """One gather, two matmuls and one scatter-add per group.

    The matmuls run in the table's dtype, accumulating in float32 inside, so the rank-r
    intermediate is rounded to that dtype between them, as PEFT's own layers do.
    """
    for slot, lo, hi in spans:
        w = table.get(slot)
        if w is None:
            continue
        idx = groups.index[lo:hi]  # (m,)
        xg = x.index_select(0, idx)  # (m, in)
        h = xg @ w.a.t() if w.a_bias is None else torch.addmm(w.a_bias, xg, w.a.t())  # (m, r)
        h = _act_torch(h, act)
        d = h @ w.b if w.b_bias is None else torch.addmm(w.b_bias, h, w.b)  # (m, out)
        y.index_add_(0, idx, d)


# ---------------------------------------------------------------------------- native kernel

_SOURCE = Path(__file__).with_name("lowrank_kernel.c")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")


def load_kernel_function(path: Path, symbol: str, argtypes: list) -> tuple[ctypes.CDLL, Any]:
    """The library at `path` and its C function `symbol`, typed, returning an int status.

    Keep the library referenced as long as the function is called.
    """
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise KernelBuildError(f"cannot load {path}: {e}") from e
    fn = getattr(lib, symbol)
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return lib, fn


class NativeKernel:
    """The compiled lowrank_kernel.c, called through ctypes."""

    def __init__(self, path: Path) -> None:
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib, fn = load_kernel_function(path, "peftserve_lowrank_apply", [p, p, p, i64, p, i64, i32, i32])
        self.path = path
        self._lib = lib  # keeps the library loaded as long as this object lives
        self._fn = fn

    def apply(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        table: LowRankTable,
        packed_groups: torch.Tensor,
        act: Activation,
    ) -> None:
        """Run the kernel over packed groups (RowGroups.kernel_groups); x, y already checked."""
        if x.stride(1) != 1:
            x = x.contiguous()
        if y.stride(1) != 1:
            raise LowRankError("y's last dimension must be contiguous (stride 1) to be updated in place")
        rc = self._fn(
            table._meta.data_ptr(),
            packed_groups.data_ptr(),
            x.data_ptr(),
            x.stride(0),
            y.data_ptr(),
            y.stride(0),
            _ACT_CODES[act],
            torch.get_num_threads(),
        )
        if rc == 2:
            raise MemoryError("the low-rank kernel could not allocate its scratch memory")
        if rc != 0:
            raise LowRankError(f"the low-rank kernel rejected its arguments (code {rc})")


def cache_dir() -> Path:
    """Where compiled kernels live: $PEFTSERVE_CACHE/kernels, by default ~/.cache/peftserve/kernels."""
    root = os.environ.get("PEFTSERVE_CACHE") or Path.home() / ".cache" / "peftserve"
    return Path(root) / "kernels"


def _machine_id() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    lines = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    lines.append(line.strip())
                if len(lines) >= 2:
                    break
    except OSError:
        pass
    return "\n".join([platform.machine(), *lines])


def build_kernel(flags: tuple[str, ...] = CFLAGS, source_file: Path = _SOURCE) -> Path:
    """Compile a C source (lowrank_kernel.c unless told) once per source, flags and machine; the .so path."""
    source = source_file.read_bytes()
    key = hashlib.sha256(source + "\0".join(flags).encode() + _machine_id().encode()).hexdigest()[:16]
    target = cache_dir() / key / f"{source_file.stem}.so"
    if target.exists():
        return target
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise KernelBuildError("no C compiler found (install gcc, or set CC)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # A unique temporary name and an atomic rename let concurrent processes build side by side.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    except OSError as e:
        raise KernelBuildError(
            f"cannot write to {target.parent} ({e}): set PEFTSERVE_CACHE to a writable folder"
        ) from e
    os.close(fd)
    cmd = [cc, *flags, "-o", tmp, str(source_file), "-lm"]
    log.info("compiling %s for this CPU: %s", source_file.name, " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise KernelBuildError(f"{' '.join(cmd)} failed:\n{proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    except OSError as e:
        raise KernelBuildError(f"{' '.join(cmd)} could not run: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


_lock = threading.Lock()
_kernel: NativeKernel | None = None
_kernel_tried = False
_warned: set[str] = set()


def native_kernel() -> NativeKernel | None:
    """The native kernel, built (once per machine) and loaded on first call; None (with one warning)
    if it can't be. The server calls it at start-up (`prepare_for`), so no step waits for a compiler."""
    global _kernel, _kernel_tried
    if _kernel_tried:
        return _kernel
    with _lock:
        if not _kernel_tried:
            started = time.perf_counter()
            try:
                _kernel = NativeKernel(build_kernel())
                log.info("low-rank kernel ready in %.2f s: %s", time.perf_counter() - started, _kernel.path)
            except KernelBuildError as e:
                _warn_once("build", f"low-rank adapters use the slower torch path: {e}")
            _kernel_tried = True
    return _kernel


def kernel_takes(dtype: torch.dtype) -> bool:
    """Whether the native kernel has a path for tables of this dtype."""
    return dtype in _KERNEL_DTYPES


def prepare_for(dtype: torch.dtype, device: torch.device) -> None:
    """Build and load the native kernel now if tables of this dtype and device will use it."""
    if dtype in _KERNEL_DTYPES and device.type == "cpu":
        native_kernel()


def _native_for(x: torch.Tensor, y: torch.Tensor, table: LowRankTable) -> NativeKernel | None:
    if table.native and x.is_cpu and y.is_cpu:
        return _kernel if _kernel_tried else native_kernel()
    if not (x.is_cpu and y.is_cpu and table.device.type == "cpu"):
        _warn_once("device", f"low-rank adapters on {x.device} use the torch path (the kernel is CPU only)")
    elif table.dtype not in _KERNEL_DTYPES:
        _warn_once("dtype", f"low-rank adapters in {table.dtype} use the torch path (the kernel: f32, bf16)")
    return None  # or switched off for this table (--lowrank-path torch): as asked, no warning


def _warn_once(reason: str, message: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning(message)
