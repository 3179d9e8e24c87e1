"""The decoder forward pass the engine runs, over the paged KV cache and one BatchContext per step.

It reuses the HF model's own modules (embeddings, norms, rotary embedding, linear layers,
which may be bitsandbytes-quantized) and only replaces the control flow: attention writes each
new token's keys and values into its cache slot and reads a sequence's blocks through its block
table, and every linear layer and block output goes through the step's adapter context, which
knows each row's adapter slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from server.adapters.context import BatchContext
from server.adapters.method import MODEL_LEVEL
from server.base_model import ModelShape
from server.engine.attention import paged_attention_reference, paged_decode_attention
from server.engine.kv_cache import PagedKVCache


@dataclass
class StepInputs:
    """One forward pass over B sequences holding T new tokens each (T = 1 when decoding)."""

    positions: torch.Tensor
    """(B, T) position of every new token in its sequence."""

    lengths: torch.Tensor
    """(B,) real tokens per row in this pass; the rest of the T are padding."""

    block_table: torch.Tensor
    """(B, blocks) cache blocks of each sequence, in order, padded with the null block."""

    slots: torch.Tensor
    """(B, T) flat cache slot (block * block_size + offset) each new token writes; padding: the null block."""

    adapters: BatchContext
    """Which adapter slot every token uses."""

    span: int | None = None
    """max(positions) + 1, from the host, so attention reads no tensor value (None: it does, a sync)."""


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, heads, head_dim); cos, sin: (B, T, head_dim)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin


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

    def embed(self, ids: torch.Tensor, adapters: BatchContext) -> torch.Tensor:
        """(B, T) token ids -> (B, T, hidden), with each token's adapter's embedding edits."""
        return adapters.embed(self.embed_tokens, ids)

    def forward(self, embeds: torch.Tensor, step: StepInputs, cache: PagedKVCache) -> torch.Tensor:
        """(B, T, hidden) input embeddings -> (B, vocab) float32 logits at each row's last real token."""
        last = self.last(self.hidden(embeds, step, cache), step)
        return self.logits(last, step.adapters.last_tokens(embeds.shape[1]))

    @staticmethod
    def last(h: torch.Tensor, step: StepInputs) -> torch.Tensor:
        """(B, T, hidden) -> (B, hidden): each row's last real token."""
        return h[torch.arange(h.shape[0], device=h.device), step.lengths - 1]

    @torch.inference_mode()
    def logits(self, h: torch.Tensor, adapters: BatchContext) -> torch.Tensor:
        """(N, hidden) last-layer states -> (N, vocab) float32 logits, each row under its adapter."""
        return adapters.logits(self.lm_head, adapters.norm(MODEL_LEVEL, "norm", self.norm, h)).float()

    @torch.inference_mode()
    def hidden(self, embeds: torch.Tensor, step: StepInputs, cache: PagedKVCache) -> torch.Tensor:
        """(B, T, hidden) input embeddings -> (B, T, hidden) last-layer states (before the final norm)."""
        batch, tokens, hidden = embeds.shape
        cos, sin = self.rotary(embeds, step.positions)
        slots = step.slots.reshape(batch * tokens)
        h = embeds.reshape(batch * tokens, hidden)
        ctx = step.adapters
        for index, layer in enumerate(self.layers):
            attn_in = ctx.norm(index, "input_layernorm", layer.input_layernorm, h)
            attn_out = self._attention(index, layer, attn_in, step, cos, sin, slots, cache, (batch, tokens))
            h = h + ctx.block_output(index, "attn", attn_out, h)
            mlp_in = ctx.norm(index, "post_attention_layernorm", layer.post_attention_layernorm, h)
            h = h + ctx.block_output(index, "mlp", self._mlp(index, layer.mlp, mlp_in, step), h)
        return h.view(batch, tokens, hidden)

    def _attention(self, index, layer, x, step, cos, sin, slots, cache, bt) -> torch.Tensor:
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
        k_pool, v_pool = cache.layer(index)  # (blocks, block_size, kv_heads, head_dim)
        k_pool.view(-1, shape.num_kv_heads, shape.head_dim)[slots] = k.reshape(batch * tokens, *k.shape[2:])
        v_pool.view(-1, shape.num_kv_heads, shape.head_dim)[slots] = v.reshape(batch * tokens, *v.shape[2:])
        attention = paged_decode_attention if tokens == 1 else paged_attention_reference
        out = attention(
            q.transpose(1, 2),  # (B, heads, T, head_dim)
            k_pool,
            v_pool,
            step.block_table,
            step.positions,
            self.scale,
            span=step.span,
        )
        out = out.transpose(1, 2).reshape(batch * tokens, shape.num_heads * shape.head_dim)
        return ctx.linear(index, "o_proj", attn.o_proj, out)

    def _mlp(self, index, mlp, x, step) -> torch.Tensor:
        ctx = step.adapters
        gate = ctx.linear(index, "gate_proj", mlp.gate_proj, x)
        up = ctx.linear(index, "up_proj", mlp.up_proj, x)
        return ctx.linear(index, "down_proj", mlp.down_proj, mlp.act_fn(gate) * up)
