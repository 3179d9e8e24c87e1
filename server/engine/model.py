"""The decoder forward pass the engine runs, over our KV cache and one BatchContext per step.

It reuses the HF model's own modules (embeddings, norms, rotary embedding, linear layers,
which may be bitsandbytes-quantized) and only replaces the control flow: attention reads and
writes the engine's cache rows, and every linear layer and block output goes through the
step's adapter context, which knows each row's adapter slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from server.adapters.context import BatchContext
from server.base_model import ModelShape
from server.engine.kv_cache import KVCache


@dataclass
class StepInputs:
    """One forward pass over B cache rows holding T new tokens each (T = 1 when decoding)."""

    first_row: int
    """Cache row of batch row 0; the batch covers rows first_row .. first_row + B - 1."""

    positions: torch.Tensor
    """(B, T) position of every new token, which is also its index in the row's cache."""

    lengths: torch.Tensor
    """(B,) real tokens per row in this pass; the rest of the T are padding."""

    adapters: BatchContext
    """Which adapter slot every token uses."""


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, heads, head_dim); cos, sin: (B, T, head_dim)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin


def sdpa_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scale: float
) -> torch.Tensor:
    """q (B, heads, T, D); keys, values (B, kv_heads, L, D); visible (B, T, L) -> (B, heads, T, D)."""
    mask = visible.unsqueeze(1)  # (B, 1, T, L)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scale: float
) -> torch.Tensor:
    """sdpa_attention for one new token per row (T = 1), as two batched matmuls.

    CPU SDPA runs its flash kernel even for a single query: at batch 64 that is ~4x slower than
    this, and it was over half of a decode step.
    """
    batch, heads, _, dim = q.shape
    kv_heads, span = keys.shape[1], keys.shape[2]
    q = q.reshape(batch, kv_heads, heads // kv_heads, dim)  # query heads grouped by their kv head
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * scale  # (B, kv_heads, group, L)
    scores = scores.masked_fill(~visible.view(batch, 1, 1, span), float("-inf"))
    probs = scores.softmax(-1).to(values.dtype)
    return torch.matmul(probs, values).view(batch, heads, 1, dim)


class Decoder:
    """Runs an HF Llama-style causal LM's modules over the engine's cache."""

    def __init__(self, hf: PreTrainedModel, shape: ModelShape) -> None:
        inner = hf.model
        self.embed_tokens = inner.embed_tokens
        self.layers = inner.layers
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        self.lm_head = hf.lm_head
        self.shape = shape
        self.scale = shape.head_dim**-0.5

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, hidden)."""
        return self.embed_tokens(ids)

    @torch.inference_mode()
    def forward(self, embeds: torch.Tensor, step: StepInputs, cache: KVCache) -> torch.Tensor:
        """(B, T, hidden) input embeddings -> (B, vocab) float32 logits at each row's last real token."""
        batch, tokens, hidden = embeds.shape
        cos, sin = self.rotary(embeds, step.positions)
        # Key j is visible to a token at position p iff j <= p; padding never sits before a real token.
        key_span = int(step.positions.max()) + 1
        cache.prepare(step.first_row, batch, key_span)
        visible = torch.arange(key_span, device=embeds.device) <= step.positions.unsqueeze(-1)  # (B, T, L)
        rows = torch.arange(step.first_row, step.first_row + batch, device=embeds.device)
        write_rows = rows.unsqueeze(1).expand(batch, tokens)
        write_pos = step.positions.clamp(max=cache.max_len - 1)
        h = embeds.reshape(batch * tokens, hidden)
        for index, layer in enumerate(self.layers):
            keys, values = cache.layer(index)
            attn_in = layer.input_layernorm(h)
            attn_out = self._attention(
                index,
                layer,
                attn_in,
                step,
                cos,
                sin,
                visible,
                keys,
                values,
                write_rows,
                write_pos,
                key_span,
                (batch, tokens),
            )
            h = h + step.adapters.block_output(index, "attn", attn_out, h)
            mlp_in = layer.post_attention_layernorm(h)
            h = h + step.adapters.block_output(index, "mlp", self._mlp(index, layer.mlp, mlp_in, step), h)
        last = h.view(batch, tokens, hidden)[
            torch.arange(batch, device=h.device), step.lengths - 1
        ]  # (B, hidden)
        return self.lm_head(self.norm(last)).float()

    def _attention(
        self, index, layer, x, step, cos, sin, visible, keys, values, write_rows, write_pos, key_span, bt
    ) -> torch.Tensor:
        batch, tokens = bt
        shape, attn, ctx = self.shape, layer.self_attn, step.adapters
        q = ctx.linear(index, "q_proj", attn.q_proj, x).view(batch, tokens, shape.num_heads, shape.head_dim)
        k = ctx.linear(index, "k_proj", attn.k_proj, x).view(
            batch, tokens, shape.num_kv_heads, shape.head_dim
        )
        v = ctx.linear(index, "v_proj", attn.v_proj, x).view(
            batch, tokens, shape.num_kv_heads, shape.head_dim
        )
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys[write_rows, :, write_pos] = k  # (B, T, kv_heads, head_dim) into each row's positions
        values[write_rows, :, write_pos] = v
        rows = slice(step.first_row, step.first_row + batch)
        attention = decode_attention if tokens == 1 else sdpa_attention
        out = attention(
            q.transpose(1, 2),  # (B, heads, T, head_dim)
            keys[rows, :, :key_span],  # (B, kv_heads, L, head_dim)
            values[rows, :, :key_span],
            visible,
            self.scale,
        )
        out = out.transpose(1, 2).reshape(batch * tokens, shape.num_heads * shape.head_dim)
        return ctx.linear(index, "o_proj", attn.o_proj, out)

    def _mlp(self, index, mlp, x, step) -> torch.Tensor:
        ctx = step.adapters
        gate = ctx.linear(index, "gate_proj", mlp.gate_proj, x)
        up = ctx.linear(index, "up_proj", mlp.up_proj, x)
        return ctx.linear(index, "down_proj", mlp.down_proj, mlp.act_fn(gate) * up)
