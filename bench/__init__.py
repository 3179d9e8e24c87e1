"""In-process benchmarks against the baselines in DESIGN.md.

`server` is imported first, as the server process imports it: its OpenMP settings
(server/__init__.py) only take effect when set before torch loads, and the bench modules import
torch. Run them as modules (`python -m bench.bench_lowrank`) so this file runs first."""

import server  # noqa: F401
