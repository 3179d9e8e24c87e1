"""Copy many matrices into slot rows in one native call: an install costs no Python per tensor.

Installing an adapter copies hundreds of small matrices into its slot's rows (a LoRA on every
linear of a 30-layer model: 420), B read transposed and scaled, straight from the file's
mapping. Per tensor, torch's copy and multiply cost more in dispatch and in strided loops over
small matrices than the bytes they move; pack_kernel.c does the whole list in one call.
`copy_torch` is the reference beside it, and the path off the CPU or wherever the kernel
cannot be built.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path
from typing import Any, NamedTuple

import torch

from server.adapters import lowrank  # its kernel builder; lowrank imports this module back

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("pack_kernel.c")
_KINDS = {torch.float32: 0, torch.bfloat16: 1}


class Copy(NamedTuple):
    """dst[index][:rows] = src * scale, computed in float32 and rounded once into dst's dtype."""

    src: torch.Tensor
    """(rows, cols), any strides (B is a transposed view of the file's (cols, rows))."""
    dst: torch.Tensor
    """A stacked table, (stacks, max_rows, cols) or (stacks, max_rows), on any device."""
    index: int
    scale: float = 1.0


def copy_torch(copies: list[Copy]) -> None:
    """The reference: one torch copy (or multiply) per matrix."""
    for c in copies:
        dst = c.dst[c.index][: c.src.shape[0]]
        if c.scale == 1.0:
            dst.copy_(c.src)  # converts, and moves from the CPU's file to the table's device
        elif c.src.device == dst.device:
            torch.mul(c.src if c.src.dtype == torch.float32 else c.src.float(), c.scale, out=dst)
        else:
            dst.copy_(c.src.to(device=dst.device, dtype=torch.float32) * c.scale)


def copy_all(copies: list[Copy]) -> None:
    """Every copy, through the native kernel when all of them are CPU float32/bfloat16 tensors."""
    if not copies:
        return
    kernel = _kernel() if all(_native(c) for c in copies) else None
    if kernel is None:
        copy_torch(copies)
        return
    meta: list[int] = []
    for src, dst, index, _ in copies:
        rows, cols = (src.shape[0], src.shape[1]) if src.dim() == 2 else (1, src.shape[0])
        s0, s1 = (src.stride(0), src.stride(1)) if src.dim() == 2 else (0, src.stride(0))
        row = dst.data_ptr() + index * dst.stride(0) * dst.element_size()
        meta += (src.data_ptr(), row, rows, cols, s0, s1, _KINDS[src.dtype] | _KINDS[dst.dtype] << 8)
    packed = (ctypes.c_int64 * len(meta))(*meta)
    scales = (ctypes.c_double * len(copies))(*(c.scale for c in copies))
    if kernel[1](len(copies), packed, scales) != 0:
        raise ValueError("the pack kernel rejected its arguments")


def prepare_for(device: torch.device) -> None:
    """Build and load the kernel now if installs on this device will use it."""
    if device.type == "cpu":
        _kernel()


def _native(c: Copy) -> bool:
    return (
        c.src.is_cpu
        and c.dst.is_cpu
        and c.src.dtype in _KINDS
        and c.dst.dtype in _KINDS
        and c.dst.is_contiguous()
        and c.src.dim() in (1, 2)
    )


@functools.cache
def _kernel() -> tuple[ctypes.CDLL, Any] | None:
    """The compiled pack_kernel.c (built once per machine) and its function, or None with a warning."""
    try:
        path = lowrank.build_kernel(lowrank.CFLAGS, _SOURCE)
        argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
        return lowrank.load_kernel_function(path, "peftserve_pack", argtypes)
    except lowrank.KernelBuildError as e:
        log.warning("adapter installs use torch copies: %s", e)
        return None
