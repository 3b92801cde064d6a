"""A greedy-search step's bookkeeping in one Triton kernel (with `search_topk.py`, which picks
each row's best token, and `search_beam.py`, beam search's counterpart).

    greedy_update(best, tok, attn, limit, t, done, scores, last, tok_hist, attn_hist, eos)   # in place

One program per row (sentence) does what `reference.greedy_update` does with about a
dozen small PyTorch ops:

1. a row already done emits EOS at no cost; the others take their best token;
2. the row's score (sum of log-probs) grows by the token's log-prob;
3. the row is done after EOS or at its length limit;
4. the step's history: the token at tok_hist[t, row], the attention (fp32) at attn_hist[t, row].

It reads the row's done flag and score before it writes them, so they are updated in place
(under CUDA graphs the step then copies nothing back). The attention row is copied in tiles
with a runtime bound, so a model compiles one variant for every batch size and source length
(the de->en recipe's validation decodes greedily, and its precompile records this variant).
`mt.search` calls it with our Triton gate cell after the fused top-k; `reference.greedy_update`
is its reference (the tests compare the two).

Why: a graphed greedy step is mostly small kernels, each a few microseconds however little it
computes: the bookkeeping ops and the copies of the state into the graph's buffers. They become
one launch here (benchmarks/profile_decode.py times the step; numbers in docs/benchmarks.md).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from . import common
from .common import ROW_TILE, copy_in_tiles


@triton.jit(do_not_specialize=["N", "T", "S", "stride_attn", "eos"])
def _greedy_update_kernel(
    best_ptr,  # (N,) fp32: each row's best log-prob this step
    tok_ptr,  # (N,) int64: its token
    attn_ptr,  # (N, S) any float, rows contiguous: this step's attention
    limit_ptr,  # (N,) int64: length limit
    t_ptr,  # () int64: steps taken before this one
    done_ptr,  # (N,) bool, in place
    scores_ptr,  # (N,) fp32, in place: sum of log-probs
    last_ptr,  # (N,) int64 out: the token each row emits
    tok_hist_ptr,  # (T, N) int64 out, row t
    attn_hist_ptr,  # (T, N, S) fp32 out, row t
    N,
    T,  # the history's steps: a step t >= T writes none (the search never takes one)
    S,
    stride_attn,
    eos,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    t = tl.load(t_ptr)
    was_done = tl.load(done_ptr + r) != 0
    tok = tl.where(was_done, eos, tl.load(tok_ptr + r))
    score = tl.load(scores_ptr + r) + tl.where(was_done, 0.0, tl.load(best_ptr + r))
    done = was_done | (tok == eos) | (t + 1 >= tl.load(limit_ptr + r))
    tl.store(last_ptr + r, tok)
    tl.store(scores_ptr + r, score)
    tl.store(done_ptr + r, done)
    in_hist = t < T
    tl.store(tok_hist_ptr + t * N + r, tok, mask=in_hist)
    copy_in_tiles(attn_ptr + r * stride_attn, attn_hist_ptr + (t * N + r) * S, S, in_hist, BLOCK)


def supported(attn: Tensor) -> bool:
    """Whether the kernel takes a step whose attention is `attn` (N, S) (else
    `reference.greedy_update`)."""
    return common.runs_here(attn) and attn.dim() == 2 and attn.shape[1] >= 1


def greedy_update(
    best: Tensor,
    tok: Tensor,
    attn: Tensor,
    limit: Tensor,
    t: Tensor,
    done: Tensor,
    scores: Tensor,
    last: Tensor,
    tok_hist: Tensor,
    attn_hist: Tensor,
    eos: int,
) -> None:
    """See the module docstring. N rows: best (N,) fp32, tok (N,) int64 (the fused top-k's, k = 1);
    attn (N, S); limit (N,); t (); done (N,) bool and scores (N,) fp32, read and rewritten in
    place; last (N,) int64; tok_hist (T, N) int64; attn_hist (T, N, S) fp32, written at step t."""
    N, S = attn.shape
    state = (done, scores, last, tok_hist, attn_hist)
    if not all(x.is_contiguous() for x in state):
        raise ValueError("greedy_update writes its state in place: contiguous tensors only")
    if tok_hist.shape[1:] != (N,) or attn_hist.shape[1:] != (N, S):
        raise ValueError(
            f"greedy_update: histories {tuple(tok_hist.shape)} and {tuple(attn_hist.shape)} "
            f"for {N} rows of {S} source positions"
        )
    if N == 0:
        return
    attn = attn if attn.stride(1) == 1 else attn.contiguous()
    _greedy_update_kernel[(N,)](
        best.contiguous(),
        tok.contiguous(),
        attn,
        limit.contiguous(),
        t,
        done,
        scores,
        last,
        tok_hist,
        attn_hist,
        N,
        tok_hist.shape[0],
        S,
        attn.stride(0),
        eos,
        BLOCK=ROW_TILE,
        num_warps=1,
    )


__all__ = ["supported", "greedy_update"]
