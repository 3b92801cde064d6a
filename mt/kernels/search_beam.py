"""A beam-search step's bookkeeping in one Triton kernel, and the rebuild of the finished
hypotheses after the last step in another (the search half of `mt.kernels`, with
`search_topk.py`).

    beam_update(val, col, attn, state..., history...)      # in place, one launch
    gather_rows(rows, srcs, dsts)                          # the decoder state follows, one launch
    backtrack(info, tok_hist, bp_hist, attn_hist, n, m, steps) -> (tokens, attention)

After `search_topk.log_softmax_topk` has given each beam its 2K best continuations (beam score
plus log-prob, best first, with their tokens), one program per sentence does what
`reference.beam_update` does with about 80 small PyTorch ops:

1. the sentence's 2K best candidates of its K * 2K (equal values: the lower beam, then the
   better rank within the beam, first);
2. the best K of them that close a hypothesis (EOS, or any candidate at the length limit, of a
   sentence not done yet) are merged into the K finished slots (ranking score float64, raw
   log-prob, (step, beam, token)), a stable merge: a finished hypothesis stays ahead of a new
   one with the same score;
3. the K best that do not end in EOS continue (then EOS ones, by rank, when fewer are left):
   their scores, tokens and rows (`rows`: the beam row each one continues, for the decoder
   state's gather);
4. the done flag: at the limit, nothing open, or K finished of which the nbest-th beats the
   best any open hypothesis can still reach (lp from the float64 table, as `advance`);
5. the step's history: token and back-pointer of every beam, and the attention of every beam
   row (fp32) at row t * n0 + sent[i] of the flattened (T, n0) history.

It reads a sentence's finished slots and done flag before it writes them, so they are updated
in place (a search step under CUDA graphs then copies nothing back). `mt.search` calls it with
our Triton gate cell when the fused top-k ran and V >= 2K; `advance` is its reference (the
tests compare the two on the same candidates, ties included).

Why: under CUDA graphs those ops were most of a beam-5 step's kernels, each a few
microseconds however little it computes (benchmarks/profile_decode.py; numbers in
docs/benchmarks.md).

`backtrack`: one program per finished hypothesis follows the back-pointers from the step it
closed at to the first, gathering its tokens and attention rows into compact (n, m, L) and
(n, m, L, S) outputs, so the host copies back the m hypotheses' rows instead of the history of
all K beams and does no walk of its own. Its reference is `reference.backtrack` (numpy);
the tests compare both with a plain per-hypothesis walk. Why: the host's rebuild copies the
whole history back and walks it in Python, a share of a beam-5 batch that grows as the
bookkeeping kernel makes the steps shorter (profile_decode's variant `ours-host-output`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import common
from .common import EMPTY, ROW_TILE, copy_in_tiles, sort_key

MAX_BEAM = 16  # 2K picks over K * 2K candidates, unrolled, in one warp: no register spills for sm_90 up to here


@triton.jit(do_not_specialize=["n0", "T", "S", "stride_attn", "eos"])
def _beam_update_kernel(
    val_ptr,  # (n*K, 2K) fp32: each beam's 2K best, beam score + log-prob, best first
    col_ptr,  # (n*K, 2K) int64: their tokens
    attn_ptr,  # (n*K, S) any float: this step's attention
    limit_ptr,  # (n,) int64: length limit
    sent_ptr,  # (n,) int64: original sentence index (history row)
    t_ptr,  # () int64: steps taken before this one
    lp_ptr,  # (T + 2,) fp64: lp(length)
    done_ptr,  # (n,) bool, in place
    fin_score_ptr,  # (n, K) fp64, in place: finished, ranking score (-inf: empty)
    fin_logp_ptr,  # (n, K) fp32, in place: finished, raw log-prob
    fin_info_ptr,  # (n, K, 3) int64, in place: finished, (step, beam, token)
    scores_ptr,  # (n, K) fp32 out: open hypotheses' scores
    last_ptr,  # (n*K,) int64 out: their last tokens
    rows_ptr,  # (n*K,) int64 out: the beam row each continues
    tok_hist_ptr,  # (T, n0, K) int64 out, row t * n0 + sent
    bp_hist_ptr,  # (T, n0, K) int64 out
    attn_hist_ptr,  # (T, n0, K, S) fp32 out
    n0,
    T,  # the history's steps: a step t >= T writes none (the search never takes one)
    S,
    stride_attn,
    eos,
    K: tl.constexpr,
    NBEST: tl.constexpr,
    BLOCK_C: tl.constexpr,  # next power of two >= K * 2K
    BLOCK_2K: tl.constexpr,  # next power of two >= 2K
    BLOCK_K: tl.constexpr,  # next power of two >= K
    BLOCK_S: tl.constexpr,  # ROW_TILE
):
    R: tl.constexpr = 2 * K
    i = tl.program_id(0).to(tl.int64)
    base = i * K * R
    t = tl.load(t_ptr)
    length = t + 1  # scored tokens per hypothesis after this step, EOS included
    limit = tl.load(limit_ptr + i)
    at_limit = length >= limit
    was_open = tl.load(done_ptr + i) == 0

    # 1. the 2K best of K * 2K: one max-reduction per pick over (value, index) packed in an
    # int64 (`sort_key`: equal values, the lower index first)
    c = tl.arange(0, BLOCK_C)
    v = tl.load(val_ptr + base + c, mask=c < K * R, other=float("-inf"))
    key = tl.where(c < K * R, sort_key(v, BLOCK_C - 1 - c), EMPTY)
    r = tl.arange(0, BLOCK_2K)  # a candidate's rank; in step 2, a merge position
    top_j = tl.zeros([BLOCK_2K], dtype=tl.int64)  # rank -> index into the K * 2K candidates
    new_j = tl.zeros([BLOCK_2K], dtype=tl.int64)  # merge position K + p -> the candidate of rank p < K
    for p in tl.static_range(2 * K):
        j = BLOCK_C - 1 - (tl.max(key, axis=0) & 0xFFFFFFFF)
        top_j = tl.where(r == p, j, top_j)
        if p < K:
            new_j = tl.where(r == K + p, j, new_j)
        key = tl.where(c == j, EMPTY, key)
    ranked = r < 2 * K
    top_s = tl.load(val_ptr + base + top_j, mask=ranked, other=float("-inf"))  # (2K,) best first
    top_tok = tl.load(col_ptr + base + top_j, mask=ranked, other=0)
    top_beam = top_j // R
    is_eos = ranked & (top_tok == eos)

    # 2. merge: positions [0, K) the finished slots, [K, 2K) the K best candidates, those that
    # close a hypothesis scored by lp(length), the others -inf; K picks of the best, the lower
    # position first on equal scores (a stable sort)
    fin = r < K
    new = (r >= K) & ranked
    n_s = tl.load(val_ptr + base + new_j, mask=new, other=float("-inf"))
    n_tok = tl.load(col_ptr + base + new_j, mask=new, other=0)
    closing = new & ((n_tok == eos) | at_limit) & (n_s > float("-inf")) & (n_s < float("inf")) & was_open
    lp_len = tl.load(lp_ptr + tl.minimum(length, T + 1))  # (the table has T + 2 entries; t < T in a search)
    slot = i * K + r  # fin's row of position r < K
    m_score = tl.where(closing, n_s.to(tl.float64) / lp_len, float("-inf"))
    m_score = tl.where(fin, tl.load(fin_score_ptr + slot, mask=fin, other=float("-inf")), m_score)
    m_logp = tl.where(fin, tl.load(fin_logp_ptr + slot, mask=fin, other=0.0), n_s)
    m_step = tl.where(fin, tl.load(fin_info_ptr + slot * 3, mask=fin, other=0), t)
    m_beam = tl.where(fin, tl.load(fin_info_ptr + slot * 3 + 1, mask=fin, other=0), new_j // R)
    m_tok = tl.where(fin, tl.load(fin_info_ptr + slot * 3 + 2, mask=fin, other=0), n_tok)
    q = tl.arange(0, BLOCK_K)  # a beam / finished slot
    f_score = tl.full([BLOCK_K], float("-inf"), dtype=tl.float64)
    f_logp = tl.full([BLOCK_K], float("-inf"), dtype=tl.float32)
    f_step = tl.zeros([BLOCK_K], dtype=tl.int64)
    f_beam = tl.zeros([BLOCK_K], dtype=tl.int64)
    f_tok = tl.zeros([BLOCK_K], dtype=tl.int64)
    taken = r >= 2 * K
    for p in tl.static_range(K):
        best = tl.max(tl.where(taken, float("-inf"), m_score), axis=0)
        pick = r == tl.min(tl.where(~taken & (m_score == best), r, BLOCK_2K), axis=0)
        here = q == p
        f_score = tl.where(here, best, f_score)
        f_logp = tl.where(here, tl.max(tl.where(pick, m_logp, float("-inf")), axis=0), f_logp)
        f_step = tl.where(here, tl.sum(tl.where(pick, m_step, 0), axis=0), f_step)
        f_beam = tl.where(here, tl.sum(tl.where(pick, m_beam, 0), axis=0), f_beam)
        f_tok = tl.where(here, tl.sum(tl.where(pick, m_tok, 0), axis=0), f_tok)
        taken = taken | pick

    # 3. the K that continue: the non-EOS candidates by rank, then the EOS ones by rank
    order = tl.where(ranked, tl.where(is_eos, 2 * K, 0) + r, 4 * K)
    o_score = tl.full([BLOCK_K], float("-inf"), dtype=tl.float32)
    o_tok = tl.zeros([BLOCK_K], dtype=tl.int64)
    o_beam = tl.zeros([BLOCK_K], dtype=tl.int64)
    for p in tl.static_range(K):
        pick = r == tl.min(order, axis=0) % (2 * K)
        here = q == p
        o_score = tl.where(here, tl.max(tl.where(pick, top_s, float("-inf")), axis=0), o_score)
        o_tok = tl.where(here, tl.sum(tl.where(pick, top_tok, 0), axis=0), o_tok)
        o_beam = tl.where(here, tl.sum(tl.where(pick, top_beam, 0), axis=0), o_beam)
        order = tl.where(pick, 4 * K, order)

    # 4. done: at the limit, nothing open, or K finished and the nbest-th beats every open one's best reachable score
    best_open = tl.max(tl.where(q == 0, o_score, float("-inf")), axis=0).to(tl.float64)
    lp_lo = tl.load(lp_ptr + tl.minimum(length + 1, T + 1))
    lp_hi = tl.load(lp_ptr + tl.minimum(tl.maximum(limit, length + 1), T + 1))
    bound = tl.maximum(best_open / lp_lo, best_open / lp_hi)
    n_fin = tl.sum(((q < K) & (f_score > float("-inf")) & (f_score < float("inf"))).to(tl.int32), axis=0)
    nth = tl.max(tl.where(q == NBEST - 1, f_score, float("-inf")), axis=0)
    open_finite = (best_open > float("-inf")) & (best_open < float("inf"))
    done = (was_open == 0) | at_limit | (open_finite == 0) | ((n_fin >= K) & (bound <= nth))

    # every read of this sentence's in-place state is above (one warp: its reductions order them)
    tl.debug_barrier()
    beams = q < K
    out = i * K + q
    tl.store(fin_score_ptr + out, f_score, mask=beams)
    tl.store(fin_logp_ptr + out, f_logp, mask=beams)
    tl.store(fin_info_ptr + out * 3, f_step, mask=beams)
    tl.store(fin_info_ptr + out * 3 + 1, f_beam, mask=beams)
    tl.store(fin_info_ptr + out * 3 + 2, f_tok, mask=beams)
    tl.store(done_ptr + i, done)
    tl.store(scores_ptr + out, o_score, mask=beams)
    tl.store(last_ptr + out, o_tok, mask=beams)
    tl.store(rows_ptr + out, i * K + o_beam, mask=beams)

    # 5. history, by original sentence
    hist = (t * n0 + tl.load(sent_ptr + i)) * K  # first of the sentence's K rows at step t
    in_hist = t < T
    tl.store(tok_hist_ptr + hist + q, o_tok, mask=beams & in_hist)
    tl.store(bp_hist_ptr + hist + q, o_beam, mask=beams & in_hist)
    for b in tl.static_range(K):
        copy_in_tiles(attn_ptr + (i * K + b) * stride_attn, attn_hist_ptr + (hist + b) * S, S, in_hist, BLOCK_S)


@triton.jit(do_not_specialize=["n0", "S", "L"])
def _beam_backtrack_kernel(
    info_ptr,  # (n0, K, 3) int64: finished hypotheses, (step it closed, beam, last token)
    tok_hist_ptr,  # (T, n0, K) int64: the token each beam took at step t
    bp_hist_ptr,  # (T, n0, K) int64: the beam (before step t's reorder) it continues
    attn_hist_ptr,  # (T, n0, K, S) fp32: the attention of every beam row at step t
    tok_out_ptr,  # (n, M, L) int64 out: a hypothesis' tokens at steps [0, end)
    attn_out_ptr,  # (n, M, L, S) fp32 out: its attention rows at steps [0, end]
    n0,
    S,
    L,
    K: tl.constexpr,
    M: tl.constexpr,  # hypotheses per sentence (nbest)
    BLOCK_S: tl.constexpr,  # ROW_TILE
):
    p = tl.program_id(0).to(tl.int64)  # hypothesis k = p % M of sentence i = p // M
    i = p // M
    slot = (i * K + p % M) * 3
    end = tl.minimum(tl.maximum(tl.load(info_ptr + slot), 0), L - 1)  # (clamped: an empty slot reads zeros)
    b = tl.minimum(tl.maximum(tl.load(info_ptr + slot + 1), 0), K - 1)  # the row that computed step `end`
    row = p * L  # the hypothesis' first row of the outputs
    copy_in_tiles(attn_hist_ptr + ((end * n0 + i) * K + b) * S, attn_out_ptr + (row + end) * S, S, True, BLOCK_S)
    t = end - 1
    while t >= 0:  # (a while loop: the interpreter cannot run a range() with a runtime bound)
        h = (t * n0 + i) * K + b  # the beam the hypothesis sat in after step t
        tl.store(tok_out_ptr + row + t, tl.load(tok_hist_ptr + h))
        b = tl.load(bp_hist_ptr + h)  # the row that computed step t
        copy_in_tiles(attn_hist_ptr + ((t * n0 + i) * K + b) * S, attn_out_ptr + (row + t) * S, S, True, BLOCK_S)
        t -= 1


MAX_STATE = 9  # tensors one gather_rows launch moves: h and c of 4 decoder layers, and the input feed


@triton.jit
def _copy_row(src_ptr, dst_ptr, r, src_row, H, BLOCK_H: tl.constexpr):
    d = tl.arange(0, BLOCK_H)
    x = tl.load(src_ptr + src_row * H + d, mask=d < H)
    tl.store(dst_ptr + r * H + d, x.to(dst_ptr.dtype.element_ty), mask=d < H)


@triton.jit(do_not_specialize=["H"])
def _gather_rows_kernel(
    rows_ptr,
    s0,
    d0,
    s1,
    d1,
    s2,
    d2,
    s3,
    d3,
    s4,
    d4,
    s5,
    d5,
    s6,
    d6,
    s7,
    d7,
    s8,
    d8,
    H,
    NT: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # program (r, t): row r of destination t = row rows[r] of source t (pairs past NT: unused)
    r = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    src_row = tl.load(rows_ptr + r)
    if t == 0:
        _copy_row(s0, d0, r, src_row, H, BLOCK_H)
    if NT > 1:
        if t == 1:
            _copy_row(s1, d1, r, src_row, H, BLOCK_H)
    if NT > 2:
        if t == 2:
            _copy_row(s2, d2, r, src_row, H, BLOCK_H)
    if NT > 3:
        if t == 3:
            _copy_row(s3, d3, r, src_row, H, BLOCK_H)
    if NT > 4:
        if t == 4:
            _copy_row(s4, d4, r, src_row, H, BLOCK_H)
    if NT > 5:
        if t == 5:
            _copy_row(s5, d5, r, src_row, H, BLOCK_H)
    if NT > 6:
        if t == 6:
            _copy_row(s6, d6, r, src_row, H, BLOCK_H)
    if NT > 7:
        if t == 7:
            _copy_row(s7, d7, r, src_row, H, BLOCK_H)
    if NT > 8:
        if t == 8:
            _copy_row(s8, d8, r, src_row, H, BLOCK_H)


def gather_rows_supported(rows: Tensor, srcs: list[Tensor], dsts: list[Tensor]) -> bool:
    """Whether `gather_rows` takes these (else one index_select each): up to MAX_STATE pairs of
    contiguous (N, H) tensors of one H on rows' device, contiguous int64 rows, every destination a tensor
    of its own, apart from every source."""
    if not (
        common.runs_here(rows)
        and 1 <= len(srcs) == len(dsts) <= MAX_STATE
        and rows.dim() == 1
        and rows.dtype == torch.int64
        and rows.is_contiguous()
        and all(x.dim() == 2 for x in (*srcs, *dsts))
    ):
        return False
    H = dsts[0].shape[1]
    if any(x.shape[1] != H or not x.is_contiguous() or x.device != rows.device for x in (*srcs, *dsts)):
        return False
    if any(d.shape[0] != rows.shape[0] for d in dsts):
        return False
    dst_storages = [d.untyped_storage().data_ptr() for d in dsts]
    if len(set(dst_storages)) < len(dsts):  # two pairs writing one tensor
        return False
    return not set(dst_storages) & {x.untyped_storage().data_ptr() for x in srcs}


def gather_rows(rows: Tensor, srcs: list[Tensor], dsts: list[Tensor]) -> None:
    """dsts[t][r] = srcs[t][rows[r]] for every pair t, cast to the destination's dtype, in one
    launch: the decoder state's reorder after a beam step (h and c of every layer, the input
    feed), which is otherwise one index_select per tensor. rows (N,) int64; srcs (N', H),
    dsts (N, H). See `gather_rows_supported`."""
    N, H = dsts[0].shape
    if N == 0:
        return
    pairs = [x for pair in zip(srcs, dsts) for x in pair]
    pairs += pairs[:2] * (MAX_STATE - len(srcs))  # unused slots (never touched: NT)
    _gather_rows_kernel[(N, len(srcs))](
        rows,
        *pairs,
        H,
        NT=len(srcs),
        BLOCK_H=triton.next_power_of_2(H),
        num_warps=4 if H >= 1024 else (2 if H >= 256 else 1),
    )


def supported(val: Tensor, K: int, V: int, S: int) -> bool:
    """Whether the kernel takes a step of K beams over V tokens and S source positions whose
    per-beam candidates are `val` (else `reference.beam_update`): it needs each beam's
    2K best (V >= 2K)."""
    return common.runs_here(val) and 1 <= K <= MAX_BEAM and V >= 2 * K and tuple(val.shape[1:]) == (2 * K,) and S >= 1


def beam_update(
    val: Tensor,
    col: Tensor,
    attn: Tensor,
    limit: Tensor,
    sent: Tensor,
    t: Tensor,
    lp_table: Tensor,
    done: Tensor,
    fin: tuple[Tensor, Tensor, Tensor],
    scores: Tensor,
    last: Tensor,
    rows: Tensor,
    tok_hist: Tensor,
    bp_hist: Tensor,
    attn_hist: Tensor,
    eos: int,
    nbest: int,
) -> None:
    """See the module docstring. n sentences, K beams: val, col (n*K, 2K); attn (n*K, S); limit,
    sent, done (n,); t (); fin = (score (n, K) fp64, log-prob (n, K) fp32, info (n, K, 3) int64);
    scores (n, K) fp32; last, rows (n*K,) int64; tok_hist, bp_hist (T, n0, K); attn_hist (T, n0, K, S)
    fp32; lp_table (>= T + 2,) fp64, lp_table[L] the length penalty of L scored tokens. done and fin
    are read and rewritten in place; the history at step t."""
    n, K = scores.shape
    S = attn.shape[1]
    T, n0 = tok_hist.shape[:2]
    state = (done, *fin, scores, last, rows, tok_hist, bp_hist, attn_hist)
    if not all(x.is_contiguous() for x in state):
        raise ValueError("beam_update writes its state in place: contiguous tensors only")
    shapes = dict(
        val=(val.shape, (n * K, 2 * K)),
        col=(col.shape, (n * K, 2 * K)),
        attn=(attn.shape, (n * K, S)),
        limit=(limit.shape, (n,)),
        sent=(sent.shape, (n,)),
        done=(done.shape, (n,)),
        fin_score=(fin[0].shape, (n, K)),
        fin_logp=(fin[1].shape, (n, K)),
        fin_info=(fin[2].shape, (n, K, 3)),
        last=(last.shape, (n * K,)),
        rows=(rows.shape, (n * K,)),
        tok_hist=(tok_hist.shape, (T, n0, K)),
        bp_hist=(bp_hist.shape, (T, n0, K)),
        attn_hist=(attn_hist.shape, (T, n0, K, S)),
    )
    wrong = [f"{k} {tuple(got)} (not {want})" for k, (got, want) in shapes.items() if tuple(got) != want]
    if wrong or t.numel() != 1 or lp_table.dim() != 1 or lp_table.numel() < T + 2 or n > n0:
        raise ValueError(
            f"beam_update: {n} sentences x {K} beams, {S} source positions, a ({T}, {n0}) history: "
            + ", ".join(wrong or [f"t {tuple(t.shape)}, lp_table {tuple(lp_table.shape)}"])
        )
    if n == 0:
        return
    val, col, attn = val.contiguous(), col.contiguous(), attn if attn.stride(1) == 1 else attn.contiguous()
    limit, sent, lp_table = limit.contiguous(), sent.contiguous(), lp_table.contiguous()
    _beam_update_kernel[(n,)](
        val,
        col,
        attn,
        limit,
        sent,
        t,
        lp_table,
        done,
        *fin,
        scores,
        last,
        rows,
        tok_hist,
        bp_hist,
        attn_hist,
        tok_hist.shape[1],
        tok_hist.shape[0],
        S,
        attn.stride(0),
        eos,
        K=K,
        NBEST=nbest,
        BLOCK_C=triton.next_power_of_2(2 * K * K),
        BLOCK_2K=triton.next_power_of_2(2 * K),
        BLOCK_K=triton.next_power_of_2(K),
        BLOCK_S=ROW_TILE,
        num_warps=1,
    )


def backtrack_supported(attn_hist: Tensor) -> bool:
    """Whether `backtrack` takes this search's history (else `reference.backtrack`)."""
    return common.runs_here(attn_hist) and attn_hist.dtype == torch.float32


def backtrack(
    info: Tensor, tok_hist: Tensor, bp_hist: Tensor, attn_hist: Tensor, n: int, m: int, steps: int
) -> tuple[Tensor, Tensor]:
    """Sentences [0, n), hypotheses [0, m) of each: follow the back-pointers from where each
    closed, on the device -> tokens (n, m, L) int64 and attention (n, m, L, S) fp32, L = max(steps,
    1): hypothesis (i, k) closed at step e = info[i, k, 0] has its tokens at [0, e) (the token it
    closed with is info[i, k, 2]) and attention rows at [0, e]; the rest is not written.
    info (n0, K, 3) int64; tok_hist, bp_hist (T, n0, K) int64; attn_hist (T, n0, K, S) fp32.
    What `reference.backtrack` does on the host, as one launch and a copy back of only the
    rows the hypotheses use (not the K beams' whole history)."""
    T, n0, K, S = attn_hist.shape
    L = max(steps, 1)
    if not (steps <= T and n <= n0 and m <= K and info.shape == (n0, K, 3)):
        raise ValueError(f"backtrack: {n} sentences x {m} hypotheses over {steps} steps of a ({T}, {n0}, {K}) history")
    if not all(x.is_contiguous() for x in (info, tok_hist, bp_hist, attn_hist)):
        raise ValueError("backtrack: contiguous tensors only")
    tokens = torch.empty(n, m, L, dtype=torch.long, device=attn_hist.device)
    attention = torch.empty(n, m, L, S, dtype=torch.float32, device=attn_hist.device)
    if n * m:
        _beam_backtrack_kernel[(n * m,)](
            info, tok_hist, bp_hist, attn_hist, tokens, attention, n0, S, L, K=K, M=m, BLOCK_S=ROW_TILE, num_warps=1
        )
    return tokens, attention


__all__ = [
    "MAX_BEAM",
    "MAX_STATE",
    "supported",
    "beam_update",
    "gather_rows_supported",
    "gather_rows",
    "backtrack_supported",
    "backtrack",
]
