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
    """One rectangle of a forward pass: B sequences holding T new tokens each (T = 1 when decoding).

    A pass may hold several (new prompts and the running batch's next tokens): their tokens are
    laid one after another, row by row, and every linear layer runs once over all of them.
    """

    positions: torch.Tensor
    """(B, T) position of every new token in its sequence."""

    block_table: torch.Tensor
    """(B, blocks) cache blocks of each sequence, in order, padded with the null block."""

    slots: torch.Tensor
    """(B, T) flat cache slot (block * block_size + offset) each new token writes; padding: the null block."""

    span: int | None = None
    """max(positions) + 1, from the host, so attention reads no tensor value (None: it does, a sync)."""


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (..., heads, head_dim); cos, sin: (..., head_dim), the same leading dimensions."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
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

    @torch.inference_mode()
    def logits(self, h: torch.Tensor, adapters: BatchContext) -> torch.Tensor:
        """(N, hidden) last-layer states -> (N, vocab) float32 logits, each row under its adapter."""
        return adapters.logits(self.lm_head, adapters.norm(MODEL_LEVEL, "norm", self.norm, h)).float()

    @torch.inference_mode()
    def hidden(
        self, embeds: torch.Tensor, parts: list[StepInputs], adapters: BatchContext, cache: PagedKVCache
    ) -> torch.Tensor:
        """(N, hidden) input embeddings of every part's tokens, in order -> (N, hidden) last-layer
        states (before the final norm). `adapters` holds the slot of each of the N tokens."""
        positions = torch.cat([p.positions.reshape(-1) for p in parts])  # (N,)
        cos, sin = self.rotary(embeds, positions.unsqueeze(0))  # (1, N, head_dim)
        rope = (cos[0], sin[0])
        slots = torch.cat([p.slots.reshape(-1) for p in parts])  # (N,)
        h, ctx = embeds, adapters
        for index, layer in enumerate(self.layers):
            attn_in = ctx.norm(index, "input_layernorm", layer.input_layernorm, h)
            attn_out = self._attention(index, layer, attn_in, parts, ctx, rope, slots, cache)
            h = h + ctx.block_output(index, "attn", attn_out, h)
            mlp_in = ctx.norm(index, "post_attention_layernorm", layer.post_attention_layernorm, h)
            h = h + ctx.block_output(index, "mlp", self._mlp(index, layer.mlp, mlp_in, ctx), h)
        return h

    def _attention(self, index, layer, x, parts, ctx, rope, slots, cache) -> torch.Tensor:
        shape, attn = self.shape, layer.self_attn
        heads, kv_heads, dim = shape.num_heads, shape.num_kv_heads, shape.head_dim
        q = ctx.linear(index, "q_proj", attn.q_proj, x).view(-1, heads, dim)  # (N, heads, head_dim)
        k = ctx.linear(index, "k_proj", attn.k_proj, x).view(-1, kv_heads, dim)
        v = ctx.linear(index, "v_proj", attn.v_proj, x).view(-1, kv_heads, dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k_pool, v_pool = cache.layer(index)  # (blocks, block_size, kv_heads, head_dim)
        k_pool.view(-1, kv_heads, dim)[slots] = k
        v_pool.view(-1, kv_heads, dim)[slots] = v
        outs, start = [], 0
        for part in parts:
            batch, tokens = part.positions.shape
            attention = paged_decode_attention if tokens == 1 else paged_attention_reference
            out = attention(
                q[start : start + batch * tokens].view(batch, tokens, heads, dim).transpose(1, 2),
                k_pool,
                v_pool,
                part.block_table,
                part.positions,
                self.scale,
                span=part.span,
            )  # (B, heads, T, head_dim)
            outs.append(out.transpose(1, 2).reshape(batch * tokens, heads * dim))
            start += batch * tokens
        return ctx.linear(index, "o_proj", attn.o_proj, outs[0] if len(outs) == 1 else torch.cat(outs))

    def _mlp(self, index, mlp, x, ctx) -> torch.Tensor:
        gate = ctx.linear(index, "gate_proj", mlp.gate_proj, x)
        up = ctx.linear(index, "up_proj", mlp.up_proj, x)
        return ctx.linear(index, "down_proj", mlp.down_proj, mlp.act_fn(gate) * up)
