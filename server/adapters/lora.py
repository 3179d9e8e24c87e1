"""LoRA, rsLoRA and DoRA: `y += s * B(A x)` on chosen linear layers; DoRA rescales each output channel.

Also LoRA on `embed_tokens` (PEFT's lora_embedding_A/B: `e += s * B A[:, token]`, the EMBEDDING
hook) and on `lm_head` (a low-rank delta at site (MODEL_LEVEL, "lm_head")), and what a LoRA
checkpoint may carry besides (extras.py): trained base biases (`bias="all"`, `"lora_only"`),
lora_B biases (`lora_bias`, scaled like B), `modules_to_save` of norms, embed_tokens and lm_head,
and `trainable_token_indices`.

Parsed per site (layer, linear) into `a` (r, in) and `b` (r, out) with the scaling folded into
`b`, so the batched math is the shared low-rank apply. DoRA's factor m / ||W + s B A|| depends
on the adapter only, not on the input, so it is computed once at load time and applied per row
as an output scale: y = g * (W x + s B A x) + (1 - g) * bias.
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
    expect_shape,
    finite_number,
    is_targeted,
    layer_module,
    module_path,
    positive_int,
    target_list,
)
from server.adapters.extras import Extras, parse_extras, peft_name, token_indices
from server.adapters.method import MODEL_LEVEL, AdapterInfo, BaseWeight, Hook, Method, ParseContext, Site
from server.base_model import ModelShape

if TYPE_CHECKING:
    from server.adapters.slots import SlotTable

_TENSOR = re.compile(r"\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")
_NAME = re.compile(
    r"(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\."
    r"(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)"
)
_REFUSED = {
    "fan_in_fan_out": (False, "fan_in_fan_out is for Conv1D models, not Llama-style linears"),
}
_BIASES = ("none", "all", "lora_only")
_EMBED_LORA = {
    "model.embed_tokens.lora_embedding_A": "lora_A.weight",
    "model.embed_tokens.lora_embedding_B": "lora_B.weight",
}
_HEAD = re.compile(r"lm_head\.(lora_A\.weight|lora_B\.weight|lora_B\.bias)")
_LORA_B_BIAS = re.compile(r"\.lora_B\.bias$")
EMBED_SITE: Site = (MODEL_LEVEL, "embed_tokens")
"""Embedding LoRA is parsed as a linear vocab -> hidden: PEFT's A (r, vocab), B (hidden, r)."""
_MODEL_LEVEL_PATHS = {"embed_tokens": "model.embed_tokens", "lm_head": "lm_head"}
HEAD_SITE: Site = (MODEL_LEVEL, "lm_head")


@dataclass
class LoraSite:
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (r, out): B transposed; a strided view of the file until `own`
    b_scale: float = 1.0  # LoRA's scaling, still to apply to b (1 once `own` folded it in)
    dora_scale: torch.Tensor | None = None  # (out,) DoRA's m / ||W + s B A||


@dataclass
class LoraWeights(AdapterWeights):
    sites: dict[tuple[int, str], LoraSite] = field(default_factory=dict)
    """Decoder linears, lm_head (HEAD_SITE) and embed_tokens (EMBED_SITE, a (r, vocab), b (r, hidden))."""
    extras: Extras = field(default_factory=Extras)
    packed: bool = False
    """Every site already in one buffer of its own, scaling folded in (`own`, or as_lora.pack)."""

    @property
    def rank(self) -> int | None:
        return max((site.a.shape[0] for site in self.sites.values()), default=None)

    @property
    def target_modules(self) -> list[str]:
        return sorted({name for _, name in self.sites})

    @property
    def dora(self) -> bool:
        return any(site.dora_scale is not None for site in self.sites.values())

    def tensors(self) -> list[torch.Tensor]:
        lora = [t for s in self.sites.values() for t in (s.a, s.b, s.dora_scale) if t is not None]
        return lora + self.extras.tensors()

    def own(self, dtype: torch.dtype) -> None:
        """Pack every site's a, b (scaled) and DoRA scale, in `dtype`, into one buffer of its own.

        One allocation for the whole adapter; every site's tensors become views into it.
        """
        if self.packed and all(site.a.dtype == dtype for site in self.sites.values()):
            return
        sites = self.sites.values()
        total = sum(
            s.a.numel() + s.b.numel() + (0 if s.dora_scale is None else s.dora_scale.numel()) for s in sites
        )
        buffer = torch.empty(total, dtype=dtype)
        offset = 0
        for site in sites:
            (rank, in_features), out_features = site.a.shape, site.b.shape[1]
            a = buffer.as_strided((rank, in_features), (in_features, 1), offset)
            b = buffer.as_strided((rank, out_features), (out_features, 1), offset + rank * in_features)
            offset += rank * (in_features + out_features)
            a.copy_(site.a)
            # computed in float32 whatever the file's dtype, rounded once into `dtype`
            torch.mul(site.b if site.b.dtype == torch.float32 else site.b.float(), site.b_scale, out=b)
            site.a, site.b, site.b_scale = a, b, 1.0
            if site.dora_scale is not None:
                dora = buffer.as_strided((out_features,), (1,), offset)
                site.dora_scale = dora.copy_(site.dora_scale)
                offset += out_features
        self.packed = True


