"""The per-step batch context: which adapter slot each token uses, passed into every layer.

Built once per forward pass from the slot table and the (N,) slot of every token (-1 = base
model only). Everything that depends only on those slots (groups of rows per slot, gather
indices) is computed here once and shared by all layers. It applies the slot table's hooks
(method.Hook) and never asks which method put a tensor there.
"""

from __future__ import annotations

import torch
from torch import nn

from server.adapters.lowrank import RowGroups, low_rank_apply
from server.adapters.method import Hook
from server.adapters.slots import ScaleTable, SlotTable


class BatchContext:
    """Routes every linear layer and block output of one forward pass through the adapters in use."""

    def __init__(
        self, slots: SlotTable | None = None, token_slots: torch.Tensor | list[int] | None = None
    ) -> None:
        """token_slots: (N,) slot of every token, -1 for none, on the host (a list or a CPU tensor).

        Everything per step is built here on the host and copied to the slots' device once.
        """
        self.slots = slots
        slot_of = token_slots.tolist() if isinstance(token_slots, torch.Tensor) else list(token_slots or [])
        used = set(slot_of) - {-1}
        self.active = bool(used)
        if not self.active:
            return
        self.used = used
        device = slots.device
        delta = {s for s in used if Hook.LINEAR_DELTA in slots.methods[s].hooks}
        self.delta_groups = self._groups(slot_of, delta, device)
        block = {s: slots.slot_data(s, Hook.BLOCK_OUTPUT) for s in used}
        block = {s: options for s, options in block.items() if options is not None}
        self.block_groups = {
            act: self._groups(slot_of, {s for s, (a, _) in block.items() if a == act}, device)
            for act in {a for a, _ in block.values()}
        }
        readers = {s for s, (_, reads_residual) in block.items() if reads_residual}
        # Every per-row index of this step, built on the host and copied in one transfer: the
        # scale tables' (slot, or the table's last row of ones for the base model), each group
        # set's stacked-table index, and which rows' bottleneck reads the residual.
        groups = [g for g in (self.delta_groups, *self.block_groups.values()) if g is not None]
        host = torch.stack(
            [
                torch.tensor([s if s >= 0 else slots.num_slots for s in slot_of], dtype=torch.int64),
                *(g.stack_index_host() for g in groups),
                torch.tensor([s in readers for s in slot_of], dtype=torch.int64),
            ]
        )  # (2 + groups, N)
        rows = host if device.type == "cpu" else host.to(device, non_blocking=True)
        self.scale_index = rows[0]
        for g, row in zip(groups, rows[1:-1], strict=True):
            g.use_stack_index(row)
        self.residual_mask = rows[-1].to(slots.dtype).unsqueeze(1) if readers else None  # (N, 1)

    @staticmethod
    def _groups(slot_of: list[int], keep: set[int], device: torch.device) -> RowGroups | None:
        if not keep:
            return None
        return RowGroups.build([s if s in keep else -1 for s in slot_of], device=device)

    def _scales(self, hook: Hook, site: tuple[int, str]) -> torch.Tensor | None:
        """(N, dim) per-token scales, or None when no token here uses the table."""
        table: ScaleTable | None = self.slots.scales.get((hook, site))
        if table is None or not (table.slots & self.used):
            return None
        return table.rows(self.scale_index)

    def linear(self, layer: int, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(N, in) -> (N, out): the base linear layer plus each token's adapter."""
        if not self.active:
            return module(x)
        site = (layer, name)
        in_scale = self._scales(Hook.INPUT_SCALE, site)
        if in_scale is not None:
            x = x * in_scale
        y = module(x)
        table = self.slots.lowrank.get((Hook.LINEAR_DELTA, site))
        if table is not None and self.delta_groups is not None:
            low_rank_apply(x, y, table, self.delta_groups)
        rescale = self._scales(Hook.OUTPUT_RESCALE, site)
        if rescale is not None:
            # g * y + (1 - g) * bias: the weight is rescaled, the bias is not.
            y = y * rescale if module.bias is None else y * rescale + module.bias * (1 - rescale)
        out_scale = self._scales(Hook.OUTPUT_SCALE, site)
        if out_scale is not None:
            y = y * out_scale
        return y

    def block_output(self, layer: int, block: str, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """(N, hidden) output of a block ("attn" or "mlp") before the residual add; residual (N, hidden)."""
        if not self.active or not self.block_groups:
            return out
        table = self.slots.lowrank.get((Hook.BLOCK_OUTPUT, (layer, block)))
        if table is None:
            return out
        x = out if self.residual_mask is None else out + residual * self.residual_mask
        for act, groups in self.block_groups.items():
            low_rank_apply(x, out, table, groups, act=act)
        return out
