"""The test suite. `server` is imported first, as the server process imports it: its OpenMP
settings (server/__init__.py) only take effect when set before torch loads, and conftest.py and
the test modules import torch."""

import server  # noqa: F401
