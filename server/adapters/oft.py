"""OFT (PEFT `OFT`, peft >= 0.14 format): a block-diagonal orthogonal rotation of a linear's input.

PEFT's OFT layer computes y = W (R^T x) + bias, with R = blockdiag(R_1 .. R_k): x is cut into
k blocks of `oft_block_size`, and each block row-vector is multiplied by its R_i
(`x_block @ R_i`). Every R_i is the Cayley transform of a skew-symmetric matrix Q_i whose
upper triangle is the checkpoint's `oft_R.weight` row: exactly, (I - Q)(I + Q)^-1, or (the
default, `use_cayley_neumann`) the truncated Neumann series I + 2Q + 2Q^2 + ... + Q^(n-1)
PEFT uses. `block_share` keeps one block for all k; `coft` projects Q into an eps-ball first.
The rotations depend on the adapter only, so they are computed once at parse (float32) and
served through the `INPUT_ROTATION` hook: each row's input is rotated by its slot's blocks.
Merge folds them into the weight: W' = W blockdiag(R)^T.

BOFT (butterfly products of such rotations plus an output scale) is not served: see refused.py.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from server.adapters.common import (
    AdapterError,
    AdapterWeights,
    finite_number,
    is_targeted,
    layer_module,
    module_path,
    target_list,
)
from server.adapters.method import AdapterInfo, Hook, Method, ParseContext, Site

if TYPE_CHECKING:
    from server.adapters.slots import SlotTable

_TENSOR = re.compile(r"\.oft_R\.weight$")
_REFUSED = {
    "bias": ("none", "trained biases are not supported"),
    "fan_in_fan_out": (False, "fan_in_fan_out is for Conv1D models, not Llama-style linears"),
    "modules_to_save": (None, "modules_to_save is not supported with OFT"),
}
NEUMANN_SINCE = (0, 18)
"""PEFT changed the Cayley-Neumann series in 0.18.0; older checkpoints used another one."""


@dataclass
class OftSite:
    blocks: torch.Tensor  # (k, b, b): x_block @ blocks[i] for every block i of the input


@dataclass
class OftWeights(AdapterWeights):
    sites: dict[tuple[int, str], OftSite] = field(default_factory=dict)

    @property
    def target_modules(self) -> list[str]:
        return sorted({name for _, name in self.sites})

    def tensors(self) -> list[torch.Tensor]:
        return [site.blocks for site in self.sites.values()]


def skew(vec: torch.Tensor, block: int) -> torch.Tensor:
    """(m, b(b-1)/2) upper triangles -> (m, b, b) skew-symmetric matrices Q = U - U^T."""
    rows, cols = torch.triu_indices(block, block, 1)
    upper = torch.zeros(vec.shape[0], block, block, dtype=vec.dtype)
    upper[:, rows, cols] = vec
    return upper - upper.transpose(1, 2)


def coft_project(vec: torch.Tensor, block: int, eps: float) -> torch.Tensor:
    """PEFT's COFT projection: each Q with ||Q|| > eps / sqrt(m) is scaled back onto that sphere."""
    q = skew(vec, block)
    bound = eps / math.sqrt(q.shape[0])
    norm = q.norm(dim=(1, 2), keepdim=True)
    q = torch.where(norm <= bound, q, bound * q / norm)
    rows, cols = torch.triu_indices(block, block, 1)
    return q[:, rows, cols]


def cayley(vec: torch.Tensor, block: int, neumann_terms: int | None) -> torch.Tensor:
    """(m, b(b-1)/2) -> (m, b, b) rotations: PEFT's `_cayley_batch`, in float32."""
    q = skew(vec.float(), block)
    eye = torch.eye(block).expand_as(q)
    if neumann_terms is None:
        return torch.linalg.solve(eye + q, eye - q, left=False)  # (I - Q)(I + Q)^-1
    r = eye.clone()
    if neumann_terms > 1:
        r = r + 2 * q
        if neumann_terms > 2:
            power = q @ q
            r = r + 2 * power
            for _ in range(3, neumann_terms - 1):
                power = power @ q
                r = r + 2 * power
            r = r + power @ q
    return r


def _block_size(n_elements: int, name: str) -> int:
    block = round((1 + math.sqrt(1 + 8 * n_elements)) / 2)
    if block < 2 or block * (block - 1) // 2 != n_elements:
        raise AdapterError(f"tensor {name}: {n_elements} is not b(b-1)/2 for any block size b", name)
    return block


