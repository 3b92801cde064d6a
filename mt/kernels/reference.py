"""Every kernel's reference in plain PyTorch (numpy for one): the oracle each Triton kernel of
`mt.kernels` is tested against, and the code that runs wherever a kernel does not (cuDNN, the
PyTorch cell, shapes a kernel refuses).

    cell_step, lstm_sequence          the gate cell                 (triton_cell.py)
    attention_step                    a decoder step's attention    (decode_attention.py)
    log_softmax_topk                  a search step's candidates    (search_topk.py)
    greedy_update                     greedy search's bookkeeping   (search_greedy.py)
    best_candidates, beam_update      beam search's bookkeeping     (search_beam.py)
    gather_rows                       the decoder state's reorder   (search_beam.py)
    backtrack                         beam search's output rebuild  (search_beam.py)
    cross_entropy_sums                the training loss             (cross_entropy.py)

The LSTM gate cell:

One step (gates stacked in PyTorch's order i, f, g, o, so parameters match nn.LSTM / nn.LSTMCell):

    gates = pre + inp @ W (+ bias)      # (B, 4H); pre: (B, 4H) precomputed input part, inp: (B, K), W: (K, 4H)
    i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of the four H-blocks
    c' = f * c + i * g                  # the cell state: the "conveyor belt"
    h' = o * tanh(c')

Autograd differentiates these ops directly (backpropagation through time is just the chain rule
through the Python loop), which makes this path slow but obviously right: the oracle.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def gate_update(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """Apply the gate nonlinearities and the cell update. gates: (B, 4H), c: (B, H)."""
    i, f, g, o = gates.chunk(4, dim=-1)  # each (B, H)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_new = f * c + i * g  # (B, H)
    h_new = o * torch.tanh(c_new)  # (B, H)
    return h_new, c_new


def cell_step(
    inp: Tensor,
    c: Tensor,
    weight: Tensor,
    pre: Tensor | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One LSTM step: inp (B, K) @ weight (K, 4H) + pre (B, 4H) + bias (4H,) -> (h', c'), each (B, H).

    Computed in the dtype of `inp` (the caller's autocast decides); `c` is kept in its own dtype.
    """
    gates = inp @ weight  # (B, 4H)
    if pre is not None:
        gates = gates + pre
    if bias is not None:
        gates = gates + bias
    acc = torch.promote_types(gates.dtype, torch.float32)  # fp32 maths for bf16/fp16, fp64 stays fp64
    h_new, c_new = gate_update(gates.to(acc), c.to(acc))
    return h_new.to(inp.dtype), c_new.to(c.dtype)


def lstm_sequence(
    xproj: Tensor,
    w_hh: Tensor,
    lengths: Tensor | None = None,
    h0: Tensor | None = None,
    c0: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run one LSTM layer over a whole sequence, in D directions at once.

    xproj:   (D, B, T, 4H)  input projections x_t @ W_ih + biases, precomputed for all steps
    w_hh:    (D, H, 4H)     recurrent weights (K = H), direction 0 forward, direction 1 reversed
    lengths: (B,)           valid steps per sequence (right padding); None = all T
    h0, c0:  (D, B, H)      initial state (zeros when None)

    A padded step (t >= length) leaves h and c unchanged and outputs zeros, so the reverse
    direction starts from h0/c0 at each sequence's own last token.

    Returns out (D, B, T, H), h_n (D, B, H), c_n (D, B, H): the state after the last valid step
    (forward) or after step 0 (reverse). out and h_n have xproj's dtype; c_n is fp32 (fp64 for
    fp64 input), as the cell state is accumulated.
    """
    D, B, T, G = xproj.shape
    assert D in (1, 2), "D is 1 (forward) or 2 (forward + reverse)"
    H = G // 4
    dtype = xproj.dtype
    acc = torch.promote_types(dtype, torch.float32)  # the cell state is carried in fp32 (or fp64)
    h = xproj.new_zeros(D, B, H) if h0 is None else h0.to(dtype)
    c = xproj.new_zeros(D, B, H, dtype=acc) if c0 is None else c0.to(acc)
    if lengths is not None:
        steps = torch.arange(T, device=xproj.device)
        valid = steps[None, :] < lengths.to(xproj.device)[:, None]  # (B, T)
    outs: list[list[Tensor]] = [[None] * T for _ in range(D)]  # type: ignore[list-item]
    hs, cs = list(h.unbind(0)), list(c.unbind(0))
    for d in range(D):
        order = range(T - 1, -1, -1) if d == 1 else range(T)
        for t in order:
            h_new, c_new = cell_step(hs[d], cs[d], w_hh[d], pre=xproj[d, :, t])
            if lengths is not None:
                m = valid[:, t, None]  # (B, 1)
                hs[d] = torch.where(m, h_new, hs[d])
                cs[d] = torch.where(m, c_new, cs[d])
                outs[d][t] = torch.where(m, h_new, torch.zeros_like(h_new))
            else:
                hs[d], cs[d] = h_new, c_new
                outs[d][t] = h_new
    out = torch.stack([torch.stack(o, dim=1) for o in outs], dim=0)  # (D, B, T, H)
    return out, torch.stack(hs, 0), torch.stack(cs, 0)


def log_softmax_topk(
    logits: Tensor, k: int, row_bias: Tensor | None = None, banned: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """A decoding step's candidates: the k largest of row_bias[:, None] + log_softmax(logits.float())
    per row, the `banned` columns at -inf, best first, ties to the lower column (a stable sort).
    logits (N, V), row_bias (N,), banned (NB,) -> values (N, k) fp32, columns (N, k) int64.
    The oracle of `search_topk.py`'s kernel."""
    v = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    if row_bias is not None:
        v = v + row_bias.float().unsqueeze(-1)
    if banned is not None and banned.numel():
        v = v.index_fill(1, banned, float("-inf"))
    vals, cols = v.sort(dim=-1, descending=True, stable=True)
    return vals[:, :k], cols[:, :k]


