"""The LSTM gate cell in plain PyTorch: the reference every other backend is tested against.

One step (gates stacked in PyTorch's order i, f, g, o, so parameters match nn.LSTM / nn.LSTMCell):

    gates = pre + inp @ W (+ bias)      # (B, 4H); pre: (B, 4H) precomputed input part, inp: (B, K), W: (K, 4H)
    i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of the four H-blocks
    c' = f * c + i * g                  # the cell state: the "conveyor belt"
    h' = o * tanh(c')

Autograd differentiates these ops directly (backpropagation through time is just the chain rule
through the Python loop), which makes this path slow but obviously right: the oracle.
"""

from __future__ import annotations

import torch
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
