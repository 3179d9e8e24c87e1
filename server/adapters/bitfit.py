"""BitFit (our format, peftserve_formats.bitfit): an adapter of linear biases only.

Each saved bias replaces the base's; where the base has none it is added. Served through the
OUTPUT_BIAS hook as y + (b_adapter - b_base), per row; merging writes the biases (and switches
the merged config's attention_bias / mlp_bias on where the base had none).
"""

from __future__ import annotations

from typing import Any

import torch

from peftserve_formats import bitfit as fmt
from server.adapters.common import AdapterError, expect_shape
from server.adapters.extras import Extras, ExtrasMethod, ExtrasWeights, linear_param
from server.adapters.method import AdapterInfo, Hook, ParseContext


def _targets(config: dict[str, Any]) -> tuple[str, ...]:
    try:
        return fmt.check_config(config)
    except fmt.FormatError as exc:
        raise AdapterError(str(exc), exc.field) from exc


class BitFit(ExtrasMethod):
    """Per-adapter linear biases, added per row."""

    name = "bitfit"
    peft_types = (fmt.PEFT_TYPE,)
    hooks = frozenset({Hook.OUTPUT_BIAS})

    def parse(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], ctx: ParseContext
    ) -> ExtrasWeights:
        targets = _targets(config)
        dims = ctx.shape.linear_dims()
        expected = set(fmt.expected_names(targets, ctx.shape.num_layers))
        extras = Extras()
        for name, tensor in tensors.items():
            match = fmt.TENSOR.match(name)
            if name not in expected or match is None:
                raise AdapterError(f"unexpected tensor {name}: target_modules is {', '.join(targets)}", name)
            site = (int(match.group(1)), match.group(2))
            expect_shape(name, tensor, (dims[site[1]][1],))
            try:
                base = ctx.base_tensor(linear_param(site)) if ctx.base_tensor is not None else None
            except AttributeError:  # the base's linear has no bias: the adapter adds one
                base = None
            value = tensor.float() if base is None else tensor.float() - base.cpu()
            extras.biases[site] = value.to(ctx.dtype).contiguous()
        missing = sorted(expected - set(tensors))
        if missing:
            raise AdapterError(f"tensor {missing[0]} is missing", missing[0])
        return ExtrasWeights(peft_type=fmt.PEFT_TYPE, config=config, extras=extras)

    def describe(self, config: dict[str, Any]) -> AdapterInfo:
        return AdapterInfo(fmt.PEFT_TYPE, target_modules=tuple(sorted(_targets(config))))


METHOD = BitFit()