def _pattern_value(patterns: Any, field: str, module_path: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module path ending with it."""
    if not isinstance(patterns, dict):
        raise AdapterError(f"{field} must be an object of module pattern -> value", field)
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module_path):
                return value
        except re.error as exc:
            raise AdapterError(f"{field} key {key!r} is not a valid pattern: {exc}", field) from exc
    return default


def _site_of(name: str, num_layers: int) -> tuple[tuple[int, str], str]:
    """((layer, module), tensor kind) of a PEFT LoRA tensor name; raises AdapterError."""
    path = peft_name(name)
    if path in _EMBED_LORA:
        return EMBED_SITE, _EMBED_LORA[path]
    head = _HEAD.fullmatch(path)
    if head is not None:
        return HEAD_SITE, head.group(1)
    match = _NAME.fullmatch(name)  # PEFT's own naming, in one match; anything else the long way
    if match is not None and int(match.group(1)) < num_layers:
        return (int(match.group(1)), match.group(2)), match.group(3)
    kind = _TENSOR.search(name)
    site = layer_module(name, num_layers) if kind else None
    if kind is None or site is None:
        raise AdapterError(
            f"tensor {name} is not a LoRA weight of a decoder linear layer, embed_tokens or lm_head "
            "(modules_to_save may name only norms, embed_tokens and lm_head)",
            name,
        )
    return site, kind.group(1)


def _check_config(config: dict[str, Any]) -> None:
    for key, (allowed, why) in _REFUSED.items():
        if config.get(key, allowed) not in (allowed, None):
            raise AdapterError(f"{key}={config[key]!r}: {why}", key)
    if config.get("bias", "none") not in _BIASES:
        raise AdapterError(f"bias={config['bias']!r}: expected one of {', '.join(_BIASES)}", "bias")
    if config.get("lora_bias") and config.get("use_dora"):
        raise AdapterError("lora_bias with use_dora: PEFT does not train that combination", "lora_bias")
    if config.get("target_parameters"):
        raise AdapterError("target_parameters is not supported", "target_parameters")
    if config.get("r") is not None:
        positive_int(config, "r")


def _check_rank(config: dict[str, Any], path: str, rank: int) -> None:
    """The rank of the tensors must be the one adapter_config.json gives (r, or rank_pattern)."""
    declared = _pattern_value(config.get("rank_pattern") or {}, "rank_pattern", path, config.get("r"))
    if declared is None:
        return
    if not isinstance(declared, int) or isinstance(declared, bool) or declared < 1:
        raise AdapterError(f"rank_pattern gives {path} the rank {declared!r}; not a positive integer", "r")
    if declared != rank:
        raise AdapterError(f"{path} has rank {rank} but adapter_config.json says r={declared}", "r")


def parse(
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    shape: ModelShape,
    max_rank: int,
    base_weight: BaseWeight,
    dtype: torch.dtype = torch.float32,
    extras: Extras | None = None,
) -> LoraWeights:
    """Check the adapter against the base; its a and b stay views of `tensors`.

    `tensors` may be views of the file (`read_tensors`). Nothing is copied here: a slot reads
    each tensor once, straight into its rows, converted and (for B) scaled on the way, and
    `own` packs them into memory of the adapter's own for the CPU cache. Only DoRA's scale,
    which needs the base weight, is computed here, in `dtype`.
    """
    _check_config(config)
    extras = Extras() if extras is None else extras
    alpha = finite_number(config, "lora_alpha", 8.0)
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))
    dims = {
        **shape.linear_dims(),
        "lm_head": (shape.hidden_size, shape.vocab_size),
        "embed_tokens": (shape.vocab_size, shape.hidden_size),  # (A's columns, B's rows), as a linear
    }
    parts: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for name, tensor in tensors.items():
        if _LORA_B_BIAS.search(name) and not config.get("lora_bias"):
            raise AdapterError(f"tensor {name} is a lora_B bias but lora_bias is not set", name)
        site, kind = _site_of(peft_name(name).replace(".lora_B.bias", ".lora_B.weight"), shape.num_layers)
        if name.endswith(".lora_B.bias"):
            kind = "lora_B.bias"
        if site[1] not in dims:
            raise AdapterError(
                f"tensor {name} targets module {site[1]!r}, which the base lacks; it has {', '.join(dims)}",
                name,
            )
        parts.setdefault(site, {})[kind] = (name, tensor)
    if not parts and not extras:
        raise AdapterError("adapter_model.safetensors holds no LoRA weights", "adapter_model.safetensors")
    checked = []  # (site, a, b, scale, magnitude or None)
    biases: dict[Site, torch.Tensor] = {}  # lora_B biases, scaled
    for (layer, module), found in sorted(parts.items()):
        path = _MODEL_LEVEL_PATHS[module] if layer == MODEL_LEVEL else module_path(layer, module)
        if "lora_A.weight" not in found or "lora_B.weight" not in found:
            raise AdapterError(f"{path} needs both lora_A and lora_B weights", path)
        (a_name, a), (b_name, b) = found["lora_A.weight"], found["lora_B.weight"]
        rank = a.shape[0] if a.shape else 0
        if rank < 1:
            raise AdapterError(f"{path} has rank 0", "r")
        if rank > max_rank:
            raise AdapterError(f"{path} has rank {rank}, above --max-lora-rank {max_rank}", "r")
        _check_rank(config, path, rank)
        if not is_targeted(config, path):
            raise AdapterError(f"{path} has weights but target_modules does not name it", "target_modules")
        in_features, out_features = dims[module]
        expect_shape(a_name, a, (rank, in_features))
        expect_shape(b_name, b, (out_features, rank))
        module_alpha = _pattern_value(alpha_pattern, "alpha_pattern", path, alpha)
        if isinstance(module_alpha, bool) or not isinstance(module_alpha, int | float):
            raise AdapterError(f"alpha_pattern gives {path} the value {module_alpha!r}", "alpha_pattern")
        module_alpha = float(module_alpha)
        scale = module_alpha / (math.sqrt(rank) if rslora else rank)
        magnitude = None
        if "lora_magnitude_vector" in found:
            m_name, magnitude = found["lora_magnitude_vector"]
            expect_shape(m_name, magnitude, (out_features,))
        elif config.get("use_dora"):
            raise AdapterError(f"use_dora is set but {path} has no lora_magnitude_vector", path)
        if magnitude is not None and layer == MODEL_LEVEL:
            raise AdapterError(f"DoRA on {module} is not supported; only on decoder linears", path)
        if "lora_B.bias" in found:
            bias_name, lora_bias = found["lora_B.bias"]
            expect_shape(bias_name, lora_bias, (out_features,))
            biases[(layer, module)] = lora_bias.float() * scale
        checked.append(((layer, module), a, b, scale, magnitude))
    weights = LoraWeights(peft_type="LORA", config=config, extras=extras)
    for site, bias in biases.items():
        before = extras.biases.get(site)
        extras.biases[site] = (bias if before is None else before.float() + bias).to(dtype)
    for (layer, module), a, b, scale, magnitude in checked:
        site = LoraSite(a=a, b=b.t(), b_scale=scale)  # views of the file: `own` or a slot copies them
        if magnitude is not None:
            base = base_weight(layer, module)  # on the base's device: compute there, keep the result here
            f32 = dict(device=base.device, dtype=torch.float32)
            exact = LoraSite(a=a.to(**f32), b=(b.to(**f32) * scale).t().contiguous())
            site.dora_scale = dora_scale(base, exact, magnitude.to(**f32)).to(device="cpu", dtype=dtype)
        weights.sites[(layer, module)] = site
    embed = weights.sites.pop(EMBED_SITE, None)
    if embed is not None:
        if extras.token_rows is not None:
            raise AdapterError(
                "LoRA on embed_tokens together with trainable_token_indices is not supported",
                "trainable_token_indices",
            )
        # (vocab, r), (r, hidden), gathered per token; extras are owned copies in `dtype`
        extras.embed_lora = (embed.a.to(dtype, copy=True).t(), (embed.b.float() * embed.b_scale).to(dtype))
    return weights


def dora_scale(weight: torch.Tensor, site: LoraSite, magnitude: torch.Tensor) -> torch.Tensor:
    """m / ||W + s B A|| per output channel; weight (out, in) float32."""
    merged = weight + site.b.t() @ site.a  # (out, in); b already carries s
    return magnitude / merged.norm(dim=1)


class Lora(Method):
    """LoRA, rsLoRA, DoRA: a stacked low-rank delta per linear; DoRA adds a per-channel rescale."""

    name = "lora"
    peft_types = ("LORA",)
    hooks = frozenset(
        {Hook.EMBEDDING, Hook.LINEAR_DELTA, Hook.OUTPUT_RESCALE, Hook.OUTPUT_BIAS}
        | {Hook.NORM_WEIGHT, Hook.LOGITS}
    )

    def parse(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], ctx: ParseContext
    ) -> LoraWeights:
        _check_config(config)
        saved = config.get("modules_to_save") or []
        tokens = config.get("trainable_token_indices")
        extras, rest = parse_extras(
            tensors,
            ctx,
            biases=config.get("bias", "none") != "none",
            norms=bool(saved),
            copies=bool(saved),
            token_indices=None if tokens is None else token_indices(tokens, "trainable_token_indices"),
        )
        return parse(config, rest, ctx.shape, ctx.max_rank, ctx.base_weight, ctx.dtype, extras)

    def describe(self, config: dict[str, Any]) -> AdapterInfo:
        rank = config.get("r")
        return AdapterInfo(
            "LORA", rank=rank if isinstance(rank, int) else None, target_modules=target_list(config)
        )

    def install(self, slots: SlotTable, slot: int, weights: LoraWeights) -> None:
        shape = slots.shape
        dims = {**shape.linear_dims(), "lm_head": (shape.hidden_size, shape.vocab_size)}
        for site, w in weights.sites.items():
            slots.set_lowrank(slot, Hook.LINEAR_DELTA, site, dims[site[1]], w.a, w.b, b_scale=w.b_scale)
            if w.dora_scale is not None:
                slots.set_scale(slot, Hook.OUTPUT_RESCALE, site, w.dora_scale)
        weights.extras.install(slots, slot)

    def fold(
        self, weights: LoraWeights, site: Site, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = weights.extras.fold_linear(site, bias)
        lora = weights.sites.get(site)
        if lora is None:
            return weight, bias
        weight = weight + (lora.b.to(weight) * lora.b_scale).t() @ lora.a.to(weight)
        if lora.dora_scale is not None:
            weight = lora.dora_scale.to(weight).unsqueeze(1) * weight  # DoRA rescales rows, not the bias
        return weight, bias

    def fold_params(self, weights: LoraWeights, base: Any) -> dict[str, torch.Tensor]:
        params = weights.extras.fold_params(base)
        head = weights.sites.get(HEAD_SITE)
        if head is not None:
            weight = params.get("lm_head.weight", base("lm_head.weight"))
            params["lm_head.weight"] = weight + (head.b.to(weight) * head.b_scale).t() @ head.a.to(weight)
        return params


METHOD = Lora()
