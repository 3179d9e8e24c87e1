"""Importing `server` makes glibc keep freed blocks: reallocating one faults no pages in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# Allocates and frees a 40 MiB block 20 times (above glibc's largest default mmap threshold, so
# by default each one is a fresh mapping) and prints the minor page faults per allocation.
FAULTS = """
import json, resource, sys
if sys.argv[1] == "server":
    import server
    print(json.dumps(server.MALLOC_KEEPS_MEMORY))
else:
    print(json.dumps(None))
block = bytearray(40 << 20)
del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    block = bytearray(40 << 20)
    del block
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20))
"""


def faults(importing: str, env: dict[str, str] | None = None) -> tuple[bool | None, float]:
    out = subprocess.run(
        [sys.executable, "-c", FAULTS, importing], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    return json.loads(out[0]), json.loads(out[1])


def test_reallocated_blocks_fault_no_pages_in_again():
    kept, with_server = faults("server")
    _, without = faults("nothing")
    assert kept is True
    assert without > 5000, "40 MiB is 10,240 pages: glibc's default maps each block afresh"
    assert with_server < 100


def test_the_environment_wins():
    kept, per_block = faults("server", {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    assert kept is False and per_block > 5000
