"""AdaLoRA (PEFT `ADALORA`): an SVD-shaped low-rank delta, y += s / ranknum * B diag(E) A x, served as LoRA.

PEFT keeps A (r, in), the singular values E (r, 1) and B (out, r) per linear, with
scaling = lora_alpha (or the rank when lora_alpha is 0) and ranknum = init_r (PEFT never saves
ranknum: it is always the initial rank, also after the budget pruned a layer). Rank allocation
prunes a layer by zeroing entries of E (and, once `rank_pattern` is saved, by dropping them
from the file); both are honoured: only the non-zero singular values are kept, so a pruned
layer costs its remaining rank, and --max-lora-rank applies to that. E and the scaling are
folded at parse: a = diag(E) A, b = (s / ranknum) B^T.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from server.adapters import as_lora
from server.adapters.common import (
    AdapterError,
    expect_shape,
    finite_number,
    module_path,
    positive_int,
    target_list,
)
from server.adapters.lora import Lora, LoraWeights
from server.adapters.method import AdapterInfo, Hook, ParseContext

_SUFFIX = re.compile(r"\.(lora_A|lora_B|lora_E)$")
RANKNUM_EPS = 1e-5
"""PEFT divides by ranknum + 1e-5."""


def _declared_rank(config: dict[str, Any], path: str, init_r: int) -> int:
    """The rank PEFT gives this layer at load: init_r, or the kept entries of its rank_pattern mask."""
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        raise AdapterError("rank_pattern must be an object of parameter name -> mask", "rank_pattern")
    for key, mask in pattern.items():
        if key.removesuffix(".lora_E").endswith(path):
            if not isinstance(mask, list) or not all(isinstance(m, bool | int) for m in mask):
                raise AdapterError(f"rank_pattern[{key!r}] must be a list of booleans", "rank_pattern")
            return sum(bool(m) for m in mask)
    return init_r


def parse(config: dict[str, Any], tensors: dict[str, torch.Tensor], ctx: ParseContext) -> LoraWeights:
    as_lora.check_options(config, "ADALORA")
    init_r = positive_int(config, "init_r")
    alpha = finite_number(config, "lora_alpha", 8.0)
    dims = ctx.shape.linear_dims()
    factors = {}
    for (layer, module), found in sorted(
        as_lora.group_by_site(config, tensors, ctx.shape, _SUFFIX, "ADALORA").items()
    ):
        path = module_path(layer, module)
        missing = sorted({"lora_A", "lora_B", "lora_E"} - set(found))
        if missing:
            raise AdapterError(f"{path} needs lora_A, lora_B and lora_E; {missing[0]} is missing", path)
        (a_name, a), (b_name, b), (e_name, e) = found["lora_A"], found["lora_B"], found["lora_E"]
        rank = _declared_rank(config, path, init_r)
        in_features, out_features = dims[module]
        expect_shape(a_name, a, (rank, in_features))
        expect_shape(b_name, b, (out_features, rank))
        expect_shape(e_name, e, (rank, 1))
        if rank == 0:
            continue
        scale = (alpha if alpha > 0 else float(rank)) / (init_r + RANKNUM_EPS)
        keep = e.reshape(-1).float() != 0  # (rank,): singular values the budget kept
        if not bool(keep.any()):
            continue
        e_kept = e.reshape(-1).float()[keep]
        factors[(layer, module)] = (
            a.float()[keep] * e_kept.unsqueeze(1),  # (r', in)
            b.float()[:, keep].t() * scale,  # (r', out)
        )
    return as_lora.pack("ADALORA", config, factors, ctx.max_rank, ctx.dtype)


class AdaLora(Lora):
    """AdaLoRA: served, merged and installed exactly as LoRA once E and the scaling are folded in."""

    name = "adalora"
    peft_types = ("ADALORA",)
    hooks = frozenset({Hook.LINEAR_DELTA})

    def parse(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], ctx: ParseContext
    ) -> LoraWeights:
        return parse(config, tensors, ctx)

    def describe(self, config: dict[str, Any]) -> AdapterInfo:
        rank = config.get("init_r")
        return AdapterInfo(
            "ADALORA", rank=rank if isinstance(rank, int) else None, target_modules=target_list(config)
        )


METHOD = AdaLora()
