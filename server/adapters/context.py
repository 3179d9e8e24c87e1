"""The per-step batch context: which adapter slot each token uses, passed into every layer.

Built once per forward pass from the slot table and the (N,) slot of every token (-1 = base
model only). Everything that depends only on those slots (groups of rows per slot, gather
indices) is computed here once and shared by all layers. It applies the slot table's hooks
(method.Hook) and never asks which method put a tensor there.
"""

from __future__ import annotations

import torch
from torch import nn

from server.adapters.lowrank import LowRankTable, RowGroups, Segments, gather_apply, low_rank_apply
from server.adapters.method import MODEL_LEVEL, EmbeddingEdit, HeadEdit, Hook
from server.adapters.rotation import RotationRows, RotationTable, rotate_rows
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
        self.slot_of = slot_of
        self._rows: dict[int, torch.Tensor] = {}  # slot -> (n,) its tokens' indices, built on first use
        used = set(slot_of) - {-1}
        self.active = bool(used)
        if not self.active:
            return
        self.used = used
        self.rotation_rows: dict[frozenset[int], RotationRows] = {}
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
        # Every index of this step, built on the host and copied in one transfer: the scale
        # tables' (slot, or the table's last row of ones for the base model), which rows'
        # bottleneck reads the residual and, off the CPU, each group set's segments for the
        # torch path. On the CPU the kernel needs no segments: a table on the torch path builds
        # them on first use (`RowGroups.segments`), and there is no copy to save.
        groups = [g for g in (self.delta_groups, *self.block_groups.values()) if g is not None]
        on_cpu = device.type == "cpu"
        layouts = [] if on_cpu else [(g, *g.segments_host(slots.max_rank)) for g in groups]
        host = torch.cat(
            [
                torch.tensor([s if s >= 0 else slots.num_slots for s in slot_of], dtype=torch.int64),
                torch.tensor([s in readers for s in slot_of], dtype=torch.int64),
                *(buffer for _, _, buffer in layouts),
            ]
        )  # (2N + the segment buffers,)
        moved = host if on_cpu else host.to(device, non_blocking=True)
        n = len(slot_of)
        pieces = moved.split([n, n, *(buffer.shape[0] for _, _, buffer in layouts)])
        self.scale_index = pieces[0]
        self.residual_mask = pieces[1].to(slots.dtype).unsqueeze(1) if readers else None  # (N, 1)
        for (g, length, _), buffer in zip(layouts, pieces[2:], strict=True):
            g.use_segments(slots.max_rank, length, buffer)

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

    def _rotation_rows(self, table: RotationTable) -> RotationRows | None:
        """The rows this step rotates with `table`, shared by every site whose table holds the same slots."""
        members = frozenset(table.slots & self.used)
        if not members:
            return None
        if members not in self.rotation_rows:
            self.rotation_rows[members] = RotationRows.build(self.slot_of, members, self.slots.device)
        return self.rotation_rows[members]

    def linear(self, layer: int, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(N, in) -> (N, out): the base linear layer plus each token's adapter."""
        if not self.active:
            return module(x)
        site = (layer, name)
        for table in self.slots.rotations.get((Hook.INPUT_ROTATION, site), ()):
            rows = self._rotation_rows(table)
            if rows is not None:
                x = rotate_rows(x, table, rows)
        in_scale = self._scales(Hook.INPUT_SCALE, site)
        if in_scale is not None:
            x = x * in_scale
        y = module(x)
        table = self.slots.lowrank.get((Hook.LINEAR_DELTA, site))
        if table is not None:
            self._low_rank(x, y, table)
        rescale = self._scales(Hook.OUTPUT_RESCALE, site)
        if rescale is not None:
            # g * y + (1 - g) * bias: the weight is rescaled, the bias is not.
            y = y * rescale if module.bias is None else y * rescale + module.bias * (1 - rescale)
        added_bias = self._scales(Hook.OUTPUT_BIAS, site)
        if added_bias is not None:  # after the rescale: DoRA leaves biases alone
            y = y + added_bias
        out_scale = self._scales(Hook.OUTPUT_SCALE, site)
        if out_scale is not None:
            y = y * out_scale
        return y

    def _low_rank(self, x: torch.Tensor, y: torch.Tensor, table: LowRankTable) -> None:
        if self.delta_groups is not None:
            low_rank_apply(x, y, table, self.delta_groups)

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

    def _slot_rows(self, hook: Hook) -> list[tuple[object, torch.Tensor]]:
        """(what the slot placed for `hook`, (n,) indices of its tokens) for every slot here that placed some.

        For the per-slot hooks that replace or gather whole rows (embeddings, lm_head): a step
        holds few slots, and these run once per step, not once per layer.
        """
        if not self.active:
            return []
        found = []
        for slot in sorted(self.used):
            data = self.slots.slot_data(slot, hook)
            if data is None:
                continue
            if slot not in self._rows:
                rows = [i for i, s in enumerate(self.slot_of) if s == slot]
                self._rows[slot] = torch.tensor(rows, dtype=torch.int64).to(self.slots.device)
            found.append((data, self._rows[slot]))
        return found

    def embed(self, module: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, hidden): the base's embeddings with each token's adapter edits
        (whole copy, then replaced rows, then low-rank delta)."""
        embeds = module(ids)
        flat, flat_ids = embeds.view(-1, embeds.shape[-1]), ids.reshape(-1)  # (N, hidden), (N,)
        edit: EmbeddingEdit
        for edit, rows in self._slot_rows(Hook.EMBEDDING):
            tokens = flat_ids[rows]  # (n,)
            if edit.copy is not None:
                flat[rows] = edit.copy[tokens]
            if edit.rows is not None:
                index, values = edit.rows  # (k,), (k, hidden)
                match = tokens.unsqueeze(1) == index.unsqueeze(0)  # (n, k)
                hit = match.any(dim=1)
                flat[rows[hit]] = values[match[hit].int().argmax(dim=1)]
            if edit.lora is not None:
                a, b = edit.lora  # (vocab, r), (r, hidden)
                flat[rows] += a[tokens] @ b
        return embeds

    def norm(self, layer: int, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, hidden): an RMS norm whose weight is each token's adapter's, or the base's."""
        weight = self._scales(Hook.NORM_WEIGHT, (layer, name)) if self.active else None
        if weight is None:
            return module(x)
        return weight * rms_normalize(module, x)

    def rows(self, index: list[int]) -> BatchContext:
        """The context of these tokens alone (each stands for its row), for the final norm and lm_head."""
        if not self.active:
            return self
        slots = self.slots
        head = any(site[0] == MODEL_LEVEL for _, site in (*slots.lowrank, *slots.scales)) or any(
            slots.slot_data(s, Hook.LOGITS) is not None for s in self.used
        )
        # the final norm and lm_head read no adapter here: skip building the per-row groups
        return BatchContext(slots, [self.slot_of[i] for i in index]) if head else BatchContext()

    def logits(self, module: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """(B, hidden) normed last hidden states -> (B, vocab): lm_head with each row's adapter."""
        y = self.linear(MODEL_LEVEL, "lm_head", module, h)
        edit: HeadEdit
        for edit, rows in self._slot_rows(Hook.LOGITS):
            x = h[rows]  # (n, hidden)
            if edit.copy is not None:
                y[rows] = x @ edit.copy.t()
            if edit.rows is not None:
                index, values = edit.rows  # (k,), (k, hidden)
                y[rows.unsqueeze(1), index.unsqueeze(0)] = x @ values.t()  # (n, k)
        return y


class StaticBatchContext(BatchContext):
    """A decode step's context whose operations do not depend on which slots the step holds, so a
    captured graph (engine/graphs.py) replays it for any mix: every low-rank and scale table there
    is applies to every row, each row reading its slot's entries or the table's no-adapter entries
    (zeros, ones, the base's norm weight), which leave the row exactly as the base computes it.

    Only for steps whose slots act through those tables alone (`SlotTable.gathers_rows` false
    for each): rotations, block adapters and embedding or lm_head edits pick rows per slot, and
    none is applied here. Its index tensors are the caller's, filled anew before every replay.
    """

    def __init__(self, slots: SlotTable, scale_index: torch.Tensor, stack_index: torch.Tensor) -> None:
        """scale_index (B,): each row's slot, num_slots for none; stack_index (B,): slot + 1, 0 for none."""
        self.slots = slots
        self.active = True
        self.scale_index = scale_index
        every = torch.arange(stack_index.shape[0], device=stack_index.device)  # (B,)
        self.segments = Segments(1, stack_index, every, every, every)  # a segment per row: BGMV

    def _scales(self, hook: Hook, site: tuple[int, str]) -> torch.Tensor | None:
        table = self.slots.scales.get((hook, site))
        return None if table is None else table.rows(self.scale_index)

    def _low_rank(self, x: torch.Tensor, y: torch.Tensor, table: LowRankTable) -> None:
        gather_apply(x, y, table, self.segments)

    def _rotation_rows(self, table: RotationTable) -> RotationRows | None:
        return None

    def block_output(self, layer: int, block: str, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return out

    def _slot_rows(self, hook: Hook) -> list[tuple[object, torch.Tensor]]:
        return []


def rms_normalize(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """HF's Llama RMS norm without its weight: the same float32 steps, so w * this equals module(x)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    return h.to(x.dtype)
