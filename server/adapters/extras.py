"""What adapters change besides low-rank deltas: linear biases, norm weights, embedding rows, whole copies.

Several methods carry these parts: LoRA with `bias="all"`/`"lora_only"`, `lora_bias`,
`modules_to_save` or `trainable_token_indices`; BitFit (biases only), LN tuning (norm weights
only) and trainable tokens (embedding rows only). Each part is a plain tensor per site, and
each has its hook: OUTPUT_BIAS (y + b, the adapter's bias minus the base's), NORM_WEIGHT
(the adapter's norm weight, the base's for other rows), EMBEDDING and LOGITS (replaced rows
and whole copies of embed_tokens / lm_head, per slot). Parsing reads PEFT's tensor names
(prefix `base_model.model.` optional) and leaves the names it does not know to the method.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from server.adapters.common import AdapterError, AdapterWeights, expect_shape
from server.adapters.method import MODEL_LEVEL, EmbeddingEdit, HeadEdit, Hook, Method, ParseContext, Site

if TYPE_CHECKING:
    from server.adapters.slots import SlotTable

PEFT_PREFIX = "base_model.model."
_LINEAR_BIAS = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+?)(?:\.base_layer)?\.bias")
_LAYER_NORM = re.compile(r"model\.layers\.(\d+)\.(\w*norm)(\.ln_tuning_layers)?\.weight")
_FINAL_NORM = re.compile(r"model\.(norm)(\.ln_tuning_layers)?\.weight")
_COPIES = {"model.embed_tokens.weight": "embed_tokens", "lm_head.weight": "lm_head"}
_BASE_COPIES = ("model.embed_tokens.base_layer.weight", "lm_head.base_layer.weight")
"""PEFT saves the base's own embedding matrices beside embedding LoRA (save_embedding_layers)."""
_TOKEN_ROWS = (
    "model.embed_tokens.token_adapter.trainable_tokens_delta",  # LoRA's trainable_token_indices
    "model.embed_tokens.trainable_tokens_delta",  # TRAINABLE_TOKENS
)
_TIED_TOKEN_ROWS = "lm_head.trainable_tokens_delta"
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


def peft_name(name: str) -> str:
    """A tensor name without PEFT's `base_model.model.` prefix: the HF module path."""
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


def norm_param(site: Site) -> str:
    """The HF parameter name of a norm site's weight."""
    layer, name = site
    return f"model.{name}.weight" if layer == MODEL_LEVEL else f"model.layers.{layer}.{name}.weight"


def linear_param(site: Site, what: str = "bias") -> str:
    layer, name = site
    block = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"model.layers.{layer}.{block}.{name}.{what}"


