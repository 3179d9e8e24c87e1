"""Device slots: every resident adapter's weights, organised per site so layers find them by slot.

Slot indices run 0 .. num_slots - 1; slot -1 means "base model only". A slot holds one adapter
of any kind; installing scatters its tensors into per-site tables (one low-rank table per
linear layer for LoRA, one per block for bottleneck adapters, scale tables for IA3 and DoRA)
and clearing removes them again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.adapters import lowrank
from server.adapters.bottleneck import BottleneckWeights
from server.adapters.common import AdapterWeights
from server.adapters.ia3 import IA3Weights
from server.adapters.lora import LoraWeights
from server.adapters.lowrank import LowRankTable
from server.adapters.prefix import PrefixWeights
from server.adapters.prompt import PromptWeights
from server.base_model import ModelShape

Site = tuple[int, str]


class ScaleTable:
    """Per-slot scale vectors of one site; rows without an adapter here get ones."""

    def __init__(self, num_slots: int, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.data = torch.ones(num_slots + 1, dim, dtype=dtype, device=device)  # last row: no adapter
        self.slots: set[int] = set()

    def set(self, slot: int, vector: torch.Tensor) -> None:
        self.data[slot] = vector
        self.slots.add(slot)

    def clear(self, slot: int) -> None:
        self.data[slot] = 1
        self.slots.discard(slot)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """(N,) slot index with -1 mapped to num_slots -> (N, dim) scales."""
        return self.data.index_select(0, index)


@dataclass
class SlotTable:
    num_slots: int
    shape: ModelShape
    dtype: torch.dtype
    device: torch.device
    kinds: list[str | None] = field(init=False)
    lora: dict[Site, LowRankTable] = field(default_factory=dict)
    dora: dict[Site, ScaleTable] = field(default_factory=dict)
    ia3_in: dict[Site, ScaleTable] = field(default_factory=dict)
    ia3_out: dict[Site, ScaleTable] = field(default_factory=dict)
    bottleneck: dict[Site, LowRankTable] = field(default_factory=dict)
    activation: list[str | None] = field(init=False)
    reads_residual: list[bool] = field(init=False)
    prompts: list[torch.Tensor | None] = field(init=False)
    prefixes: list[tuple[torch.Tensor, torch.Tensor] | None] = field(init=False)
    _tables_of: list[list[LowRankTable | ScaleTable]] = field(init=False)

    def __post_init__(self) -> None:
        lowrank.prepare_for(self.dtype, self.device)  # compile at start-up, not on the first LoRA step
        n = self.num_slots
        self.kinds, self.activation, self.reads_residual = [None] * n, [None] * n, [False] * n
        self.prompts, self.prefixes = [None] * n, [None] * n
        self._tables_of = [[] for _ in range(n)]

    def _lowrank(self, tables: dict[Site, LowRankTable], site: Site, dims: tuple[int, int]) -> LowRankTable:
        if site not in tables:
            tables[site] = LowRankTable(self.num_slots, dims[0], dims[1], self.dtype, self.device)
        return tables[site]

    def _scale(self, tables: dict[Site, ScaleTable], site: Site, dim: int) -> ScaleTable:
        if site not in tables:
            tables[site] = ScaleTable(self.num_slots, dim, self.dtype, self.device)
        return tables[site]

    def _put(self, x: torch.Tensor) -> torch.Tensor:
        # Parsed adapters already are in the table's dtype (on the CPU): no call into torch then.
        if x.dtype == self.dtype and x.device == self.device:
            return x
        return x.to(dtype=self.dtype, device=self.device)

    def install(self, slot: int, weights: AdapterWeights) -> None:
        """Place an adapter's weights into a free slot."""
        if self.kinds[slot] is not None:
            raise RuntimeError(f"slot {slot} holds a {self.kinds[slot]} adapter; clear it before installing")
        dims = self.shape.linear_dims()
        touched = self._tables_of[slot]
        if isinstance(weights, LoraWeights):
            for site, w in weights.sites.items():
                table = self._lowrank(self.lora, site, dims[site[1]])
                table.set(slot, self._put(w.a), self._put(w.b))
                touched.append(table)
                if w.dora_scale is not None:
                    scale = self._scale(self.dora, site, dims[site[1]][1])
                    scale.set(slot, self._put(w.dora_scale))
                    touched.append(scale)
        elif isinstance(weights, IA3Weights):
            for site, w in weights.sites.items():
                tables, dim = (
                    (self.ia3_in, dims[site[1]][0]) if w.on_input else (self.ia3_out, dims[site[1]][1])
                )
                scale = self._scale(tables, site, dim)
                scale.set(slot, self._put(w.scale))
                touched.append(scale)
        elif isinstance(weights, BottleneckWeights):
            hidden = self.shape.hidden_size
            for site, w in weights.sites.items():
                table = self._lowrank(self.bottleneck, site, (hidden, hidden))
                table.set(slot, *(self._put(t) for t in (w.down, w.up, w.down_bias, w.up_bias)))
                touched.append(table)
            self.activation[slot], self.reads_residual[slot] = weights.activation, weights.reads_residual
        elif isinstance(weights, PromptWeights):
            self.prompts[slot] = self._put(weights.embeddings)
        elif isinstance(weights, PrefixWeights):
            self.prefixes[slot] = (self._put(weights.keys), self._put(weights.values))
        else:
            raise TypeError(f"no slot layout for {type(weights).__name__}")
        self.kinds[slot] = weights.kind

    def clear(self, slot: int) -> None:
        for table in self._tables_of[slot]:
            table.clear(slot)
        self._tables_of[slot] = []
        self.kinds[slot] = self.activation[slot] = self.prompts[slot] = self.prefixes[slot] = None
        self.reads_residual[slot] = False
