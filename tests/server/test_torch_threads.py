"""Torch work off the engine thread runs on threads that exit, so their OpenMP pools go with them."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import CancelledError

import pytest

from server.torch_threads import SerialWorker, on_own_thread
from tests.helpers import env_without_openmp_waiting


def alive(name: str) -> bool:
    return any(t.name == name for t in threading.enumerate())


def test_a_worker_runs_calls_in_order_and_its_thread_exits_when_none_is_left():
    worker = SerialWorker("peftserve-test-worker")
    gate, order = threading.Event(), []
    first = worker.submit(lambda: gate.wait(10) and order.append(1))
    rest = [worker.submit(order.append, i) for i in (2, 3)]
    assert alive("peftserve-test-worker")
    gate.set()
    first.result(10)
    [f.result(10) for f in rest]
    worker.join()
    assert order == [1, 2, 3] and not alive("peftserve-test-worker")
    assert worker.submit(lambda: 4).result(10) == 4  # a new thread for new work
    worker.join()
    assert not alive("peftserve-test-worker")


def test_a_failing_call_reaches_its_caller_and_the_worker_goes_on():
    worker = SerialWorker("peftserve-test-failing")
    failed = worker.submit(lambda: 1 / 0)
    after = worker.submit(lambda: "next")
    with pytest.raises(ZeroDivisionError):
        failed.result(10)
    assert after.result(10) == "next"


def test_shutdown_cancels_queued_calls_lets_the_running_one_finish_and_refuses_new_ones():
    worker = SerialWorker("peftserve-test-shutdown")
    started, gate = threading.Event(), threading.Event()
    running = worker.submit(lambda: started.set() or (gate.wait(10) and "done"))
    queued = worker.submit(lambda: "never")
    started.wait(10)
    worker.shutdown()
    gate.set()
    assert running.result(10) == "done"
    with pytest.raises(CancelledError):
        queued.result(10)
    with pytest.raises(RuntimeError, match="shut down"):
        worker.submit(lambda: None)
    worker.join()


def test_on_own_thread_returns_the_result_or_raises_and_leaves_no_thread():
    before = set(threading.enumerate())
    assert on_own_thread(lambda x: (x, threading.current_thread().name), 3)[0] == 3
    assert on_own_thread(lambda: threading.current_thread()) is not threading.current_thread()
    with pytest.raises(KeyError):
        on_own_thread({}.__getitem__, "missing")
    assert set(threading.enumerate()) == before


# In a fresh process: OS threads (/proc/self/task) after a parallel torch op on another thread.
POOLS = """
import os, threading, time
from server.torch_threads import on_own_thread
import torch

def os_threads():
    return len(os.listdir("/proc/self/task"))

def parallel_op():
    torch.ones(4096, 4096).sum()  # far above torch's grain size: runs on the thread's OpenMP pool

torch.set_num_threads(2)
start = os_threads()
on_own_thread(parallel_op)
time.sleep(0.2)  # the OS thread is on its way out once Python's is joined
after_own = os_threads()
stay, done = threading.Event(), threading.Event()
def long_lived():
    parallel_op()
    done.set()
    stay.wait()
threading.Thread(target=long_lived, daemon=True).start()
done.wait()
print(start, after_own, os_threads())
"""


def test_a_thread_that_exits_takes_its_openmp_pool_with_it_and_a_living_one_keeps_it():
    out = subprocess.run(
        [sys.executable, "-c", POOLS], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    start, after_own, with_long_lived = map(int, out.split())
    assert after_own == start  # the worker and its pool are gone
    assert with_long_lived >= start + 2  # the living thread and at least one OpenMP worker of its own


@pytest.mark.parametrize(
    ("given", "expected"), [({}, "30000 PASSIVE"), ({"GOMP_SPINCOUNT": "5"}, "5 PASSIVE")]
)
def test_the_server_package_sets_openmp_waiting_before_torch_loads_unless_told(given, expected):
    env = env_without_openmp_waiting()
    code = (
        "import os, server, sys; assert 'torch' not in sys.modules; "
        "print(os.environ['GOMP_SPINCOUNT'], os.environ['OMP_WAIT_POLICY'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, **given}, capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == expected.split()


def test_torch_loaded_first_leaves_openmp_waiting_unset_and_says_so():
    """Too late to apply, so not claimed either: the calibration cache is keyed by these variables."""
    env = env_without_openmp_waiting()
    code = "import os, torch, server; print(*map(os.environ.get, ('GOMP_SPINCOUNT', 'OMP_WAIT_POLICY')))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["None", "None"]
    assert "torch was imported before peftserve's server package" in done.stderr
    assert "OMP_WAIT_POLICY and GOMP_SPINCOUNT" in done.stderr
    told = {**env, "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "7"}
    done = subprocess.run([sys.executable, "-c", code], env=told, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["7", "PASSIVE"] and "UserWarning" not in done.stderr


QUOTA = """
import os, sys, types
quota = types.ModuleType("server.cpu_quota")  # stands in for a cgroup CPU quota of {threads} CPUs
quota.quota_cpus = lambda: {threads}
quota.threads_for_this_process = lambda cpus: cpus
sys.modules["server.cpu_quota"] = quota
{imports}
print(os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads())
"""


def quota_run(
    threads: int | None, imports: str, given: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = env_without_openmp_waiting()
    code = QUOTA.format(threads=threads, imports=imports)
    return subprocess.run(
        [sys.executable, "-c", code], env={**env, **(given or {})}, capture_output=True, text=True, check=True
    )


def test_a_cgroup_cpu_quota_caps_torchs_threads_unless_told():
    default = quota_run(None, "import server, torch").stdout.split()
    assert default[0] == "None"
    assert quota_run(1, "import server, torch").stdout.split() == ["1", "1"]
    told, threads = quota_run(1, "import server, torch", {"OMP_NUM_THREADS": "2"}).stdout.split()
    assert told == "2" and int(threads) > 1


def test_torch_loaded_first_cannot_take_the_quotas_thread_count_and_says_so():
    done = quota_run(1, "import torch, server")
    assert done.stdout.split()[0] == "None"
    assert "OMP_NUM_THREADS" in done.stderr and "cannot take effect" in done.stderr


def test_the_suite_itself_loaded_server_before_torch():
    """So the engine under test waits for work as a served one does (tests/__init__.py)."""
    loaded = list(sys.modules)  # in the order imports began
    assert loaded.index("server") < loaded.index("torch")


SINGLE = """
import os, threading
from server.torch_threads import single_threaded
import torch

start = os.listdir("/proc/self/task")
stay, done, seen = threading.Event(), threading.Event(), []
def loader():
    single_threaded()
    x = torch.ones(2048, 2048)
    x.sum(), x @ x[:, :64], x.to(torch.bfloat16, copy=True)  # torch's own loops and MKL's
    seen.append(torch.get_num_threads())
    done.set()
    stay.wait()
threading.Thread(target=loader, daemon=True).start()
done.wait()
print(len(start), len(os.listdir("/proc/self/task")), seen[0], torch.get_num_threads())
"""


def test_a_single_threaded_thread_holds_no_openmp_pool_and_leaves_the_others_their_threads():
    env = {**os.environ, "OMP_NUM_THREADS": "2"}  # every thread's default, as in the server
    out = subprocess.run(
        [sys.executable, "-c", SINGLE], env=env, capture_output=True, text=True, check=True, timeout=120
    ).stdout
    start, with_loader, loader_threads, main_threads = map(int, out.split())
    assert with_loader == start + 1  # the thread itself, no OpenMP worker
    assert (loader_threads, main_threads) == (1, 2)
