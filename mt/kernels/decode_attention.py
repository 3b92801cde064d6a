"""One decoder step's Luong attention (dot / general) in one Triton kernel, and its backward in one more.

    attention_step(query, keys, memory, mask) -> (context, weights)            no autograd
    attention_step_autograd(query, keys, memory, mask) -> (context, weights)   with a backward

For each row b (one program each), what `reference.attention_step` does with six PyTorch ops
(a bmm, a cast, the mask, the softmax, another cast and a bmm):

    scores[s]  = keys[b, s] . query[b]          (fp32 sums, rounded to keys' dtype as the bmm's output)
    weights    = softmax over the real tokens   (fp32; mask False -> weight 0)
    context[m] = sum_s weights[s] * memory[b, s, m]   (weights rounded to memory's dtype first)

and `_attention_step_backward_kernel`, for training, what autograd runs for those six ops
(about eight kernels: two bmms for each bmm, the casts, the softmax's backward, the mask's),
with the same roundings (d stands for the loss's gradient):

    g[s]             = d context . memory[b, s]  (+ d weights[s])   (rounded to memory's dtype)
    d scores[s]      = weights[s] (g[s] - sum_s' weights[s'] g[s'])  (rounded to keys' dtype)
    d query          = sum_s d scores[s] keys[b, s]
    d keys[b, s]     = d scores[s] query                     (zero at padding: its weight is 0)
    d memory[b, s]   = weights[s] d context

`mt.modules.attention.Attention` calls them with our Triton gate cell: `attention_step` when no
gradient is needed (greedy and beam search, validation), `attention_step_autograd` in training
(autograd then sums each step's d keys and d memory over the decoder's steps, as it does for the
PyTorch ops). They compute in their inputs' dtypes and ignore autocast: under autocast the model
hands them bf16 query, keys and memory, as the PyTorch ops would see them after autocast's casts.

Why: a replayed decoding step, or a replayed training step, is a chain of small kernels, each a
few microseconds however little it computes (a training step of the Multi30k model runs the
decoder's attention 20 times forward and backward). Six kernels become one forward, about eight
become one backward, each reading keys and memory once. benchmarks/profile_decode.py and
profile_train.py measure the gain against their variant `ours-torch-attention`, which runs the
PyTorch ops instead (numbers in docs/benchmarks.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import common

TILE = 4096  # elements of one (BLOCK_S, BLOCK_D) tile of keys or memory in registers
MAX_DIM = 4096  # query and memory sizes one program holds whole (a row of a tile)


@triton.jit(
    do_not_specialize=["S", "Q", "M", "stride_qb", "stride_kb", "stride_ks", "stride_mb", "stride_ms", "stride_maskb"]
)
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
        k = tl.load(
            keys_ptr + b * stride_kb + s[:, None] * stride_ks + dq[None, :],
            mask=(s < S)[:, None] & (dq < Q)[None, :],
            other=0.0,
        )
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
        m = tl.load(
            mem_ptr + b * stride_mb + s[:, None] * stride_ms + dm[None, :],
            mask=(s < S)[:, None] & (dm < M)[None, :],
            other=0.0,
        )
        ctx += tl.sum(m.to(tl.float32) * w.to(mem_ptr.dtype.element_ty).to(tl.float32)[:, None], axis=0)
        s0 += BLOCK_S
    tl.store(ctx_ptr + b * M + dm, ctx.to(ctx_ptr.dtype.element_ty), mask=dm < M)


@triton.jit
def _g_tile(mem_ptr, dw_ptr, b, s, S, M, stride_mb, stride_ms, dctx, dm_i, HAS_DW: tl.constexpr):
    """g at the tile's source positions s (BLOCK_S,): d context . memory[b, s], rounded to
    memory's dtype (the bmm's output), plus d weights[b, s] if HAS_DW."""
    m = tl.load(
        mem_ptr + b * stride_mb + s[:, None] * stride_ms + dm_i[None, :],
        mask=(s < S)[:, None] & (dm_i < M)[None, :],
        other=0.0,
    )  # (BLOCK_S, BLOCK_M)
    g = tl.sum(m.to(tl.float32) * dctx[None, :], axis=1).to(mem_ptr.dtype.element_ty).to(tl.float32)
    if HAS_DW:
        g += tl.load(dw_ptr + b * S + s, mask=s < S, other=0.0)
    return g


@triton.jit(
    do_not_specialize=["S", "Q", "M", "stride_qb", "stride_kb", "stride_ks", "stride_mb", "stride_ms", "stride_maskb"]
)
def _attention_step_backward_kernel(
    q_ptr,  # (B, Q) any float: the query, as the forward had it
    keys_ptr,  # (B, S, Q) float, last dim contiguous
    mem_ptr,  # (B, S, M) float, last dim contiguous
    mask_ptr,  # (B, S) bool: True at real tokens
    w_ptr,  # (B, S) fp32, contiguous: the forward's weights (0 at padding)
    dctx_ptr,  # (B, M) contiguous, memory's dtype: d context
    dw_ptr,  # (B, S) fp32, contiguous: d weights (read only if HAS_DW)
    dq_ptr,  # (B, Q) out, query's dtype, contiguous
    dk_ptr,  # (B, S, Q) out, keys' dtype, contiguous
    dm_ptr,  # (B, S, M) out, memory's dtype, contiguous
    S,
    Q,
    M,
    stride_qb,
    stride_kb,
    stride_ks,
    stride_mb,
    stride_ms,
    stride_maskb,
    HAS_DW: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # next power of two >= Q
    BLOCK_M: tl.constexpr,  # next power of two >= M
    BLOCK_S: tl.constexpr,  # source positions per tile: BACKWARD_TILE // max(BLOCK_Q, BLOCK_M)
):
    # Two passes over the source in tiles (runtime bound, as the forward): the first sums
    # weights . g for the softmax's backward, the second recomputes g (it re-reads memory rather
    # than keep g in a scratch row) and writes every output. Nothing the program writes is read
    # back, so it needs no barrier; each program writes only its own row b.
    b = tl.program_id(0).to(tl.int64)
    dq_i = tl.arange(0, BLOCK_Q)
    dm_i = tl.arange(0, BLOCK_M)
    q = tl.load(q_ptr + b * stride_qb + dq_i, mask=dq_i < Q, other=0.0)
    q = q.to(keys_ptr.dtype.element_ty).to(tl.float32)  # the forward bmm's input
    dctx = tl.load(dctx_ptr + b * M + dm_i, mask=dm_i < M, other=0.0).to(tl.float32)  # (M,)
    w_row = w_ptr + b * S

    # 1. wg = sum_s weights[s] g[s], g[s] = d context . memory[s] (in memory's dtype: the bmm's output)
    acc = tl.zeros([BLOCK_S], dtype=tl.float32)
    s0 = 0
    while s0 < S:
        s = s0 + tl.arange(0, BLOCK_S)
        g = _g_tile(mem_ptr, dw_ptr, b, s, S, M, stride_mb, stride_ms, dctx, dm_i, HAS_DW)
        acc += tl.load(w_row + s, mask=s < S, other=0.0) * g
        s0 += BLOCK_S
    wg = tl.sum(acc, axis=0)

    # 2. d scores = weights (g - wg) in keys' dtype, 0 at padding (the mask's backward: a row with
    # no real token has NaN weights, and no gradient through its scores, as with the PyTorch ops);
    # d keys, d memory per position; d query summed
    dq = tl.zeros([BLOCK_Q], dtype=tl.float32)
    s0 = 0
    while s0 < S:
        s = s0 + tl.arange(0, BLOCK_S)
        in_s = s < S
        g = _g_tile(mem_ptr, dw_ptr, b, s, S, M, stride_mb, stride_ms, dctx, dm_i, HAS_DW)
        w = tl.load(w_row + s, mask=in_s, other=0.0)
        real = tl.load(mask_ptr + b * stride_maskb + s, mask=in_s, other=0) != 0
        ds = tl.where(real, (w * (g - wg)).to(keys_ptr.dtype.element_ty).to(tl.float32), 0.0)  # (BLOCK_S,)
        k = tl.load(
            keys_ptr + b * stride_kb + s[:, None] * stride_ks + dq_i[None, :],
            mask=in_s[:, None] & (dq_i < Q)[None, :],
            other=0.0,
        )  # (BLOCK_S, BLOCK_Q)
        dq += tl.sum(k.to(tl.float32) * ds[:, None], axis=0)
        row = b * S + s  # (BLOCK_S,) rows of the (B*S, .) outputs
        tl.store(
            dk_ptr + row[:, None] * Q + dq_i[None, :],
            (ds[:, None] * q[None, :]).to(dk_ptr.dtype.element_ty),
            mask=in_s[:, None] & (dq_i < Q)[None, :],
        )
        w_m = w.to(mem_ptr.dtype.element_ty).to(tl.float32)  # the forward bmm's input
        tl.store(
            dm_ptr + row[:, None] * M + dm_i[None, :],
            (w_m[:, None] * dctx[None, :]).to(dm_ptr.dtype.element_ty),
            mask=in_s[:, None] & (dm_i < M)[None, :],
        )
        s0 += BLOCK_S
    dq = dq.to(keys_ptr.dtype.element_ty)  # the bmm's output, then the query cast's backward
    tl.store(dq_ptr + b * Q + dq_i, dq.to(dq_ptr.dtype.element_ty), mask=dq_i < Q)


FLOATS = (torch.float32, torch.bfloat16, torch.float16)
BACKWARD_TILE = 4096  # the backward holds four tiles at once (memory, keys and two products), over 8 warps
BACKWARD_WARPS = 8  # (no register spills for sm_90a: docs/benchmarks.md, "Kernel registers")


def supported(query: Tensor, keys: Tensor, memory: Tensor, mask: Tensor) -> bool:
    """Whether the kernel takes this call (else `reference.attention_step`): float tensors whose
    last dimension is contiguous, a bool mask, query and memory sizes up to MAX_DIM, and source
    positions S * row stride within int32 (the kernels' offset arithmetic)."""
    if query.dim() != 2 or keys.dim() != 3 or memory.dim() != 3 or mask.dim() != 2:
        return False
    B, S, Q = keys.shape
    return (
        common.runs_here(keys)
        and S >= 1
        and query.shape == (B, Q)
        and memory.shape[:2] == (B, S)
        and max(Q, memory.shape[2]) <= MAX_DIM
        and mask.shape == (B, S)
        and mask.dtype == torch.bool
        and all(x.dtype in FLOATS for x in (query, keys, memory))
        and query.stride(1) == 1
        and keys.stride(2) == 1
        and memory.stride(2) == 1
        and mask.stride(1) == 1
        and S * max(keys.stride(1), memory.stride(1)) < 2**31
    )


def attention_step(query: Tensor, keys: Tensor, memory: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """See the module docstring. query (B, Q), keys (B, S, Q), memory (B, S, M), mask (B, S) bool
    -> context (B, M) in memory's dtype, weights (B, S) fp32. No autograd."""
    B, S, Q = keys.shape
    M = memory.shape[2]
    context = torch.empty(B, M, device=memory.device, dtype=memory.dtype)
    weights = torch.empty(B, S, device=memory.device, dtype=torch.float32)
    if B == 0:
        return context, weights
    block_q, block_m, block_s = _blocks(Q, M, TILE)
    _attention_step_kernel[(B,)](
        query,
        keys,
        memory,
        mask,
        context,
        weights,
        S,
        Q,
        M,
        query.stride(0),
        keys.stride(0),
        keys.stride(1),
        memory.stride(0),
        memory.stride(1),
        mask.stride(0),
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_S=block_s,
        num_warps=4,
    )
    return context, weights


def _blocks(Q: int, M: int, tile: int) -> tuple[int, int, int]:
    block_q, block_m = triton.next_power_of_2(Q), triton.next_power_of_2(M)
    return block_q, block_m, max(1, tile // max(block_q, block_m))


def attention_step_backward(
    query: Tensor,
    keys: Tensor,
    memory: Tensor,
    mask: Tensor,
    weights: Tensor,
    d_context: Tensor,
    d_weights: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of `attention_step`'s inputs: query (B, Q), keys (B, S, Q), memory (B, S, M),
    mask (B, S) as the forward had them, its weights (B, S) fp32, d context (B, M), d weights
    (B, S) or None -> d query, d keys, d memory in their inputs' dtypes (contiguous)."""
    B, S, Q = keys.shape
    M = memory.shape[2]
    d_query = torch.empty(B, Q, device=query.device, dtype=query.dtype)
    d_keys = torch.empty(B, S, Q, device=keys.device, dtype=keys.dtype)
    d_memory = torch.empty(B, S, M, device=memory.device, dtype=memory.dtype)
    if B == 0:
        return d_query, d_keys, d_memory
    d_context = d_context.to(memory.dtype).contiguous()
    d_w = d_weights.float().contiguous() if d_weights is not None else weights  # (a dummy pointer, never read)
    block_q, block_m, block_s = _blocks(Q, M, BACKWARD_TILE)
    _attention_step_backward_kernel[(B,)](
        query,
        keys,
        memory,
        mask,
        weights.contiguous(),
        d_context,
        d_w,
        d_query,
        d_keys,
        d_memory,
        S,
        Q,
        M,
        query.stride(0),
        keys.stride(0),
        keys.stride(1),
        memory.stride(0),
        memory.stride(1),
        mask.stride(0),
        HAS_DW=d_weights is not None,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_S=block_s,
        num_warps=BACKWARD_WARPS,
    )
    return d_query, d_keys, d_memory


class _AttentionStepFunction(torch.autograd.Function):
    """`attention_step` under autograd: forward one kernel, backward one kernel
    (`attention_step_backward`). Saves query, keys, memory, mask (the same keys, memory and mask
    at every decoder step: references, not copies) and the weights. Once differentiable."""

    @staticmethod
    def forward(ctx, query, keys, memory, mask):
        context, weights = attention_step(query, keys, memory, mask)
        ctx.save_for_backward(query, keys, memory, mask, weights)
        ctx.set_materialize_grads(False)
        return context, weights

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_context, d_weights):
        query, keys, memory, mask, weights = ctx.saved_tensors
        if d_context is None and d_weights is None:
            return None, None, None, None
        if d_context is None:  # only the weights reach the loss
            d_context = torch.zeros(memory.shape[0], memory.shape[2], device=memory.device, dtype=memory.dtype)
        d_query, d_keys, d_memory = attention_step_backward(query, keys, memory, mask, weights, d_context, d_weights)
        need = ctx.needs_input_grad
        return (d_query if need[0] else None, d_keys if need[1] else None, d_memory if need[2] else None, None)


def attention_step_autograd(query: Tensor, keys: Tensor, memory: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """`attention_step` with a backward (`_attention_step_backward_kernel`); see the module docstring."""
    return _AttentionStepFunction.apply(query, keys, memory, mask)


__all__ = ["MAX_DIM", "supported", "attention_step", "attention_step_autograd", "attention_step_backward"]
