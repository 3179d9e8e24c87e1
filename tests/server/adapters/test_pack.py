"""The native pack kernel copies exactly what the torch reference copies, bit for bit."""

from __future__ import annotations

import pytest
import torch

from server.adapters import pack

DTYPES = [torch.float32, torch.bfloat16]


def sources(dtype: torch.dtype, gen: torch.Generator) -> list[torch.Tensor]:
    """(rows, cols) sources as adapters hand them: contiguous, transposed views, 1-D biases."""
    return [
        torch.randn(4, 40, generator=gen).to(dtype),
        torch.randn(24, 4, generator=gen).to(dtype).t(),  # B read from the file's (out, r)
        torch.randn(3, 9, generator=gen).to(dtype)[:, 2:7],  # rows with a stride, not transposed
        torch.randn(40, generator=gen).to(dtype),
    ]


@pytest.mark.parametrize("src_dtype", DTYPES)
@pytest.mark.parametrize("dst_dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_native_pack_equals_the_torch_copies(src_dtype, dst_dtype, scale):
    gen = torch.Generator().manual_seed(3)
    srcs = sources(src_dtype, gen)
    shapes = [(3, 6, 40), (3, 6, 24), (3, 4, 5), (3, 40)]
    tables = {name: [torch.zeros(s, dtype=dst_dtype) for s in shapes] for name in ("native", "torch")}
    scales = [1.0, scale, 1.0, scale]  # B and a bias scaled; A and the strided rows copied
    copies = {
        name: [pack.Copy(src, dst, 1, s) for src, dst, s in zip(srcs, dsts, scales, strict=True)]
        for name, dsts in tables.items()
    }
    pack.copy_all(copies["native"])
    pack.copy_torch(copies["torch"])
    assert pack._kernel() is not None  # the native kernel ran, not the fallback
    for native, reference, src in zip(tables["native"], tables["torch"], srcs, strict=True):
        assert torch.equal(native, reference)
        assert native[1].any() and not native[0].any() and not native[2].any()  # only row 1 written
        assert not native[1][src.shape[0] :].any()  # past the source's rows: untouched


def test_bfloat16_rounds_to_nearest_even_as_torch_does():
    # halfway cases between two bfloat16 values, and values just either side of them
    values = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -(1 + 2**-8), 3.0e38])
    native = torch.zeros(1, 5, dtype=torch.bfloat16)
    pack.copy_all([pack.Copy(values, native, 0)])
    assert torch.equal(native[0], values.to(torch.bfloat16))