def cross_entropy_sums(
    logits: Tensor, target: Tensor, label_smoothing: float = 0.0, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """The training loss: logits (N, V), target (N,) -> (the label-smoothed cross-entropy summed
    over the rows whose target is not `ignore_index`, the same without smoothing), both fp32, on
    the logits in fp32. The NLL sum carries no gradient. The oracle of `cross_entropy.py`'s kernel."""
    logits = logits.float()  # (N, V)
    loss_sum = F.cross_entropy(
        logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="sum"
    )
    with torch.no_grad():
        nll_sum = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    return loss_sum, nll_sum


def attention_context(scores: Tensor, memory: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Attention's second half: scores (B, S), memory (B, S, M), mask (B, S) True at real tokens
    -> context (B, M) in memory's dtype, weights (B, S) fp32 (softmax over the real tokens)."""
    scores = scores.float().masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)  # (B, S), fp32
    context = torch.bmm(weights.unsqueeze(1).to(memory.dtype), memory).squeeze(1)  # (B, M)
    return context, weights


def attention_step(query: Tensor, keys: Tensor, memory: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Luong attention with multiplicative scores (dot, general: keys = W_a memory, computed once
    per sentence), one decoder step: query (B, Q), keys (B, S, Q), memory (B, S, M), mask (B, S)
    -> context (B, M), weights (B, S) fp32. The scores are `keys @ query` in keys' dtype (under
    autocast a bf16 bmm), then fp32. The oracle of `decode_attention.py`'s kernel."""
    scores = torch.bmm(keys, query.unsqueeze(2).to(keys.dtype)).squeeze(2)  # (B, S)
    return attention_context(scores, memory, mask)


# ----------------------------------------------------------------------------- search bookkeeping
def greedy_update(
    best: Tensor,
    tok: Tensor,
    attn: Tensor,
    limit: Tensor,
    t: Tensor,
    done: Tensor,
    scores: Tensor,
    tok_hist: Tensor,
    attn_hist: Tensor,
    eos: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """A greedy-search step's decisions from each row's best log-prob and token:

        best (N,) fp32, tok (N,) int64     each row's best continuation this step
        attn (N, S)                        this step's attention, any float dtype
        limit (N,) int64, t () int64       the length limits, the steps taken before this one
        done (N,) bool, scores (N,) fp32   rows finished (they then emit EOS at no cost), sums of log-probs
        tok_hist (T, N) int64, attn_hist (T, N, S) fp32   the history: row t is written in place

    Returns the new tokens (N,), scores (N,) and done flags (N,): a row is done after EOS or at
    its limit. The oracle of `search_greedy.greedy_update`, which writes them in place."""
    tok = tok.masked_fill(done, eos)
    tok_hist.index_copy_(0, t.view(1), tok.unsqueeze(0))
    attn_hist.index_copy_(0, t.view(1), attn.float().unsqueeze(0))
    new_done = done | (tok == eos) | (t + 1 >= limit)
    return tok, scores + best.masked_fill(done, 0.0), new_done


def best_candidates(val: Tensor, col: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """A sentence's k best candidates from its beams' own best (val, col: (n, K, r), each beam's
    best first), best first, as `search_beam._beam_update_kernel` picks them: equal values go
    to the lower beam, then the better rank within the beam. Returns their values, beams and
    tokens, each (n, k). A stable sort, not `topk`, whose order among equal values is
    unspecified (on CUDA and CPU alike): an untrained bf16 model's log-probs tie often, and the
    two paths' outputs would differ on ties. `beam_update` takes what it returns."""
    n, K, r = val.shape
    j = val.view(n, K * r).sort(dim=-1, descending=True, stable=True).indices[:, :k]  # (n, k)
    return val.view(n, K * r).gather(1, j), j // r, col.reshape(n, K * r).gather(1, j)


def beam_update(
    top_s: Tensor,
    top_beam: Tensor,
    top_tok: Tensor,
    attn: Tensor,
    limit: Tensor,
    sent: Tensor,
    t: Tensor,
    lp_table: Tensor,
    done: Tensor,
    fin: tuple[Tensor, Tensor, Tensor],
    tok_hist: Tensor,
    bp_hist: Tensor,
    attn_hist: Tensor,
    eos: int,
    nbest: int,
    skip_idle_merge: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
    """A beam-search step's decisions for n sentences of K beams (the rules: `mt.search`'s docstring):

        top_s (n, k2) fp32                 each sentence's k2 best candidates' scores, best first
                                           (`best_candidates`, or a topk over all K * V)
        top_beam, top_tok (n, k2) int64    the beam each extends, and its token
        attn (n*K, S)                      this step's attention of every beam row, any float dtype
        limit (n,) int64, t () int64       the length limits, the steps taken before this one
        sent (n,) int64                    each sentence's row in the history (its original index)
        lp_table (T + 2,) fp64             lp(length) for every length
        done (n,) bool                     sentences finished (frozen)
        fin                                the K best finished hypotheses, best first: ranking score
                                           (n, K) fp64 (-inf: empty), log-prob (n, K) fp32,
                                           (step, beam, last token) (n, K, 3) int64
        tok_hist, bp_hist (T, n0, K) int64, attn_hist (T, n0, K, S) fp32
                                           the history: row (t, sent[i]) written in place

    Returns the continuing beams' tokens (n*K,), the row each continues (n*K,: the decoder
    state's reorder), their scores (n, K), the done flags (n,) and the finished lists.
    skip_idle_merge: skip the merge when nothing closes (`fin` is then returned as it is); it
    reads a flag back to the host, which costs nothing on CPU. The oracle of
    `search_beam.beam_update`, which writes all of it in place."""
    n, K = fin[0].shape
    k2 = top_s.shape[1]
    is_eos = top_tok == eos
    length = t + 1  # () scored tokens per hypothesis, EOS included
    at_limit = length >= limit  # (n,)

    def lp(x: Tensor) -> Tensor:  # (1,) for a scalar: index_select, as indexing with a 0-d tensor reads it back
        return lp_table.index_select(0, x.view(-1))

    # Candidates among the best K that close a hypothesis: EOS, or anything at the limit.
    closing = (is_eos[:, :K] | at_limit.unsqueeze(-1)) & torch.isfinite(top_s[:, :K]) & ~done.unsqueeze(-1)
    if not skip_idle_merge or bool(closing.any()):
        # the K best of the finished ones and the closing ones; a stable sort keeps earlier ones first on ties
        new = (top_s[:, :K].double() / lp(length)).masked_fill(~closing, float("-inf"))
        merged = torch.cat([fin[0], new], dim=1)  # (n, 2K)
        keep = merged.sort(dim=1, descending=True, stable=True).indices[:, :K]  # (n, K)
        info = torch.stack([t.expand(n, K), top_beam[:, :K], top_tok[:, :K]], dim=-1)  # (n, K, 3)
        fin = (
            merged.gather(1, keep),
            torch.cat([fin[1], top_s[:, :K].float()], dim=1).gather(1, keep),
            torch.cat([fin[2], info], dim=1).gather(1, keep.unsqueeze(-1).expand(n, K, 3)),
        )

    # The K best candidates that do not end in EOS continue (a stable order keeps best first).
    order = is_eos.long() * k2 + torch.arange(k2, device=top_s.device)  # (n, k2)
    pos = order.argsort(dim=-1)[:, :K]  # (n, K) distinct keys: non-EOS by rank, then EOS by rank
    if k2 < 2 * K:  # (V = 1) fewer than K non-EOS candidates: keep the rank order
        pos = pos.sort(dim=-1).values
    beam, tok, score = top_beam.gather(1, pos), top_tok.gather(1, pos), top_s.gather(1, pos)  # (n, K) each

    # A sentence is done at its limit, with nothing open, or with K finished hypotheses of
    # which the nbest-th beats the best any open one can still reach.
    best_open = score[:, 0].double()  # (n,)
    lp_lo, lp_hi = lp(length + 1), lp(torch.maximum(limit, length + 1))
    bound = torch.maximum(best_open / lp_lo, best_open / lp_hi)  # lp is monotonic: an end is the best
    full = torch.isfinite(fin[0]).sum(dim=1) >= K
    done = done | at_limit | ~torch.isfinite(best_open) | (full & (bound <= fin[0][:, nbest - 1]))

    # history (by original sentence), then the open beams move on
    at = t * tok_hist.shape[1] + sent  # (n,) rows of the flattened (T * n0) history
    tok_hist.view(-1, K).index_copy_(0, at, tok)
    bp_hist.view(-1, K).index_copy_(0, at, beam)
    attn_hist.view(-1, K, attn_hist.shape[-1]).index_copy_(0, at, attn.float().view(n, K, -1))
    rows = (torch.arange(n, device=beam.device).unsqueeze(-1) * K + beam).view(-1)  # (n*K,) the row each continues
    return tok.view(-1), rows, score, done, fin


def gather_rows(rows: Tensor, srcs: list[Tensor], dsts: list[Tensor]) -> None:
    """dsts[i][r] = srcs[i][rows[r]] in dsts[i]'s dtype: rows (N,) int64, srcs[i] and dsts[i]
    (N, H_i) (the decoder state's h and c of every layer, and the input feed). One index_select
    each. The oracle of `search_beam.gather_rows` (one launch for all)."""
    for dst, src in zip(dsts, srcs, strict=True):
        if dst.dtype == src.dtype:
            torch.index_select(src, 0, rows, out=dst)
        else:
            dst.copy_(src.index_select(0, rows))


def backtrack(tok: np.ndarray, bp: np.ndarray, attn: Tensor, info: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Follow the back-pointers of n sentences' m finished hypotheses each, on the host.
    tok, bp (steps, n, K): the token each beam took at step t and the beam (before step t's
    reorder) it continues; attn (steps, n, K, S) the attention of every beam row at step t;
    info (n, m, 3) where each hypothesis closed: (step e, beam, last token). Returns tokens
    (n, m, L) and attention (n, m, L, S), L = max(steps, 1): hypothesis (i, k) has its tokens at
    [0, e) and attention rows at [0, e]; the other entries are meaningless.
    The oracle of `search_beam.backtrack`, the same walk on the device."""
    steps, n, K = tok.shape
    m, S, L = info.shape[1], attn.shape[-1], max(steps, 1)
    end, cur = info[..., 0], info[..., 1].copy()  # (n, m)
    # Walking back from where it closed: at step t the hypothesis sat in beam cur (after step
    # t's reorder), took token tok[t, i, cur], and came from row bp[t, i, cur], the row whose
    # attention step t is. Past its end a hypothesis stands still (its entries there are unused).
    beams = np.empty((L, n, m), dtype=np.int64)  # (L, n, m) the row that computed each step
    beams[:] = cur
    tokens = np.zeros((n, m, L), dtype=np.int64)
    first = (np.arange(n, dtype=np.int64) * K)[:, None]  # (n, 1) each sentence's first beam
    tok_f, bp_f = tok.reshape(steps, n * K), bp.reshape(steps, n * K)
    for t in range(min(steps, int(end.max(initial=0))) - 1, -1, -1):  # later steps: no hypothesis is open
        at = first + cur
        tokens[:, :, t] = tok_f[t].take(at)
        cur = np.where(t < end, bp_f[t].take(at), cur)
        beams[t] = cur
    if not steps:
        return tokens, np.zeros((n, m, L, S), dtype=np.float32)
    # each hypothesis' attention rows: one gather from the flattened (steps * n * K, S) history
    rows = (np.arange(steps)[:, None, None] * n + np.arange(n)[None, :, None]) * K + beams[:steps]  # (steps, n, m)
    a = attn.reshape(steps * n * K, S).numpy()[rows.transpose(1, 2, 0)]  # (n, m, steps, S)
    return tokens, a
