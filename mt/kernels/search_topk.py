"""A decoding step's log-softmax and top-k in one Triton kernel (the search half of `mt.kernels`).

    log_softmax_topk(logits, k, row_bias=None, banned=None) -> (values (N, k) fp32, indices (N, k) int64)

Row r's values are the k largest of  row_bias[r] + log_softmax(logits[r].float())  with the
`banned` columns at -inf (they still count in the softmax's normaliser), best first; among equal
values the lower column comes first. `reference.log_softmax_topk` is the same function in plain
PyTorch (the test oracle).

Why: a beam-5 search step over 128 sentences (V = 8000) spent about 150 of its 430 us of kernel
time in PyTorch's log_softmax, the add of the beam scores, and `topk` over (n, K * V), whose
radix select is several launches (scripts/profile_decode.py, H200, 2026-11-27). mt.search calls
this instead when the model runs our Triton gate cell (model.cell=triton, or auto on CUDA): one
launch, each program one row, the whole row in registers; then a small topk picks each
sentence's 2K best of its K * min(2K, V) per-beam candidates (the 2K best of a sentence are
among them). Rows wider than MAX_V and k above MAX_K take the reference path.

`_log_softmax_topk_kernel`: one program per row. Loads the row (BLOCK_V = V rounded up to a power
of two, at most MAX_V), takes its max and log-sum-exp in fp32, adds the row's bias, sets banned
columns to -inf, then k times: the best value not taken yet and the lowest column holding it,
both from one max-reduction over (value, column) packed into an int64. A row of -inf (a beam
that does not exist yet) still yields k columns, with value -inf.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_V = 8192  # a row lives in registers (16 warps: 16 columns a thread); larger vocabularies: PyTorch's ops
MAX_K = 64  # the picks are unrolled (one reduction each): beams up to 32 (2K per row)


@triton.jit(do_not_specialize=["N"])
def _log_softmax_topk_kernel(
    logits_ptr,  # (N, V) any float dtype
    bias_ptr,  # (N,) fp32 (read only if HAS_BIAS)
    banned_ptr,  # (NB,) int64
    val_ptr,  # (N, K) fp32 out
    idx_ptr,  # (N, K) int64 out
    N,
    V,
    stride_row,
    NB: tl.constexpr,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_V)  # (BLOCK_V,)
    valid = cols < V
    x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
    m = tl.max(x, axis=0)
    lse = m + tl.log(tl.sum(tl.where(valid, tl.exp(x - m), 0.0), axis=0))
    v = x - lse
    if HAS_BIAS:
        v = v + tl.load(bias_ptr + row)
    for j in tl.static_range(NB):
        v = tl.where(cols == tl.load(banned_ptr + j), float("-inf"), v)
    # One reduction per pick: value and column packed in one int64 key, the value's float bits
    # mapped to an int32 of the same order (negative floats: all bits but the sign flipped) in
    # the high half, BLOCK_V - 1 - column in the low half (equal values: the lower column wins).
    bits = v.to(tl.int32, bitcast=True)
    key = ((bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) << 32) | (BLOCK_V - 1 - cols).to(tl.int64)
    key = tl.where(valid, key, -9223372036854775808)  # padding columns: never picked
    for j in tl.static_range(K):
        best = tl.max(key, axis=0)
        col = BLOCK_V - 1 - (best & 0xFFFFFFFF).to(tl.int32)
        hi = (best >> 32).to(tl.int32)
        tl.store(val_ptr + row * K + j, (hi ^ ((hi >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True))
        tl.store(idx_ptr + row * K + j, col.to(tl.int64))
        key = tl.where(cols == col, -9223372036854775808, key)

def _runs_here(t: Tensor) -> bool:
    return t.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def supported(logits: Tensor, k: int) -> bool:
    """Whether the kernel takes this call (else use `reference.log_softmax_topk`)."""
    N, V = logits.shape
    return (_runs_here(logits) and 1 <= k <= min(V, MAX_K) and V <= MAX_V
            and logits.dtype in (torch.float32, torch.bfloat16, torch.float16))


def log_softmax_topk(logits: Tensor, k: int, row_bias: Tensor | None = None,
                     banned: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """See the module docstring. logits (N, V), row_bias (N,) or None, banned (NB,) int64 or None."""
    N, V = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    vals = torch.empty(N, k, device=logits.device, dtype=torch.float32)
    # zeros, not empty: mt.precompile's dry run skips the launch, and the search then indexes
    # embeddings with these columns (one memset node in a graphed step)
    idx = torch.zeros(N, k, device=logits.device, dtype=torch.int64)
    if N == 0:
        return vals, idx
    bias = row_bias.float().contiguous() if row_bias is not None else vals
    ban = banned if banned is not None and banned.numel() else idx  # a dummy pointer when NB = 0
    block = triton.next_power_of_2(V)
    _log_softmax_topk_kernel[(N,)](
        logits, bias, ban, vals, idx, N, V, logits.stride(0),
        NB=0 if banned is None else banned.numel(), K=k, HAS_BIAS=row_bias is not None, BLOCK_V=block,
        num_warps=4 if block <= 1024 else (8 if block <= 2048 else 16),
    )
    return vals, idx
