"""Adapter memory tiers: disk store -> CPU cache (LRU, sized in bytes) -> device slots.

The engine thread owns the slots; reading and parsing an adapter from disk happens on a
background thread so running requests keep decoding while it loads. A slot is only ever
given to a new adapter when no running sequence uses the old one (the scheduler decides
which; this class carries the plan out).
"""

from __future__ import annotations

import logging
import queue
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from server.adapters.common import AdapterRef, AdapterWeights
from server.adapters.slots import SlotTable
from server.engine.scheduler import Slot
from server.metrics import Metrics

log = logging.getLogger("peftserve.adapters")


@dataclass
class SlotState:
    ref: AdapterRef | None = None
    ready: bool = False
    users: int = 0
    last_used: int = 0


@dataclass(frozen=True)
class LoadFailure:
    ref: AdapterRef
    error: Exception


class AdapterTiers:
    def __init__(
        self,
        table: SlotTable,
        cpu_bytes: int,
        load: Callable[[AdapterRef], AdapterWeights],
        wake: Callable[[], None],
        metrics: Metrics,
    ) -> None:
        self.table = table
        self.max_cpu_bytes = cpu_bytes
        self.cpu_bytes = 0
        """Bytes of the adapters in `cpu`."""
        self._load = load
        self._wake = wake
        self.metrics = metrics
        self.slots = [SlotState() for _ in range(table.num_slots)]
        self.cpu: OrderedDict[str, AdapterWeights] = OrderedDict()
        self._done: queue.SimpleQueue[tuple[int, AdapterRef, AdapterWeights | Exception, float]] = (
            queue.SimpleQueue()
        )
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peftserve-adapter-loader")
        self._clock = 0

    def states(self) -> list[Slot]:
        """The slots as the scheduler sees them."""
        return [Slot(s.ref.key if s.ref else None, s.ready, s.users, s.last_used) for s in self.slots]

    def slot_of(self, key: str) -> int:
        """The ready slot holding this adapter version."""
        for index, state in enumerate(self.slots):
            if state.ref is not None and state.ref.key == key and state.ready:
                return index
        raise KeyError(key)

    def start_load(self, slot: int, ref: AdapterRef) -> None:
        """Evict whatever `slot` holds and bring `ref` into it, from the CPU cache or from disk."""
        state = self.slots[slot]
        if state.users:
            raise RuntimeError(f"slot {slot}: evicting {state.ref.key if state.ref else None} while in use")
        if state.ref is not None:
            log.info("evicting %s from slot %d", state.ref.key, slot)
            self.table.clear(slot)
            self.metrics.adapter_evictions.inc()
        self.slots[slot] = SlotState(ref=ref)
        cached = self.cpu.get(ref.key)
        if cached is not None:
            self.cpu.move_to_end(ref.key)
            try:
                self._install(slot, ref, cached, source="cpu", read_seconds=0.0)
            except Exception:
                self._free(slot)  # the slot stays usable; the caller ends the requests
                raise
        else:
            self._loader.submit(self._read, slot, ref)

    def _read(self, slot: int, ref: AdapterRef) -> None:
        started = time.perf_counter()
        try:
            result: AdapterWeights | Exception = self._load(ref)
        except Exception as exc:  # reported to the requests waiting for it
            result = exc
        self._done.put((slot, ref, result, time.perf_counter() - started))
        self._wake()

    def poll(self) -> list[LoadFailure]:
        """Install the loads that finished; the ones that failed."""
        failures = []
        while True:
            try:
                slot, ref, result, seconds = self._done.get_nowait()
            except queue.Empty:
                return failures
            if self.slots[slot].ref != ref:
                continue  # the slot was given to another adapter meanwhile
            if isinstance(result, Exception):
                log.error("adapter %s failed to load: %s", ref.key, result)
                self.slots[slot] = SlotState()
                failures.append(LoadFailure(ref, result))
                continue
            try:
                self._install(slot, ref, result, source="disk", read_seconds=seconds)
            except Exception as exc:
                log.exception("adapter %s failed to install", ref.key)
                self._free(slot)
                failures.append(LoadFailure(ref, exc))
                continue
            self._remember(ref.key, result)

    def _free(self, slot: int) -> None:
        """Undo a failed install: whatever it wrote goes, the slot is free again."""
        self.table.clear(slot)
        self.slots[slot] = SlotState()

    def _remember(self, key: str, weights: AdapterWeights) -> None:
        """Keep a parsed adapter within the byte budget; one larger than all of it is not kept."""
        size = weights.nbytes
        if key in self.cpu:
            self.cpu.move_to_end(key)
            return
        if size > self.max_cpu_bytes:
            return
        self.cpu[key] = weights
        self.cpu_bytes += size
        while self.cpu_bytes > self.max_cpu_bytes:
            _, oldest = self.cpu.popitem(last=False)
            self.cpu_bytes -= oldest.nbytes

    def _install(
        self, slot: int, ref: AdapterRef, weights: AdapterWeights, source: str, read_seconds: float
    ) -> None:
        started = time.perf_counter()
        self.table.install(slot, weights)
        self.slots[slot].ready = True
        seconds = read_seconds + time.perf_counter() - started
        self.metrics.adapter_loads.labels(source=source).inc()
        self.metrics.adapter_load_time.observe(seconds)
        log.info("loaded %s into slot %d from %s in %.3f s", ref.key, slot, source, seconds)

    def acquire(self, slot: int) -> None:
        self.slots[slot].users += 1
        self._touch(slot)

    def release(self, slot: int) -> None:
        if self.slots[slot].users <= 0:
            raise RuntimeError(f"slot {slot} released more often than acquired")
        self.slots[slot].users -= 1
        self._touch(slot)

    def _touch(self, slot: int) -> None:
        self._clock += 1
        self.slots[slot].last_used = self._clock

    def shutdown(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
