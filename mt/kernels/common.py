"""What more than one kernel module of `mt.kernels` uses: the device check of the decoding
kernels' `supported` functions, the packed (value, index) key of the search kernels' picks, and
the tiled copy of an attention row into a search's history.

Only Triton helpers (`@triton.jit`, inlined into the kernels that call them) and plain Python
live here: nothing in this module is launched, so `precompile.KERNEL_MODULES` does not name it.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from torch import Tensor

EMPTY = tl.constexpr(-9223372036854775808)  # an int64 key below every real one: never picked
ROW_TILE = 128  # attention entries copied per tile (a runtime loop over S: no variant per source length)


def runs_here(t: Tensor) -> bool:
    """Whether a Triton kernel can take tensor `t`: on CUDA, or on CPU under the interpreter."""
    return t.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def sort_key(v, low):
    """The picks' int64 key: fp32 `v` in the high half as an int32 of the same order (negative
    floats: all bits but the sign flipped), `low` (a tie-break, larger first) in the low half."""
    bits = v.to(tl.int32, bitcast=True)
    return ((bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) << 32) | low.to(tl.int64)


@triton.jit
def key_value(key):
    """The fp32 value in `sort_key`'s high half."""
    hi = (key >> 32).to(tl.int32)
    return (hi ^ ((hi >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def copy_in_tiles(src_ptr, dst_ptr, S, write, BLOCK: tl.constexpr):
    """dst[0:S] = src[0:S] in dst's dtype, BLOCK entries a tile (an attention row: a runtime loop
    over S, so no compiled variant per source length; a while loop, as the interpreter cannot
    run a range() with a runtime bound). Nothing is stored where `write` is False."""
    s0 = 0
    while s0 < S:
        s = s0 + tl.arange(0, BLOCK)
        x = tl.load(src_ptr + s, mask=s < S, other=0.0)
        tl.store(dst_ptr + s, x.to(dst_ptr.dtype.element_ty), mask=(s < S) & write)
        s0 += BLOCK
