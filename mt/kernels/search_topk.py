"""A decoding step's log-softmax and top-k in fused Triton kernels (the search half of `mt.kernels`).

    log_softmax_topk(logits, k, row_bias=None, banned=None) -> (values (N, k) fp32, indices (N, k) int64)

Row r's values are the k largest of  row_bias[r] + log_softmax(logits[r].float())  with the
`banned` columns at -inf (they still count in the softmax's normaliser), best first; among equal
values the lower column comes first. `reference.log_softmax_topk` is the same function in plain
PyTorch (the test oracle).

Why: in a beam-5 search step over V = 8000, PyTorch's log_softmax, the add of the beam scores,
and `topk` over (n, K * V), whose radix select is several launches, took a large share of the
step's kernel time (benchmarks/profile_decode.py; numbers in docs/benchmarks.md). mt.search calls
this instead when the model runs our Triton gate cell (model.cell=triton, or auto on CUDA); beam
search's bookkeeping then takes each beam's 2K best (`search_beam.py`). k above MAX_K, and
rows so wide that their chunks' candidates exceed MAX_CANDIDATES, take the reference path.

Rows up to ROW_V columns, `_log_softmax_topk_kernel`: one program per row. Loads the row,
takes its max and log-sum-exp in fp32, adds the row's bias, sets banned columns to -inf, then k
times: the best value not taken yet and the lowest column holding it, both from one
max-reduction over (value, column) packed into an int64.

Wider rows, two launches. One program per row is slow at 8000 columns: 16 warps a row, one SM
each, k reductions in a row with barriers. So:
`_chunk_topk_kernel`, one program (one warp) per CHUNK columns of a row: the chunk's max and
sum of exp (the log-sum-exp's partials) and its k best logits, banned ones -inf (equal logits:
lower column first; a chunk with fewer than k columns pads with -inf at column V); then
`_merge_topk_kernel`, one program per row: the log-sum-exp from the partials, the chunks' k
best as bias + log-prob, and the row's k best of them by the same packed key. The values are
the same as the one-row kernel's; the columns may differ in one case: when more than k logits of
a chunk round to the same log-prob, the chunk kept its k largest logits, so a lower column
holding an equal log-prob (from a smaller logit) can be left out. The two launches are faster
than the one-row kernel at a beam-5 batch's 640 rows of 8000, if by little at the level of a
whole batch (benchmarks/profile_decode.py's variant `ours-row-topk` runs the one-row kernel
there; numbers in docs/benchmarks.md).

In both, a row whose bias is -inf (a beam that does not exist yet) yields k columns, the
lowest, with value -inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import common
from .common import EMPTY, key_value, sort_key

MAX_K = 64  # the picks are unrolled (one reduction each): beams up to 32 (2K per row)
ROW_V = 1024  # rows up to this wide: one program each; wider ones: split in chunks
CHUNK = 256  # columns of a chunk (one warp, no barriers)
MAX_CANDIDATES = 4096  # chunks x k, merged by one program: V up to 100k for beam 5, 16k for k = 64


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
    # One reduction per pick: value and column packed in one int64 key (`sort_key`: the value's
    # order-preserving bits high, BLOCK_V - 1 - column low; equal values: the lower column wins).
    key = tl.where(valid, sort_key(v, BLOCK_V - 1 - cols), EMPTY)  # padding columns: never picked
    for j in tl.static_range(K):
        best = tl.max(key, axis=0)
        col = BLOCK_V - 1 - (best & 0xFFFFFFFF).to(tl.int32)
        tl.store(val_ptr + row * K + j, key_value(best))
        tl.store(idx_ptr + row * K + j, col.to(tl.int64))
        key = tl.where(cols == col, EMPTY, key)


@triton.jit(do_not_specialize=["N", "V"])
def _chunk_topk_kernel(
    logits_ptr,  # (N, V) any float dtype
    banned_ptr,  # (NB,) int64
    part_ptr,  # (N, SPLIT, 2) fp32 out: the chunk's max and sum of exp(x - max)
    cval_ptr,  # (N, SPLIT, K) fp32 out: the chunk's K best logits (banned: -inf), best first
    ccol_ptr,  # (N, SPLIT, K) int64 out: their columns (V where the chunk has fewer than K)
    N,
    V,
    stride_row,
    NB: tl.constexpr,
    K: tl.constexpr,
    SPLIT: tl.constexpr,
    CHUNK: tl.constexpr,
):
    row = tl.program_id(0)
    part = tl.program_id(1)
    local = tl.arange(0, CHUNK)
    cols = part * CHUNK + local  # (CHUNK,)
    valid = cols < V
    x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
    m = tl.max(x, axis=0)  # every chunk holds at least one column
    out = row.to(tl.int64) * SPLIT + part
    tl.store(part_ptr + out * 2, m)
    se = tl.sum(tl.where(valid, tl.exp(x - m), 0.0), axis=0)
    tl.store(part_ptr + out * 2 + 1, tl.where(m > float("-inf"), se, 0.0))  # a chunk of -inf logits: 0, not NaN
    for j in tl.static_range(NB):
        x = tl.where(cols == tl.load(banned_ptr + j), float("-inf"), x)
    # equal logits: the lower column first
    key = tl.where(valid, sort_key(x, CHUNK - 1 - local), EMPTY)
    for j in tl.static_range(K):
        best = tl.max(key, axis=0)
        real = best != EMPTY
        at = CHUNK - 1 - (best & 0xFFFFFFFF).to(tl.int32)
        tl.store(cval_ptr + out * K + j, tl.where(real, key_value(best), float("-inf")))
        tl.store(ccol_ptr + out * K + j, tl.where(real, part * CHUNK + at, V).to(tl.int64))
        key = tl.where(local == at, EMPTY, key)


@triton.jit(do_not_specialize=["N", "V"])
def _merge_topk_kernel(
    part_ptr,  # (N, SPLIT, 2) fp32: each chunk's max and sum of exp
    cval_ptr,  # (N, SPLIT, K) fp32: each chunk's K best logits
    ccol_ptr,  # (N, SPLIT, K) int64: their columns
    bias_ptr,  # (N,) fp32 (read only if HAS_BIAS)
    val_ptr,  # (N, K) fp32 out
    idx_ptr,  # (N, K) int64 out
    N,
    V,
    K: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr,  # next power of two >= SPLIT
    BLOCK_M: tl.constexpr,  # next power of two >= SPLIT * K
):
    row = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, BLOCK_P)
    m_c = tl.load(part_ptr + (row * SPLIT + p) * 2, mask=p < SPLIT, other=float("-inf"))
    s_c = tl.load(part_ptr + (row * SPLIT + p) * 2 + 1, mask=p < SPLIT, other=0.0)
    m = tl.max(m_c, axis=0)
    lse = m + tl.log(tl.sum(tl.where(p < SPLIT, s_c * tl.exp(m_c - m), 0.0), axis=0))
    c = tl.arange(0, BLOCK_M)
    cand = c < SPLIT * K
    v = tl.load(cval_ptr + row * SPLIT * K + c, mask=cand, other=float("-inf")) - lse
    col = tl.load(ccol_ptr + row * SPLIT * K + c, mask=cand, other=V)
    dead = False  # a row of -inf bias: every value -inf, the lowest columns (the one-row kernel's answer)
    if HAS_BIAS:
        b = tl.load(bias_ptr + row)
        v = v + b
        dead = b == float("-inf")
    key = tl.where(cand, sort_key(v, 0x7FFFFFFF - col), EMPTY)
    for j in tl.static_range(K):
        best = tl.max(key, axis=0)
        tl.store(val_ptr + row * K + j, tl.where(dead, float("-inf"), key_value(best)))
        tl.store(idx_ptr + row * K + j, tl.where(dead, j, 0x7FFFFFFF - (best & 0xFFFFFFFF)))
        key = tl.where(key == best, EMPTY, key)


def supported(logits: Tensor, k: int) -> bool:
    """Whether the kernels take this call (else use `reference.log_softmax_topk`)."""
    N, V = logits.shape
    return (
        common.runs_here(logits)
        and 1 <= k <= min(V, MAX_K)
        and (V <= ROW_V or triton.cdiv(V, CHUNK) * k <= MAX_CANDIDATES)
        and logits.dtype in (torch.float32, torch.bfloat16, torch.float16)
    )


def log_softmax_topk(
    logits: Tensor, k: int, row_bias: Tensor | None = None, banned: Tensor | None = None
) -> tuple[Tensor, Tensor]:
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
    nb = 0 if banned is None else banned.numel()
    if V <= ROW_V:
        block = triton.next_power_of_2(V)
        _log_softmax_topk_kernel[(N,)](
            logits,
            bias,
            ban,
            vals,
            idx,
            N,
            V,
            logits.stride(0),
            NB=nb,
            K=k,
            HAS_BIAS=row_bias is not None,
            BLOCK_V=block,
            num_warps=4 if block <= 1024 else (8 if block <= 2048 else 16),  # wider: profile_decode's ours-row-topk
        )
        return vals, idx
    split = triton.cdiv(V, CHUNK)
    part = torch.empty(N, split, 2, device=logits.device, dtype=torch.float32)
    cval = torch.empty(N, split, k, device=logits.device, dtype=torch.float32)
    ccol = torch.empty(N, split, k, device=logits.device, dtype=torch.int64)
    _chunk_topk_kernel[(N, split)](
        logits,
        ban,
        part,
        cval,
        ccol,
        N,
        V,
        logits.stride(0),
        NB=nb,
        K=k,
        SPLIT=split,
        CHUNK=CHUNK,
        num_warps=1,
    )
    block = triton.next_power_of_2(split * k)
    _merge_topk_kernel[(N,)](
        part,
        cval,
        ccol,
        bias,
        vals,
        idx,
        N,
        V,
        K=k,
        SPLIT=split,
        HAS_BIAS=row_bias is not None,
        BLOCK_P=triton.next_power_of_2(split),
        BLOCK_M=block,
        num_warps=1 if block <= 512 else (4 if block <= 2048 else 8),
    )
    return vals, idx
