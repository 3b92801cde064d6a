"""Greedy search's bookkeeping kernel, mt/kernels/search_greedy.py (under the CPU interpreter),
against `_GreedySearch.advance` (the PyTorch reference).

Where there is no GPU the kernels run on CPU tensors through the Triton interpreter; on a GPU
machine the cases marked gpu run the compiled kernels on CUDA (tests/kernel_utils.py).
"""

from __future__ import annotations

import pytest
import torch
from kernel_utils import (
    assert_same_decodes,
    compiled,
    decodes_with_and_without_search_kernels,
    interpreted,
    kernel_module,
)

pytest.importorskip("triton")


@interpreted
@pytest.mark.parametrize("in_place, S", [(False, 7), (True, 300)])
def test_greedy_update_kernel_matches_advance(in_place, S):
    """`_GreedySearch.advance_fused` (one Triton launch, plus the state's gather under graphs)
    against `advance` (the PyTorch bookkeeping) fed the same best tokens: every state tensor and
    the histories equal over steps with EOS, length limits and rows already done; S = 300: the
    attention row in three tiles."""
    search_greedy = kernel_module("search_greedy")
    from mt.model import DecoderState, Memory
    from mt.search import _GreedySearch

    N, H, T, eos = 9, 4, 8, 3
    g = torch.Generator().manual_seed(S)
    limit = torch.tensor([8, 2, 5, 1, 8, 3, 8, 6, 7])

    def make():
        memory = Memory(torch.zeros(N, S, H), torch.zeros(N, S, H), torch.ones(N, S, dtype=torch.bool), "triton")
        dec = DecoderState(
            [torch.zeros(N, H) for _ in range(2)], [torch.zeros(N, H) for _ in range(2)], torch.zeros(N, H)
        )
        search = _GreedySearch(memory, dec, limit.clone(), T, 2, eos, [0, 2])
        search.in_place = in_place
        search.reset(N - 1)  # the last row is padding: done from the start
        return search

    ref, fused = make(), make()
    for step in range(T):
        best = -torch.rand(N, generator=g) * 3
        tok = torch.randint(4, 50, (N,), generator=g)
        tok[torch.rand(N, generator=g) < 0.2] = eos
        dec = DecoderState(
            [torch.randn(N, H, generator=g) for _ in range(2)],
            [torch.randn(N, H, generator=g) for _ in range(2)],
            torch.randn(N, H, generator=g),
        )
        attn = torch.rand(N, S, generator=g).to(torch.bfloat16)
        prev = fused.state
        ref.state = ref.advance(ref.state, best, tok, dec, attn)
        fused.state = fused.advance_fused(prev, best, tok, dec, attn)
        a, b = ref.state, fused.state
        assert torch.equal(a.t, b.t) and torch.equal(a.done, b.done), step
        assert torch.equal(a.scores, b.scores) and torch.equal(a.last, b.last), step
        if in_place:  # the decoder state copied into the static buffers (one gather launch)
            assert b.dec.h[0] is prev.dec.h[0]
            assert all(torch.equal(x, y) for x, y in zip(dec.h + dec.c + [dec.feed], b.dec.h + b.dec.c + [b.dec.feed]))
        else:  # the step's own
            assert b.dec is dec
        assert b.scores is prev.scores and b.done is prev.done  # updated in place, nothing to copy back
        assert torch.equal(ref.tok_hist, fused.tok_hist) and torch.equal(ref.attn_hist, fused.attn_hist), step
        if bool(a.done.all()):
            break
    assert bool(ref.state.done.all())  # EOS and the limits stopped every row...
    first_eos = [row.index(eos) if eos in row else T for row in ref.tok_hist.t().tolist()]
    assert any(e + 1 < lim for e, lim in zip(first_eos, limit.tolist())), "no row stopped at EOS before its limit"
    # a step past the history (which the search never takes) writes nothing: histories that are
    # the first T rows of larger buffers keep the row after them
    tok_buf, attn_buf = torch.full((T + 1, N), -7), torch.full((T + 1, N, S), -7.0)
    tok_buf[:T], attn_buf[:T] = fused.tok_hist, fused.attn_hist
    s = fused.state
    s.t.fill_(T)
    search_greedy.greedy_update(
        best, tok, attn, fused.limit, s.t, s.done, s.scores, s.last, tok_buf[:T], attn_buf[:T], eos
    )
    assert (tok_buf[T] == -7).all() and (attn_buf[T] == -7).all()
    assert torch.equal(tok_buf[:T], fused.tok_hist) and torch.equal(attn_buf[:T], fused.attn_hist)


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_greedy_search_kernels_on_cuda_decode_as_pytorch(monkeypatch, amp):
    """Greedy search on CUDA with the compiled bookkeeping kernel (`greedy_update`, and the state's
    gather under graphs) against the same search with PyTorch's ops, under CUDA graphs and
    eagerly: the same outputs."""
    assert_same_decodes(decodes_with_and_without_search_kernels(monkeypatch, "cuda", 1, amp))