@dataclass
class Extras:
    """The non-low-rank parts of one adapter, every float tensor in the server's dtype, owned."""

    biases: dict[Site, torch.Tensor] = field(default_factory=dict)
    """(out,) added to a linear's output: the adapter's bias minus the base's (or the whole bias)."""
    norms: dict[Site, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """(hidden,) the adapter's norm weight, and the base's (the table's rows for other slots)."""
    embed_copy: torch.Tensor | None = None  # (vocab, hidden)
    head_copy: torch.Tensor | None = None  # (vocab, hidden)
    token_rows: tuple[torch.Tensor, torch.Tensor] | None = None
    """(k,) int64 token ids, (k, hidden) their embeddings (trainable tokens)."""
    tied: bool = False
    """The base ties lm_head to the embeddings: trainable tokens replace lm_head's rows too (as PEFT does)."""
    embed_lora: tuple[torch.Tensor, torch.Tensor] | None = None
    """a (vocab, r), b (r, hidden) with the scaling folded in: embedding LoRA (set by lora.py)."""

    def __bool__(self) -> bool:
        return bool(self.biases or self.norms or self.has_embedding or self.has_head)

    @property
    def has_embedding(self) -> bool:
        return self.embed_copy is not None or self.token_rows is not None or self.embed_lora is not None

    @property
    def has_head(self) -> bool:
        return self.head_copy is not None or (self.token_rows is not None and self.tied)

    def tensors(self) -> list[torch.Tensor]:
        found = [*self.biases.values(), *(w for pair in self.norms.values() for w in pair)]
        found += [t for t in (self.embed_copy, self.head_copy) if t is not None]
        for pair in (self.token_rows, self.embed_lora):
            found += list(pair or ())
        return found

    def install(self, slots: SlotTable, slot: int) -> None:
        for site, bias in self.biases.items():
            slots.set_scale(slot, Hook.OUTPUT_BIAS, site, bias, default=torch.zeros(bias.shape[0]))
        for site, (weight, base) in self.norms.items():
            slots.set_scale(slot, Hook.NORM_WEIGHT, site, weight, default=base)
        rows = None
        if self.token_rows is not None:
            index, values = self.token_rows
            rows = (index.to(slots.device), slots.put(values))
        put = lambda t: None if t is None else slots.put(t)  # noqa: E731
        if self.has_embedding:
            lora = None if self.embed_lora is None else tuple(slots.put(t) for t in self.embed_lora)
            slots.set_data(slot, Hook.EMBEDDING, EmbeddingEdit(put(self.embed_copy), rows, lora))
        if self.has_head:
            slots.set_data(slot, Hook.LOGITS, HeadEdit(put(self.head_copy), rows if self.tied else None))

    def fold_linear(self, site: Site, bias: torch.Tensor | None) -> torch.Tensor | None:
        """A linear's float32 bias with the adapter's folded in (a new one where the base has none)."""
        added = self.biases.get(site)
        if added is None:
            return bias
        added = added.float().to(bias.device if bias is not None else added.device)
        return added if bias is None else bias + added

    def fold_params(self, base: Any) -> dict[str, torch.Tensor]:
        """Norm weights, embed_tokens and lm_head with the adapter folded in (float32, HF names)."""
        out = {norm_param(site): weight.float() for site, (weight, _) in self.norms.items()}
        if self.has_embedding:
            embed = base("model.embed_tokens.weight") if self.embed_copy is None else self.embed_copy.float()
            embed = embed.clone()
            if self.token_rows is not None:
                index, values = self.token_rows
                embed[index.to(embed.device)] = values.to(embed)
            if self.embed_lora is not None:
                a, b = self.embed_lora
                embed += a.to(embed) @ b.to(embed)
            out["model.embed_tokens.weight"] = embed
        if self.has_head:
            head = (base("lm_head.weight") if self.head_copy is None else self.head_copy.float()).clone()
            if self.token_rows is not None and self.tied:
                index, values = self.token_rows
                head[index.to(head.device)] = values.to(head)
            out["lm_head.weight"] = head
        return out


@dataclass
class ExtrasWeights(AdapterWeights):
    """An adapter made of extras only (BitFit, LN tuning, trainable tokens)."""

    extras: Extras = field(default_factory=Extras)

    def tensors(self) -> list[torch.Tensor]:
        return self.extras.tensors()

    def own(self, dtype: torch.dtype) -> None:
        """Nothing to do: parsing made every tensor a copy of its own, in `dtype`."""


class ExtrasMethod(Method):
    """A method whose adapters are extras only: install, fold and fold_params are the extras'."""

    def install(self, slots: SlotTable, slot: int, weights: ExtrasWeights) -> None:
        weights.extras.install(slots, slot)

    def fold(
        self, weights: ExtrasWeights, site: Site, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return weight, weights.extras.fold_linear(site, bias)

    def fold_params(self, weights: ExtrasWeights, base: Any) -> dict[str, torch.Tensor]:
        return weights.extras.fold_params(base)


def no_rest(rest: dict[str, torch.Tensor], what: str) -> None:
    """Refuse tensors a method does not know, naming the first."""
    if rest:
        name = sorted(rest)[0]
        raise AdapterError(f"unexpected tensor {name}: a {what} adapter does not hold it", name)


def _owned(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A copy of its own, on the host (where parsed adapters wait for a slot), in `dtype`."""
    return tensor.to("cpu", dtype, copy=True, memory_format=torch.contiguous_format)


def parse_extras(
    tensors: dict[str, torch.Tensor],
    ctx: ParseContext,
    *,
    biases: bool = False,
    norms: bool = False,
    copies: bool = False,
    token_indices: list[int] | None = None,
) -> tuple[Extras, dict[str, torch.Tensor]]:
    """The parts this adapter may carry (by the flags), and the tensors left for the method itself.

    biases: linear biases as PEFT saves them (`bias="all"`, `"lora_only"`; the value replaces the
    base's). norms: norm weights (modules_to_save, LN tuning). copies: whole embed_tokens /
    lm_head (modules_to_save, under --max-module-copy-bytes). token_indices: the trainable tokens'
    ids, whose rows the checkpoint holds.
    """
    shape, extras, rest = ctx.shape, Extras(tied=ctx.tied_embeddings), {}
    dims = shape.linear_dims()
    for name, tensor in tensors.items():
        path = peft_name(name)
        bias = _LINEAR_BIAS.fullmatch(path) if biases else None
        norm = (_LAYER_NORM.fullmatch(path) or _FINAL_NORM.fullmatch(path)) if norms else None
        if bias is not None:
            layer, module = int(bias.group(1)), bias.group(3)
            if layer >= shape.num_layers or module not in dims:
                raise AdapterError(f"tensor {name} is not the bias of a linear layer of the base", name)
            site = (layer, module)
            expect_shape(name, tensor, (dims[module][1],))
            base = _base_or_none(ctx, linear_param(site))
            if base is None:
                raise AdapterError(
                    f"tensor {name} is a trained bias, but the base's {linear_param(site)} does not exist; "
                    "was this adapter trained for another base model?",
                    name,
                )
            extras.biases[site] = _owned(tensor.float() - base.to(tensor.device), ctx.dtype)
        elif norm is not None:
            site = _norm_site(name, norm, shape.num_layers)
            expect_shape(name, tensor, (shape.hidden_size,))
            base = _base_or_none(ctx, norm_param(site))
            if base is None:
                raise AdapterError(f"tensor {name} is a norm weight the base lacks", name)
            extras.norms[site] = (_owned(tensor, ctx.dtype), _owned(base, ctx.dtype))
        elif copies and path in _COPIES:
            _check_copy(name, tensor, ctx)
            copy = _owned(tensor, ctx.dtype)
            if _COPIES[path] == "embed_tokens":
                extras.embed_copy = copy
            else:
                extras.head_copy = copy
        elif path in _BASE_COPIES:  # the base's own matrix, unchanged: the served base's is used
            expect_shape(name, tensor, (shape.vocab_size, shape.hidden_size))
        elif token_indices is not None and path in _TOKEN_ROWS:
            extras.token_rows = _token_rows(name, tensor, token_indices, ctx)
        elif token_indices is not None and path == _TIED_TOKEN_ROWS:
            expect_shape(name, tensor, (len(token_indices), shape.hidden_size))  # the tied copy of the rows
        else:
            rest[name] = tensor
    if token_indices is not None and extras.token_rows is None:
        raise AdapterError("trainable tokens are configured but no trainable_tokens_delta tensor is saved")
    return extras, rest


def _base_or_none(ctx: ParseContext, param: str) -> torch.Tensor | None:
    if ctx.base_tensor is None:
        raise AdapterError("this adapter needs the base's parameters to load; the loader gave none")
    try:
        return ctx.base_tensor(param)
    except AttributeError:
        return None


def _norm_site(name: str, match: re.Match[str], num_layers: int) -> Site:
    if match.re is _FINAL_NORM:
        return (MODEL_LEVEL, "norm")
    layer, module = int(match.group(1)), match.group(2)
    if layer >= num_layers or module not in LAYER_NORMS:
        raise AdapterError(f"tensor {name} is not a norm of a decoder layer of the base", name)
    return (layer, module)


def _check_copy(name: str, tensor: torch.Tensor, ctx: ParseContext) -> None:
    expect_shape(name, tensor, (ctx.shape.vocab_size, ctx.shape.hidden_size))
    size = tensor.numel() * ctx.dtype.itemsize
    if size > ctx.max_copy_bytes:
        raise AdapterError(
            f"tensor {name} is a whole copy of {peft_name(name).rsplit('.', 1)[0]} ({size} bytes in the "
            f"server's dtype, held per slot); --max-module-copy-bytes is {ctx.max_copy_bytes}: raise it "
            "to serve this adapter",
            "modules_to_save",
        )


def _token_rows(
    name: str, tensor: torch.Tensor, indices: list[int], ctx: ParseContext
) -> tuple[torch.Tensor, torch.Tensor]:
    expect_shape(name, tensor, (len(indices), ctx.shape.hidden_size))
    if max(indices) >= ctx.shape.vocab_size:
        raise AdapterError(f"trainable token {max(indices)} is past the vocabulary ({ctx.shape.vocab_size})")
    if len(set(indices)) != len(indices):
        raise AdapterError("trainable token indices repeat a token", "token_indices")
    return torch.tensor(indices, dtype=torch.int64), _owned(tensor, ctx.dtype)


def token_indices(value: Any, field: str) -> list[int]:
    """Checked trainable token ids (for the embedding): a list of non-negative integers."""
    if isinstance(value, dict):
        keys = set(value)
        if not keys <= {"embed_tokens", "model.embed_tokens"} or len(keys) != 1:
            raise AdapterError(f"{field} may name only embed_tokens, got {sorted(keys)}", field)
        value = next(iter(value.values()))
    if not isinstance(value, list) or not value or not all(type(i) is int and i >= 0 for i in value):
        raise AdapterError(f"{field} must be a non-empty list of token ids, got {value!r}", field)
    return value
