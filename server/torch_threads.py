"""Parallel torch work on the CPU belongs to one long-lived thread: the engine's.

torch's CPU ops run in parallel through OpenMP (libgomp). Every thread that runs a parallel op
gets a pool of OpenMP worker threads of its own, kept until that thread exits. Once the pools
together hold more threads than the machine has CPUs, libgomp stops spinning between parallel
regions (its "throttled" spin count of about 100) and every op wakes its workers through the
kernel instead. A decode step runs thousands of small ops, so that made the whole engine slow:
measured on a 2-core AVX2 machine, the engine served 147 tokens/s with no adapters and 0.64 of
that with every adapter kind mixed while the main thread (which had loaded the model) and the
adapter loader thread each held a pool; with only the engine's, 181-202 tokens/s and 0.77-0.92
(see the README's CPU section).

So start-up work (model load, engine construction), adapter loads, uploads' validation and
merges each run on a thread that exits when its work is done (`SerialWorker`, `on_own_thread`),
and the engine thread is the only one left holding a pool while it serves. Adapter loads, which
under churn keep their thread busy for as long as the churn lasts, also run `single_threaded`:
no pool at all.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")


class SerialWorker:
    """Runs submitted calls one at a time, in order, on a thread that exits whenever it runs out of work."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._jobs: deque[tuple[Future, Callable[..., Any], tuple[Any, ...]]] = deque()
        self._thread: threading.Thread | None = None
        self._last: threading.Thread | None = None
        self._closed = False

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Queue fn(*args); its Future holds the result or the exception."""
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name} is shut down")
            self._jobs.append((future, fn, args))
            if self._thread is None:
                self._thread = self._last = threading.Thread(target=self._drain, name=self.name, daemon=True)
                self._thread.start()
        return future

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    self._thread = None
                    return
                future, fn, args = self._jobs.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:  # the caller gets it from the Future
                future.set_exception(exc)
            else:
                future.set_result(result)

    def join(self) -> None:
        """Wait until everything submitted so far has run and the thread has exited."""
        while True:
            with self._lock:
                running, last = self._thread, self._last
            if running is None:  # the last thread may still be on its way out
                if last is not None:
                    last.join()
                return
            running.join()

    def shutdown(self) -> None:
        """Refuse new calls and cancel the queued ones; a call already running finishes."""
        with self._lock:
            self._closed = True
            pending, self._jobs = self._jobs, deque()
        for future, _, _ in pending:
            future.cancel()


def on_own_thread(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) on a new thread that exits afterwards, taking its OpenMP pool with it."""
    worker = SerialWorker(f"peftserve-{getattr(fn, '__name__', 'work')}")
    result = worker.submit(fn, *args).result()
    worker.join()
    return result


def single_threaded() -> None:
    """Run this thread's parallel torch ops on it alone, with no OpenMP pool; other threads keep theirs.

    torch.set_num_threads cannot do it: it also sets the count that every thread started later
    takes. OpenMP's omp_set_num_threads is per thread, and MKL follows it unless
    torch.set_num_threads was called in this process (Ray replicas do): then MKL's own matmuls
    on this thread still run in parallel. Where torch's OpenMP runtime cannot be found (not
    libgomp, not Linux) this does nothing, and only the thread's exit frees its pool.
    """
    torch.get_num_threads()  # torch's per-thread lazy set-up, which would undo the call below
    omp = _libgomp()
    if omp is not None:
        omp.omp_set_num_threads(1)


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    """The libgomp torch loaded (torch wheels bundle their own), through the process's memory map."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return None
    paths = {line.split()[-1] for line in maps.read_text().splitlines() if "libgomp" in line}
    return ctypes.CDLL(paths.pop()) if len(paths) == 1 else None
