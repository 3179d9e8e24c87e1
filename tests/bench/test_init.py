"""The bench package: its modules run under the server's OpenMP settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_bench_module_loads_server_before_torch():
    """Else it times the engine under libgomp's defaults, not as a served process waits for work.

    `python -m bench.<name>` imports the package first, as this does."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = (
        "import sys, bench.bench_adapters; m = list(sys.modules); print(m.index('server') < m.index('torch'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"] and "UserWarning" not in done.stderr
