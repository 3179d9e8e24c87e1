"""The per-step batch context: which adapter slot each token uses, passed into every layer."""

from __future__ import annotations

import torch
from torch import nn


class BatchContext:
    """Routes every linear layer and block output of one forward pass through the adapters in use."""

    def linear(self, layer: int, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(N, in) -> (N, out): the base linear layer plus each token's adapter."""
        return module(x)

    def block_output(self, layer: int, site: str, out: torch.Tensor) -> torch.Tensor:
        """(N, hidden) output of a block ("attn" or "mlp") before the residual add."""
        return out
