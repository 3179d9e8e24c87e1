"""Decode steps replayed from captured CUDA graphs.

On a GPU a decode step is a few thousand small kernel launches, and at small batches launching
them costs more than their work; a CUDA graph launches a whole step at once (as gpt-fast and vLLM
do). A graph fixes its shapes and the memory it reads, so a step is padded to a bucket: its rows
to the next of 1, 2, 4, 8, 16, 24, ... up to --max-batch-size, its block tables to the next power
of two blocks (attention reads that many keys, masked beyond each row's position). Padding rows
have no adapter, position 0 and only the null block, where they write their key and value. The
adapters run through `StaticBatchContext`, whose operations are the same for any mix of slots.

A step's inputs go into its graph's one input buffer in one copy; the graph replays and the first
rows of its logits are the step's. A graph is captured the first time a step needs its bucket and
all are dropped when the slot table's layout (which tables exist) changes. Steps with a row whose
adapter picks rows per slot (`SlotTable.gathers_rows`) and prefills run eagerly.

Off CUDA nothing is captured: a "graph" runs the same padded code over the same buffers again,
which is how the tests hold this path to the references on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from server.adapters.context import StaticBatchContext
from server.adapters.slots import SlotTable
from server.engine.blocks import NULL_BLOCK
from server.engine.kv_cache import PagedKVCache
from server.engine.model import Decoder, StepInputs

log = logging.getLogger(__name__)

Replay = Callable[[], torch.Tensor]
"""Runs a captured step over its input buffer; (bucket rows, vocab) float32 logits."""

_FIELDS = 5
"""Per row, besides its block table: token id, position, cache slot written, scale index, stack index."""


def batch_buckets(max_batch_size: int) -> list[int]:
    """Row counts a graph is captured for: 1, 2, 4, then every multiple of 8, up to max_batch_size."""
    sizes = {n for n in (1, 2, 4) if n < max_batch_size} | set(range(8, max_batch_size, 8))
    return sorted(sizes | {max_batch_size})


def block_bucket(blocks: int, max_blocks: int) -> int:
    """The power of two at or above `blocks`, at most `max_blocks`."""
    return min(1 << max(0, blocks - 1).bit_length(), max_blocks)


class GraphCaptureError(RuntimeError):
    """A decode step could not be captured (an operation that syncs with the host, or one CUDA
    graphs do not support, in the model's or an adapter's code)."""


class DecodeGraphs:
    """One captured decode step per (rows, blocks) bucket, for one engine's model, cache and slots."""

    def __init__(
        self, decoder: Decoder, cache: PagedKVCache, slots: SlotTable, max_batch_size: int, max_len: int
    ) -> None:
        self.decoder, self.cache, self.slots = decoder, cache, slots
        self.buckets = batch_buckets(max_batch_size)
        self.max_blocks = -(-max_len // cache.block_size)
        self.device = slots.device
        self.replays = 0
        """Decode steps served by a graph."""
        self.captures = 0
        """Graphs captured, anew after each layout change."""
        self._graphs: dict[tuple[int, int], tuple[torch.Tensor, Replay]] = {}
        self._layout = slots.layout_version
        self._pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None

    def takes(self, slot_of: list[int]) -> bool:
        """Whether a decode step of rows with these slots (-1: none) can replay a graph."""
        return len(slot_of) <= self.buckets[-1] and not any(
            self.slots.gathers_rows(s) for s in set(slot_of) if s >= 0
        )

    def decode(self, ids: list[int], step: StepInputs, slot_of: list[int]) -> torch.Tensor:
        """(B, vocab) float32 logits of a decode step: each row's last token `ids`, its inputs `step` on
        the host, its slot."""
        if self.slots.layout_version != self._layout:
            self._graphs.clear()
            self._layout = self.slots.layout_version
        rows = len(ids)
        batch = next(n for n in self.buckets if n >= rows)
        blocks = block_bucket(-(-step.span // self.cache.block_size), self.max_blocks)
        found = self._graphs.get((batch, blocks))
        if found is None:
            found = self._graphs[(batch, blocks)] = self._capture(batch, blocks)
        inputs, replay = found
        inputs.copy_(self._host_inputs(batch, blocks, ids, step, slot_of), non_blocking=True)
        self.replays += 1
        return replay()[:rows]

    def _host_inputs(
        self, batch: int, blocks: int, ids: list[int], step: StepInputs, slot_of: list[int]
    ) -> torch.Tensor:
        """The graph's input buffer for this step, on the host: the real rows, then padding rows."""
        rows, none = len(ids), self.slots.num_slots
        flat = torch.zeros(batch * (_FIELDS + blocks), dtype=torch.int64)
        token, position, where, scale, stack, table = _split(flat, batch, blocks)
        token[:rows] = torch.tensor(ids)
        position[:rows] = step.positions.view(-1)
        where.fill_(NULL_BLOCK * self.cache.block_size)
        where[:rows] = step.slots.view(-1)
        scale.fill_(none)
        scale[:rows] = torch.tensor([s if s >= 0 else none for s in slot_of])
        stack[:rows] = torch.tensor(slot_of) + 1
        table.fill_(NULL_BLOCK)
        width = min(step.block_table.shape[1], blocks)
        table[:rows, :width] = step.block_table[:, :width]
        return flat

    def _capture(self, batch: int, blocks: int) -> tuple[torch.Tensor, Replay]:
        log.debug("capturing the decode step for %d rows and %d blocks", batch, blocks)
        self.captures += 1
        inputs = torch.zeros(batch * (_FIELDS + blocks), dtype=torch.int64, device=self.device)
        token, position, where, scale, stack, table = _split(inputs, batch, blocks)
        step = StepInputs(
            position.view(batch, 1), table, where.view(batch, 1), span=blocks * self.cache.block_size
        )
        ctx = StaticBatchContext(self.slots, scale, stack)
        decoder, cache = self.decoder, self.cache

        @torch.inference_mode()
        def forward() -> torch.Tensor:
            embeds = decoder.embed(token.unsqueeze(0), ctx)[0]  # (batch, hidden)
            return decoder.logits(decoder.hidden(embeds, [step], ctx, cache), ctx)  # (batch, vocab)

        if self._pool is None:
            return inputs, forward
        try:
            return inputs, _cuda_graph(forward, self._pool)
        except RuntimeError as e:
            raise GraphCaptureError(f"capturing the decode step for {batch} rows failed: {e}") from e


def _split(flat: torch.Tensor, batch: int, blocks: int) -> tuple[torch.Tensor, ...]:
    """token, position, where, scale, stack (batch,) each, then the (batch, blocks) block table."""
    *fields, table = flat.split([batch] * _FIELDS + [batch * blocks])
    return (*fields, table.view(batch, blocks))


def _cuda_graph(forward: Callable[[], torch.Tensor], pool: tuple[int, int]) -> Replay:
    """`forward` captured into a CUDA graph, after one run outside it: lazy initialisation (cuBLAS
    workspaces, kernel loads) must not happen during a capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # thread_local: the adapter loader thread may copy into the slot tables meanwhile (rows that
    # read a slot never run while it loads).
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = forward()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay
