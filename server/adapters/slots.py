"""Device slots: every resident adapter's weights, organised per hook and site so layers find them by slot.

Slot indices run 0 .. num_slots - 1; slot -1 means "base model only". A slot holds one adapter
of any method. The method's `install` places its tensors through the setters here: low-rank
tables (one per linear or block site, every slot stacked, ranks padded to max_rank),
per-channel scale tables (every slot stacked), input rotation tables (rotation.py; one per site
and block size), and per-slot data (soft prompts, KV prefixes, a
block adapter's options). Everything lives on the base's device, in its dtype. `clear`
removes whatever was placed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from server.adapters import lowrank, lowrank_choice, pack
from server.adapters.common import AdapterWeights
from server.adapters.lowrank import LowRankTable
from server.adapters.method import Hook, Method, Site
from server.adapters.methods import method_of
from server.adapters.rotation import RotationTable
from server.base_model import ModelShape


class ScaleTable:
    """Per-slot vectors of one site; rows without an adapter here get `default` (ones for scales,
    zeros for biases, the base's weight for norms)."""

    def __init__(
        self, num_slots: int, default: torch.Tensor, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.default = default.to(dtype=dtype, device=device)  # (dim,)
        self.data = self.default.repeat(num_slots + 1, 1)  # last row: no adapter
        self.slots: set[int] = set()

    def set(self, slot: int, vector: torch.Tensor) -> None:
        self.data[slot] = vector
        self.slots.add(slot)

    def clear(self, slot: int) -> None:
        """No row reads `slot` any more; its old values stay until `wipe` (see LowRankTable.clear)."""
        self.slots.discard(slot)

    def wipe(self, slot: int) -> None:
        self.data[slot] = self.default

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """(N,) slot index with -1 mapped to num_slots -> (N, dim) scales."""
        return self.data.index_select(0, index)


@dataclass
class SlotTable:
    num_slots: int
    shape: ModelShape
    dtype: torch.dtype
    device: torch.device
    max_rank: int
    """Every low-rank table pads ranks to this (--max-lora-rank)."""
    lowrank_path: Literal["auto", "kernel", "torch"] = "auto"
    """On the CPU, per group size: the faster path as measured, the kernel, or torch (--lowrank-path)."""
    lowrank: dict[tuple[Hook, Site], LowRankTable] = field(default_factory=dict)
    scales: dict[tuple[Hook, Site], ScaleTable] = field(default_factory=dict)
    rotations: dict[tuple[Hook, Site], list[RotationTable]] = field(default_factory=dict)
    """Per site, one table per block size in use."""
    methods: list[Method | None] = field(init=False)
    data: list[dict[Hook, Any]] = field(init=False)
    """Per slot: what a hook needs beyond site tables (soft prompt, KV prefix, block options)."""
    _tables_of: list[list[LowRankTable | ScaleTable | RotationTable]] = field(init=False)
    _stale: list[list[LowRankTable | ScaleTable | RotationTable]] = field(init=False)
    """Per slot: tables holding a former occupant's values, until the next install wipes them."""
    _pending: list[pack.Copy] | None = field(init=False, default=None)
    layout_version: int = field(init=False, default=0)
    """Counts changes to which low-rank and scale tables exist and which low-rank tables add biases:
    what a captured decode graph (engine/graphs.py) bakes in. Writing weights into slots does not."""

    def __post_init__(self) -> None:
        self._big_group_rows: dict[tuple[int, int], int] = {}
        if self.lowrank_path != "torch":
            lowrank.prepare_for(self.dtype, self.device)  # compile at start-up, not on the first LoRA step
        if self.lowrank_path == "auto" and self.device.type == "cpu":
            # Measure (or read from the cache) now, so no step waits for it; bottlenecks are (hidden, hidden).
            h = self.shape.hidden_size
            dims = sorted({*self.shape.linear_dims().values(), (h, h)})
            found = lowrank_choice.calibrate([(self.dtype, *d) for d in dims])
            self._big_group_rows = {d: found[(self.dtype, *d)] for d in dims}
        pack.prepare_for(self.device)
        n = self.num_slots
        self.methods, self.data = [None] * n, [{} for _ in range(n)]
        self._tables_of = [[] for _ in range(n)]
        self._stale = [[] for _ in range(n)]

    def put(self, x: torch.Tensor) -> torch.Tensor:
        """`x` in the table's dtype and on its device (parsed adapters usually already are: no call)."""
        if x.dtype == self.dtype and x.device == self.device:
            return x
        return x.to(dtype=self.dtype, device=self.device)

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        """`x` copied into memory of the table's own, in its dtype and on its device.

        For slot data kept by reference: a parsed adapter may still view its file."""
        return x.to(dtype=self.dtype, device=self.device, copy=True, memory_format=torch.contiguous_format)

    def set_lowrank(
        self,
        slot: int,
        hook: Hook,
        site: Site,
        dims: tuple[int, int],
        a: torch.Tensor,
        b: torch.Tensor,
        a_bias: torch.Tensor | None = None,
        b_bias: torch.Tensor | None = None,
        *,
        b_scale: float = 1.0,
    ) -> None:
        """a (r, in), b (r, out) times b_scale and optional biases of `slot` at a (in, out) site."""
        table = self.lowrank.get((hook, site))
        if table is None:
            table = LowRankTable(self.num_slots, *dims, self.dtype, self.device, max_rank=self.max_rank)
            table.native = table.native and self.lowrank_path != "torch"
            if self.lowrank_path == "auto" and table.native:
                rows = self._big_group_rows.get(dims)
                if rows is None:  # a shape not measured at start-up
                    rows = lowrank_choice.big_group_rows((self.dtype, *dims))
                table.big_group_rows = rows
            self.lowrank[(hook, site)] = table
            self.layout_version += 1
        biased = table.has_bias
        copies = table.prepare(slot, a, b, a_bias, b_bias, b_scale=b_scale)
        if table.has_bias != biased:
            self.layout_version += 1
        if self._pending is None:
            pack.copy_all(copies)
        else:
            self._pending += copies
        self._tables_of[slot].append(table)

    def set_scale(
        self, slot: int, hook: Hook, site: Site, vector: torch.Tensor, default: torch.Tensor | None = None
    ) -> None:
        """`vector` (dim,) of `slot`; rows of other slots read `default` (ones when None)."""
        table = self.scales.get((hook, site))
        if table is None:
            default = torch.ones(vector.shape[0]) if default is None else default
            table = self.scales[(hook, site)] = ScaleTable(self.num_slots, default, self.dtype, self.device)
            self.layout_version += 1
        table.set(slot, self.put(vector))
        self._tables_of[slot].append(table)

    def set_rotation(self, slot: int, hook: Hook, site: Site, blocks: torch.Tensor) -> None:
        """blocks (k, b, b) of `slot` at a site: each block of the input times its R."""
        tables = self.rotations.setdefault((hook, site), [])
        count, block = blocks.shape[0], blocks.shape[1]
        table = next((t for t in tables if (t.count, t.block) == (count, block)), None)
        if table is None:
            table = RotationTable(self.num_slots, count, block, self.dtype, self.device)
            tables.append(table)
        table.set(slot, self.put(blocks))
        self._tables_of[slot].append(table)

    def set_data(self, slot: int, hook: Hook, value: Any) -> None:
        self.data[slot][hook] = value

    def slot_data(self, slot: int, hook: Hook) -> Any:
        """What `slot` placed for `hook` (None when nothing, or for slot -1)."""
        return None if slot < 0 else self.data[slot].get(hook)

    def gathers_rows(self, slot: int) -> bool:
        """Whether `slot`'s adapter acts through rows picked per slot at decode (rotations, block
        adapters, embedding or lm_head edits) rather than through per-site tables alone."""
        method = self.methods[slot]
        return (method is not None and Hook.INPUT_ROTATION in method.hooks) or any(
            self.slot_data(slot, hook) is not None
            for hook in (Hook.BLOCK_OUTPUT, Hook.EMBEDDING, Hook.LOGITS)
        )

    def install(self, slot: int, weights: AdapterWeights) -> None:
        """Place an adapter's weights into a free slot."""
        if self.methods[slot] is not None:
            raise RuntimeError(
                f"slot {slot} holds a {self.methods[slot].name} adapter; clear it before installing"
            )
        method = method_of(weights)
        self._pending = []  # the low-rank copies of the whole adapter, run in one call
        try:
            method.install(self, slot, weights)
            pack.copy_all(self._pending)
        finally:
            self._pending = None
        written = {id(table) for table in self._tables_of[slot]}
        for table in self._stale[slot]:
            if id(table) not in written:  # what the former occupant had where this one has nothing
                table.wipe(slot)
        self._stale[slot] = []
        self.methods[slot] = method

    def clear(self, slot: int) -> None:
        """Empty `slot` at once (no copy: its rows are wiped by the next install)."""
        for table in self._tables_of[slot]:
            table.clear(slot)
        self._stale[slot] += self._tables_of[slot]
        self._tables_of[slot] = []
        self.methods[slot] = None
        self.data[slot] = {}
