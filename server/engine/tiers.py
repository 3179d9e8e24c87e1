"""Adapter memory tiers: disk store -> CPU cache (LRU, sized in bytes) -> device slots.

The engine thread decides which adapter goes into which slot (the scheduler's plan; this class
carries it out) and evicts; everything else of a load happens on a background loader thread
(one load at a time, in order; the thread exits when no load is left, see
server/torch_threads.py), so running requests keep decoding meanwhile: reading and checking the
file, copying it straight into the slot's rows (from the file's mapping, no copy in between),
and only then, once the engine has been told the slot is ready, packing a copy of its own for
the CPU cache. An adapter already in the CPU cache is copied into the slot from there. While it
loads, a slot is used by no sequence and never evicted (the scheduler's invariants), so the
loader writes its rows while the engine runs forward passes over the other slots.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from server.adapters.common import AdapterRef, AdapterWeights
from server.adapters.slots import SlotTable
from server.engine.scheduler import Slot
from server.metrics import Metrics
from server.torch_threads import SerialWorker, single_threaded

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
        """Parsed adapters in memory of their own, least recently used first; guarded by _lock."""
        self._lock = threading.Lock()
        # (slot, adapter, error or None, "disk" or "cpu", seconds) per finished load
        self._done: queue.SimpleQueue[tuple[int, AdapterRef, Exception | None, str, float]] = (
            queue.SimpleQueue()
        )
        self._loader = SerialWorker("peftserve-adapter-loader")
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
        if state.ready and state.ref is not None:
            log.info("evicting %s from slot %d", state.ref.key, slot)
            self.metrics.adapter_evictions.inc()
        if state.ref is not None and not state.ready:
            raise RuntimeError(f"slot {slot}: evicting {state.ref.key} while it loads")
        self.table.clear(slot)
        self.slots[slot] = SlotState(ref=ref)
        self._loader.submit(self._bring, slot, ref)

    def _bring(self, slot: int, ref: AdapterRef) -> None:
        """On the loader thread: fill `slot` with `ref`, tell the engine, then cache a copy."""
        single_threaded()  # loads can run back to back for long: no OpenMP pool beside the engine's
        started = time.perf_counter()
        with self._lock:
            cached = self.cpu.get(ref.key)
            if cached is not None:
                self.cpu.move_to_end(ref.key)
        result: Exception | None = None
        try:
            weights = cached if cached is not None else self._load(ref)
            self.table.install(slot, weights)
        except Exception as exc:  # reported to the requests waiting for it; the slot is free again
            self.table.clear(slot)
            result = exc
        source = "cpu" if cached is not None else "disk"
        self._done.put((slot, ref, result, source, time.perf_counter() - started))
        self._wake()
        if result is None and cached is None:
            try:
                weights.own(self.table.dtype)
            except Exception:  # the slot is fine; only the CPU cache goes without it
                log.exception("adapter %s could not be copied into the CPU cache", ref.key)
                return
            self._remember(ref.key, weights)

    def poll(self) -> list[LoadFailure]:
        """Mark the slots whose loads finished ready; the loads that failed."""
        failures = []
        while True:
            try:
                slot, ref, error, source, seconds = self._done.get_nowait()
            except queue.Empty:
                return failures
            if self.slots[slot].ref != ref:
                raise RuntimeError(f"slot {slot} was given to another adapter while {ref.key} loaded")
            if error is not None:
                log.error("adapter %s failed to load: %s", ref.key, error)
                self.slots[slot] = SlotState()
                failures.append(LoadFailure(ref, error))
                continue
            self.slots[slot].ready = True
            self.metrics.adapter_loads.labels(source=source).inc()
            self.metrics.adapter_load_time.observe(seconds)
            log.info("loaded %s into slot %d from %s in %.3f s", ref.key, slot, source, seconds)

    def cached(self) -> list[str]:
        """Keys of the adapter versions in the CPU cache, least recently used first."""
        with self._lock:
            return list(self.cpu)

    def settle(self) -> None:
        """Wait until the loader thread has done everything asked of it so far, and has exited."""
        self._loader.join()

    def _remember(self, key: str, weights: AdapterWeights) -> None:
        """Keep a parsed adapter within the byte budget; one larger than all of it is not kept."""
        size = weights.nbytes
        if size > self.max_cpu_bytes:
            return
        with self._lock:
            if key in self.cpu:
                self.cpu.move_to_end(key)
                return
            self.cpu[key] = weights
            self.cpu_bytes += size
            while self.cpu_bytes > self.max_cpu_bytes:
                _, oldest = self.cpu.popitem(last=False)
                self.cpu_bytes -= oldest.nbytes

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
        self._loader.shutdown()
