"""One decoding step's Luong attention (dot / general) in one Triton kernel.

    attention_step(query, keys, memory, mask) -> (context, weights)

For each row b (one program each), what `reference.attention_step` does with six PyTorch ops
(a bmm, a cast, the mask, the softmax, another cast and a bmm):

    scores[s]  = keys[b, s] . query[b]          (fp32 sums, rounded to keys' dtype as the bmm's output)
    weights    = softmax over the real tokens   (fp32; mask False -> weight 0)
    context[m] = sum_s weights[s] * memory[b, s, m]   (weights rounded to memory's dtype first)

`mt.modules.attention.Attention` calls it with our Triton gate cell when no gradient is needed
(greedy and beam search, validation); training keeps the PyTorch ops (autograd). It computes
in its inputs' dtypes and ignores autocast: under autocast the model hands it bf16 query, keys
and memory, as the PyTorch ops would see them after autocast's casts. Every decoding
step runs it once for the B (greedy) or n*K (beam) rows, inside the step's CUDA graph.

Why: a replayed decoding step is a chain of small kernels, each a few microseconds however
little it computes (a graphed beam-5 step ran 114: scripts/profile_decode.py, H200,
2026-11-27); the attention's six become one, which reads keys and memory once. Its gain is not
measured yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .search_topk import _runs_here

TILE = 4096  # elements of one (BLOCK_S, BLOCK_D) tile of keys or memory in registers
MAX_DIM = 4096  # query and memory sizes one program holds whole (a row of a tile)


@triton.jit(do_not_specialize=["S", "Q", "M", "stride_qb", "stride_kb", "stride_ks", "stride_mb", "stride_ms",
                               "stride_maskb"])
def _attention_step_kernel(
    q_ptr,  # (B, Q) any float: the query (the decoder's top hidden state)
    keys_ptr,  # (B, S, Q) float, last dim contiguous: keys (memory, or W_a memory)
    mem_ptr,  # (B, S, M) float, last dim contiguous: the encoder's outputs
    mask_ptr,  # (B, S) bool: True at real tokens
    ctx_ptr,  # (B, M) out, memory's dtype
    w_ptr,  # (B, S) fp32 out (first the raw scores, then the weights)
    S,
    Q,
    M,
    stride_qb,
    stride_kb,
    stride_ks,
    stride_mb,
    stride_ms,
    stride_maskb,
    BLOCK_Q: tl.constexpr,  # next power of two >= Q
    BLOCK_M: tl.constexpr,  # next power of two >= M
    BLOCK_S: tl.constexpr,  # source positions per tile: TILE // max(BLOCK_Q, BLOCK_M)
):
    # The source length is a runtime loop bound (while loops: the interpreter cannot run a
    # range() with one), so a model compiles one variant for every batch and source length.
    b = tl.program_id(0).to(tl.int64)
    dq = tl.arange(0, BLOCK_Q)
    dm = tl.arange(0, BLOCK_M)
    q = tl.load(q_ptr + b * stride_qb + dq, mask=dq < Q, other=0.0)
    q = q.to(keys_ptr.dtype.element_ty).to(tl.float32)  # the bmm's input: the query in keys' dtype
    row = w_ptr + b * S

    # 1. scores (S,) = keys (S, Q) @ query (Q,): fp32 sums rounded to keys' dtype (the bmm's
    # output), -inf at padding; kept in the weights' row, with their maximum
    top = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    s0 = 0
    while s0 < S:
        s = s0 + tl.arange(0, BLOCK_S)
        k = tl.load(keys_ptr + b * stride_kb + s[:, None] * stride_ks + dq[None, :],
                    mask=(s < S)[:, None] & (dq < Q)[None, :], other=0.0)
        sc = tl.sum(k.to(tl.float32) * q[None, :], axis=1).to(keys_ptr.dtype.element_ty).to(tl.float32)
        real = (s < S) & (tl.load(mask_ptr + b * stride_maskb + s, mask=s < S, other=0) != 0)
        sc = tl.where(real, sc, float("-inf"))
        tl.store(row + s, sc, mask=s < S)
        top = tl.maximum(top, sc)
        s0 += BLOCK_S
    top_all = tl.max(top, axis=0)
    tl.debug_barrier()  # the row's scores, written by all the program's threads, are read below

    # 2. the softmax's denominator
    total = tl.zeros([BLOCK_S], dtype=tl.float32)
    s0 = 0
    while s0 < S:
        s = s0 + tl.arange(0, BLOCK_S)
        total += tl.exp(tl.load(row + s, mask=s < S, other=float("-inf")) - top_all)
        s0 += BLOCK_S
    denom = tl.sum(total, axis=0)
    tl.debug_barrier()  # step 2's reads of the scores are done before step 3 writes weights over them

    # 3. weights (fp32), and context (M,) = weights (S,) @ memory (S, M), the weights in memory's
    # dtype as the bmm's input
    ctx = tl.zeros([BLOCK_M], dtype=tl.float32)
    s0 = 0
    while s0 < S:
        s = s0 + tl.arange(0, BLOCK_S)
        w = tl.exp(tl.load(row + s, mask=s < S, other=float("-inf")) - top_all) / denom
        # every thread reads the tile's scores (for its columns of the context), fewer threads
        # store its weights: all reads first, or a late warp would read a weight as a score
        tl.debug_barrier()
        tl.store(row + s, w, mask=s < S)
        m = tl.load(mem_ptr + b * stride_mb + s[:, None] * stride_ms + dm[None, :],
                    mask=(s < S)[:, None] & (dm < M)[None, :], other=0.0)
        ctx += tl.sum(m.to(tl.float32) * w.to(mem_ptr.dtype.element_ty).to(tl.float32)[:, None], axis=0)
        s0 += BLOCK_S
    tl.store(ctx_ptr + b * M + dm, ctx.to(ctx_ptr.dtype.element_ty), mask=dm < M)


FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def supported(query: Tensor, keys: Tensor, memory: Tensor, mask: Tensor) -> bool:
    """Whether the kernel takes this call (else `reference.attention_step`): float tensors whose
    last dimension is contiguous, a bool mask, query and memory sizes up to MAX_DIM."""
    if query.dim() != 2 or keys.dim() != 3 or memory.dim() != 3 or mask.dim() != 2:
        return False
    B, S, Q = keys.shape
    return (_runs_here(keys) and S >= 1 and query.shape == (B, Q) and memory.shape[:2] == (B, S)
            and max(Q, memory.shape[2]) <= MAX_DIM and mask.shape == (B, S) and mask.dtype == torch.bool
            and all(x.dtype in FLOATS for x in (query, keys, memory))
            and query.stride(1) == 1 and keys.stride(2) == 1 and memory.stride(2) == 1 and mask.stride(1) == 1)


def attention_step(query: Tensor, keys: Tensor, memory: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """See the module docstring. query (B, Q), keys (B, S, Q), memory (B, S, M), mask (B, S) bool
    -> context (B, M) in memory's dtype, weights (B, S) fp32. No autograd."""
    B, S, Q = keys.shape
    M = memory.shape[2]
    context = torch.empty(B, M, device=memory.device, dtype=memory.dtype)
    weights = torch.empty(B, S, device=memory.device, dtype=torch.float32)
    if B == 0:
        return context, weights
    block_q, block_m = triton.next_power_of_2(Q), triton.next_power_of_2(M)
    _attention_step_kernel[(B,)](
        query, keys, memory, mask, context, weights, S, Q, M,
        query.stride(0), keys.stride(0), keys.stride(1), memory.stride(0), memory.stride(1), mask.stride(0),
        BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_S=max(1, TILE // max(block_q, block_m)), num_warps=4,
    )
    return context, weights


__all__ = ["MAX_DIM", "supported", "attention_step"]
