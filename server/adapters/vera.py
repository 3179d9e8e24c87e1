"""VeRA (PEFT `VERA`): frozen random projections shared by every layer, trained per-layer vectors.

y += lambda_b * (B[:out, :r] (lambda_d * (A[:r, :in] x))), with one shared A (r, max_in) and
B (max_out, r) per adapter. Served as LoRA: a = diag(lambda_d) A[:, :in], b = (diag(lambda_b)
B[:out])^T, computed once at parse. The projections come from the checkpoint when PEFT saved
them (`save_projection`, the default); otherwise they are regenerated exactly as PEFT does,
from `projection_prng_key` (torch's CPU generator, Kaiming-uniform, A then B). VeRA ranks are
often 256: a rank above --max-lora-rank is refused, naming the flag.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from server.adapters import as_lora
from server.adapters.common import AdapterError, expect_shape, module_path, positive_int, target_list
from server.adapters.lora import Lora, LoraWeights
from server.adapters.method import AdapterInfo, Hook, ParseContext

_SUFFIX = re.compile(r"\.(vera_lambda_b|vera_lambda_d)$")
_PROJECTIONS = re.compile(r"(?:^|\.)(vera_A|vera_B)$")


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's `_kaiming_init`: uniform in +-sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1]."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    with torch.no_grad():
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def regenerate_projections(
    key: int, rank: int, max_in: int, max_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's vera_A (rank, max_in) and vera_B (max_out, rank) for `projection_prng_key`."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    return kaiming_uniform((rank, max_in), generator), kaiming_uniform((max_out, rank), generator)


def _projections(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], rank: int, max_in: int, max_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    found = {m.group(1): (name, t) for name, t in tensors.items() if (m := _PROJECTIONS.search(name))}
    if found:
        if set(found) != {"vera_A", "vera_B"}:
            raise AdapterError(
                "a VERA checkpoint with saved projections needs both vera_A and vera_B", "vera_A"
            )
        (a_name, a), (b_name, b) = found["vera_A"], found["vera_B"]
        if a.dim() != 2 or a.shape[0] != rank or a.shape[1] < max_in:
            raise AdapterError(
                f"tensor {a_name} has shape {tuple(a.shape)}; needs ({rank}, >= {max_in})", a_name
            )
        if b.dim() != 2 or b.shape[1] != rank or b.shape[0] < max_out:
            raise AdapterError(
                f"tensor {b_name} has shape {tuple(b.shape)}; needs (>= {max_out}, {rank})", b_name
            )
        return a.float(), b.float()
    key = config.get("projection_prng_key")
    if not isinstance(key, int) or isinstance(key, bool):
        raise AdapterError(
            "this VERA checkpoint has no vera_A/vera_B projections (save_projection=false) and no integer "
            "projection_prng_key to regenerate them from; save it with save_projection=True",
            "projection_prng_key",
        )
    return regenerate_projections(key, rank, max_in, max_out)


def parse(config: dict[str, Any], tensors: dict[str, torch.Tensor], ctx: ParseContext) -> LoraWeights:
    as_lora.check_options(config, "VERA")
    rank = positive_int(config, "r")
    if rank > ctx.max_rank:
        raise AdapterError(
            f"VERA rank r={rank} is above --max-lora-rank {ctx.max_rank}; start the server with "
            f"--max-lora-rank {rank} or more to serve it",
            "r",
        )
    dims = ctx.shape.linear_dims()
    vectors = {name: t for name, t in tensors.items() if not _PROJECTIONS.search(name)}
    sites = as_lora.group_by_site(config, vectors, ctx.shape, _SUFFIX, "VERA")
    if not sites:
        raise AdapterError("adapter_model.safetensors holds no VERA vectors", "adapter_model.safetensors")
    max_in = max(dims[module][0] for _, module in sites)
    max_out = max(dims[module][1] for _, module in sites)
    shared_a, shared_b = _projections(config, tensors, rank, max_in, max_out)  # (r, >=in), (>=out, r)
    factors = {}
    for (layer, module), found in sorted(sites.items()):
        path = module_path(layer, module)
        if set(found) != {"vera_lambda_b", "vera_lambda_d"}:
            raise AdapterError(f"{path} needs both vera_lambda_b and vera_lambda_d", path)
        (b_name, lambda_b), (d_name, lambda_d) = found["vera_lambda_b"], found["vera_lambda_d"]
        in_features, out_features = dims[module]
        expect_shape(b_name, lambda_b, (out_features,))
        expect_shape(d_name, lambda_d, (rank,))
        factors[(layer, module)] = (
            lambda_d.float().unsqueeze(1) * shared_a[:, :in_features],  # (r, in)
            (lambda_b.float().unsqueeze(1) * shared_b[:out_features]).t(),  # (r, out)
        )
    return as_lora.pack("VERA", config, factors, ctx.max_rank, ctx.dtype)


class Vera(Lora):
    """VeRA: served, merged and installed exactly as LoRA once the vectors scale the projections."""

    name = "vera"
    peft_types = ("VERA",)
    hooks = frozenset({Hook.LINEAR_DELTA})

    def parse(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], ctx: ParseContext
    ) -> LoraWeights:
        return parse(config, tensors, ctx)

    def describe(self, config: dict[str, Any]) -> AdapterInfo:
        rank = config.get("r")
        return AdapterInfo(
            "VERA", rank=rank if isinstance(rank, int) else None, target_modules=target_list(config)
        )


METHOD = Vera()
