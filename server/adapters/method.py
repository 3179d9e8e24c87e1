"""The interface every adapter method implements, and the hooks of the forward pass it can use.

One module per method (lora.py, ia3.py, prompt.py, prefix.py, bottleneck.py) defines a
`Method` subclass and its `METHOD` instance; methods.py lists them. The loader, the slot table,
the batch context, the engine and merge go through this interface and never name a method, so
adding one touches only its module and the list. See docs/methods.md.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from server.adapters.common import WEIGHTS_FILE, AdapterWeights
from server.base_model import ModelShape

if TYPE_CHECKING:
    from server.adapters.slots import SlotTable

Site = tuple[int, str]
"""(decoder layer, linear module name such as "q_proj", block "attn" / "mlp", or norm such as
"input_layernorm"); the layer is MODEL_LEVEL for "embed_tokens", "norm" and "lm_head"."""
MODEL_LEVEL = -1
"""The layer index of sites outside the decoder layers: (MODEL_LEVEL, "embed_tokens" / "norm" / "lm_head")."""
BaseWeight = Callable[[int, str], torch.Tensor]
"""(layer, module name) -> the base linear's dense float32 weight (out, in), on the base's device."""


class Hook(Enum):
    """Where in the forward pass a method's slot tensors act, in the order they apply."""

    INPUT_EMBEDDINGS = "input_embeddings"
    """Per-slot soft prompt placed before the prompt's embeddings at prefill."""
    KV_PREFIX = "kv_prefix"
    """Per-slot keys and values written at cache positions 0..n-1 of every layer at prefill."""
    INPUT_ROTATION = "input_rotation"
    """Per-slot block-diagonal rotation of a linear's input: each block of x times its R (OFT)."""
    INPUT_SCALE = "input_scale"
    """Per-channel scale of a linear's input: x * s."""
    LINEAR_DELTA = "linear_delta"
    """Low-rank delta on a linear's output: y += B A x (stacked per site)."""
    OUTPUT_RESCALE = "output_rescale"
    """Per-channel rescale of a linear's weight, not its bias: y = g * (y - bias) + bias."""
    OUTPUT_SCALE = "output_scale"
    """Per-channel scale of a linear's output, bias included: y * s."""
    BLOCK_OUTPUT = "block_output"
    """Low-rank non-linear delta on a block's output before the residual add."""
    EMBEDDING = "embedding"
    """Per-slot edit of the token embeddings (EmbeddingEdit): low-rank delta, replaced rows, whole copy."""
    OUTPUT_BIAS = "output_bias"
    """Per-channel bias added to a linear's output: y + b (trained or added biases)."""
    NORM_WEIGHT = "norm_weight"
    """Per-channel weight of an RMS norm, replacing the base's: w_slot * normalize(x)."""
    LOGITS = "logits"
    """Per-slot edit of lm_head (HeadEdit): replaced rows (tied trainable tokens) or a whole copy."""


@dataclass(frozen=True)
class EmbeddingEdit:
    """What one slot changes in the token embeddings; every part optional, applied in this order."""

    copy: torch.Tensor | None = None
    """(vocab, hidden) the adapter's own embedding matrix (modules_to_save)."""
    rows: tuple[torch.Tensor, torch.Tensor] | None = None
    """(k,) int64 token ids and (k, hidden) their replacing embeddings (trainable tokens)."""
    lora: tuple[torch.Tensor, torch.Tensor] | None = None
    """a (vocab, r) and b (r, hidden), scaling folded into b: e += b[:] . a[token] (embedding LoRA)."""


@dataclass(frozen=True)
class HeadEdit:
    """What one slot changes in lm_head besides a low-rank delta (which is LINEAR_DELTA at its site)."""

    copy: torch.Tensor | None = None
    """(vocab, hidden) the adapter's own lm_head (modules_to_save)."""
    rows: tuple[torch.Tensor, torch.Tensor] | None = None
    """(k,) int64 token ids and (k, hidden) their replacing rows (trainable tokens on tied embeddings)."""


@dataclass(frozen=True)
class ParseContext:
    """What parsing needs to know about the served base."""

    shape: ModelShape
    max_rank: int
    dtype: torch.dtype
    base_weight: BaseWeight
    base_tensor: Callable[[str], torch.Tensor] | None = None
    """HF parameter name (e.g. "model.norm.weight") -> the base's float32 tensor; None where unknown."""
    tied_embeddings: bool = False
    """Whether the base's lm_head shares the embedding matrix (trainable tokens then change logits too)."""
    max_copy_bytes: int = 0
    """--max-module-copy-bytes: the largest whole-matrix copy (embed_tokens, lm_head) an adapter may hold."""


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter's config says, read without its weights."""

    peft_type: str
    virtual_tokens: int = 0
    rank: int | None = None
    target_modules: tuple[str, ...] = ()


class Method:
    """One adapter method. Subclasses set the class attributes and implement what they use."""

    name: str
    peft_types: tuple[str, ...] = ()
    """`peft_type` values of adapter_config.json this method reads (upper case)."""
    hooks: frozenset[Hook] = frozenset()
    merge_refusal: str | None = None
    """Why the method cannot be folded into the base weights; None when `fold` can."""

    def claims(self, config: dict[str, Any]) -> bool:
        """Whether a config without a peft_type of ours is this method's (foreign formats)."""
        return False

    def weights_file(self, config: dict[str, Any]) -> str:
        return WEIGHTS_FILE

    def parse(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], ctx: ParseContext
    ) -> AdapterWeights:
        """Check the checkpoint against the base; raise AdapterError naming the field at fault."""
        raise NotImplementedError

    def describe(self, config: dict[str, Any]) -> AdapterInfo:
        """Kind, virtual tokens, rank and targets from the config alone; raises AdapterError."""
        raise NotImplementedError

    def install(self, slots: SlotTable, slot: int, weights: AdapterWeights) -> None:
        """Place the parsed weights into `slot` through the slot table's per-hook setters."""
        raise NotImplementedError

    def fold(
        self, weights: AdapterWeights, site: Site, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One linear's float32 (out, in) weight and bias with the adapter folded in (merge).

        A bias may come back where the base has none (trained or added biases): merge adds it.
        """
        raise NotImplementedError

    def fold_params(
        self, weights: AdapterWeights, base: Callable[[str], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Parameters outside the decoder linears (HF names: "model.embed_tokens.weight",
        "lm_head.weight", norm weights) with the adapter folded in, float32; `base` gives the base's."""
        return {}

    def reference(self, model: nn.Module, weights: AdapterWeights) -> AbstractContextManager[None] | None:
        """Our plain unbatched reference applied to an HF model, or None when PEFT itself is it."""
        return None
