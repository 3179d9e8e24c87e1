"""The transformers behaviour our decoder relies on, pinned one module at a time.

`server.engine.model.Decoder` reuses the HF model's modules (embeddings, rotary embedding, norms,
projections, activation, head) but not its forward. If a transformers release changes one of them,
these tests name the module and the version, instead of failing as a token mismatch elsewhere.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from server.engine.model import apply_rope

VERSION = f"transformers {transformers.__version__}"


@pytest.fixture(params=["tiny_model", pytest.param("default_model", marks=pytest.mark.slow)])
def model(request):
    return request.getfixturevalue(request.param)


def rope_theta(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    assert parameters.get("rope_type", "default") == "default", f"{VERSION}: unexpected rope type"
    return parameters.get("rope_theta", getattr(config, "rope_theta", None))


def test_the_modules_the_decoder_reads_exist(model):
    inner = model.hf.model
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        assert hasattr(inner, name), f"{VERSION}: the decoder reads model.{name}, which is gone"
    layer = inner.layers[0]
    for path in (
        "input_layernorm",
        "post_attention_layernorm",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
        "mlp.act_fn",
    ):
        try:
            layer.get_submodule(path)
        except AttributeError:
            pytest.fail(f"{VERSION}: the decoder reads layers[i].{path}, which is gone")
    extra = {n for n, _ in layer.self_attn.named_children()} - {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert not extra, f"{VERSION}: attention gained modules the decoder would skip: {sorted(extra)}"


def test_rotary_embedding_is_the_default_rope(model):
    shape, config = model.shape, model.hf.config
    x = torch.zeros(2, 5, shape.hidden_size, dtype=model.dtype)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    cos, sin = model.hf.model.rotary_emb(x, positions)
    assert cos.shape == sin.shape == (2, 5, shape.head_dim), f"{VERSION}: rotary output shape changed"
    dim = shape.head_dim
    inv_freq = 1.0 / rope_theta(config) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = positions.unsqueeze(-1).float() * inv_freq  # (B, T, dim / 2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, dim): halves, as rotate_half expects
    tolerance = dict(atol=1e-5, rtol=1e-5) if model.dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(cos.float(), angles.cos(), **tolerance, msg=f"{VERSION}: rotary cos changed")
    torch.testing.assert_close(sin.float(), angles.sin(), **tolerance, msg=f"{VERSION}: rotary sin changed")


def test_rope_rotates_query_pairs_by_halves(model):
    """apply_rope pairs dimension i with i + head_dim/2 (HF's rotate_half layout), not adjacent pairs."""
    dim = model.shape.head_dim
    x = torch.zeros(1, 1, 1, dim)
    x[..., 0] = 1.0
    cos, sin = model.hf.model.rotary_emb(x.view(1, 1, dim).to(model.dtype), torch.tensor([[3]]))
    rotated = apply_rope(x, cos.float(), sin.float())
    assert rotated[..., dim // 2].abs().item() > 0.1, f"{VERSION}: rope no longer rotates i with i + d/2"


def test_norms_are_rms_norms(model):
    torch.manual_seed(0)
    x = torch.randn(3, model.shape.hidden_size).to(model.dtype)
    for name, norm in (
        ("input_layernorm", model.hf.model.layers[0].input_layernorm),
        ("post_attention_layernorm", model.hf.model.layers[0].post_attention_layernorm),
        ("norm", model.hf.model.norm),
    ):
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        assert eps is not None, f"{VERSION}: {name} has no epsilon attribute"
        xf = x.float()
        expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(model.dtype) * norm.weight
        torch.testing.assert_close(norm(x), expected, msg=f"{VERSION}: {name} is no longer an RMS norm")


def test_mlp_activation_is_silu(model):
    x = torch.linspace(-4, 4, 17)
    act = model.hf.model.layers[0].mlp.act_fn
    torch.testing.assert_close(act(x), F.silu(x), msg=f"{VERSION}: the MLP activation changed")


def test_projection_shapes(model):
    shape, attn = model.shape, model.hf.model.layers[0].self_attn
    x = torch.zeros(1, shape.hidden_size, dtype=model.dtype)
    assert attn.q_proj(x).shape[-1] == shape.num_heads * shape.head_dim, f"{VERSION}: q_proj shape"
    assert attn.k_proj(x).shape[-1] == shape.num_kv_heads * shape.head_dim, f"{VERSION}: k_proj shape"
    assert attn.v_proj(x).shape[-1] == shape.num_kv_heads * shape.head_dim, f"{VERSION}: v_proj shape"
    if hasattr(attn, "scaling"):
        assert attn.scaling == pytest.approx(shape.head_dim**-0.5), f"{VERSION}: attention scale changed"