def _check_config(config: dict[str, Any]) -> int | None:
    """Check the options; the Neumann terms to use, or None for the exact Cayley transform."""
    for key, (allowed, why) in _REFUSED.items():
        value = config.get(key, allowed)
        if value not in (allowed, None) and value != []:
            raise AdapterError(f"OFT {key}={value!r}: {why}", key)
    if "oft_block_size" not in config:
        raise AdapterError(
            "this OFT checkpoint predates PEFT 0.14 (no oft_block_size); its weights use another "
            "parametrization: retrain it with PEFT >= 0.14",
            "oft_block_size",
        )
    if not config.get("use_cayley_neumann", False):
        return None
    version = str(config.get("peft_version") or "0.0.0").partition("@")[0]
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    if parts < NEUMANN_SINCE:
        raise AdapterError(
            f"use_cayley_neumann with peft_version {version}: PEFT changed that series in 0.18.0; "
            "retrain the adapter with PEFT >= 0.18",
            "use_cayley_neumann",
        )
    terms = config.get("num_cayley_neumann_terms", 5)
    if not isinstance(terms, int) or isinstance(terms, bool) or terms < 1:
        raise AdapterError(
            f"num_cayley_neumann_terms must be a positive integer, got {terms!r}", "num_cayley_neumann_terms"
        )
    return terms


def parse(config: dict[str, Any], tensors: dict[str, torch.Tensor], ctx: ParseContext) -> OftWeights:
    terms = _check_config(config)
    coft = bool(config.get("coft", False))
    eps = finite_number(config, "eps", 6e-5)
    share = bool(config.get("block_share", False))
    dims = ctx.shape.linear_dims()
    weights = OftWeights(peft_type="OFT", config=config)
    for name, tensor in sorted(tensors.items()):
        site = layer_module(name, ctx.shape.num_layers) if _TENSOR.search(name) else None
        if site is None:
            raise AdapterError(f"tensor {name} is not an OFT rotation of a decoder linear layer", name)
        layer, module = site
        if module not in dims:
            raise AdapterError(
                f"tensor {name} targets module {module!r}, which the base lacks; it has {', '.join(dims)}",
                name,
            )
        if not is_targeted(config, module_path(layer, module)):
            raise AdapterError(
                f"tensor {name} has weights but target_modules does not name it", "target_modules"
            )
        if tensor.dim() != 2:
            raise AdapterError(f"tensor {name} must be (blocks, b(b-1)/2), got {tuple(tensor.shape)}", name)
        in_features = dims[module][0]
        block = _block_size(tensor.shape[1], name)
        count = in_features // block
        if in_features % block or tensor.shape[0] != (1 if share else count):
            raise AdapterError(
                f"tensor {name} has shape {tuple(tensor.shape)}: blocks of {block} do not tile the "
                f"{in_features} inputs of {module} as ({1 if share else count}, {tensor.shape[1]})",
                name,
            )
        vec = tensor.float()
        if coft:
            vec = coft_project(vec, block, eps)
        blocks = cayley(vec, block, terms)  # (1 or k, b, b)
        weights.sites[site] = OftSite(blocks=blocks.expand(count, block, block).to(ctx.dtype, copy=True))
    if not weights.sites:
        raise AdapterError("adapter_model.safetensors holds no OFT rotations", "adapter_model.safetensors")
    return weights


def block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    """(k, b, b) -> (k b, k b)."""
    return torch.block_diag(*blocks.unbind(0))


class Oft(Method):
    """OFT: each row's input to a targeted linear is rotated by its adapter's block-diagonal R."""

    name = "oft"
    peft_types = ("OFT",)
    hooks = frozenset({Hook.INPUT_ROTATION})

    def parse(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], ctx: ParseContext
    ) -> OftWeights:
        return parse(config, tensors, ctx)

    def describe(self, config: dict[str, Any]) -> AdapterInfo:
        return AdapterInfo("OFT", target_modules=target_list(config))

    def install(self, slots: SlotTable, slot: int, weights: OftWeights) -> None:
        for site, w in weights.sites.items():
            slots.set_rotation(slot, Hook.INPUT_ROTATION, site, w.blocks)

    def fold(
        self, weights: OftWeights, site: Site, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        oft = weights.sites.get(site)
        if oft is None:
            return weight, bias
        return weight @ block_diagonal(oft.blocks.to(weight)).t(), bias


METHOD = Oft()
