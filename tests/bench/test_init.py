"""The bench package: its modules run under the server's OpenMP settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import env_without_openmp_waiting

ROOT = Path(__file__).resolve().parents[2]


def test_a_bench_module_loads_server_before_torch():
    """Else it times the engine under libgomp's defaults, not as a served process waits for work.

    `python -m bench.<name>` imports the package first, as this does."""
    env = env_without_openmp_waiting()
    code = (
        "import sys, bench.bench_adapters; m = list(sys.modules); print(m.index('server') < m.index('torch'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"] and "UserWarning" not in done.stderr
