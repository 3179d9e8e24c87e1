"""peftserve: one frozen base model, many PEFT adapters, batched together."""

import os

__version__ = "0.1.0"

# Torch's OpenMP threads spin while they wait for work. On a machine shared with anything else
# (our HTTP thread, a load generator, other processes) a spinning thread holds the core that the
# thread it waits for needs, and every op then waits out a scheduler time slice: measured here,
# a decode step took 2x to 10x longer. Passive threads sleep instead. This must be set before
# torch loads; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
