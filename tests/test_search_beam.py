"""Beam search's kernels, mt/kernels/search_beam.py (under the CPU interpreter): the step's
bookkeeping against `_BeamSearch.advance` (the PyTorch reference), the walk back of the output
against a plain per-hypothesis walk, the decoder state's gather against index_select, and what
each refuses.

Where there is no GPU the kernels run on CPU tensors through the Triton interpreter; on a GPU
machine the cases marked gpu run the compiled kernels on CUDA (tests/kernel_utils.py).
"""

from __future__ import annotations

import pytest
import torch
from kernel_utils import (
    assert_same_decodes,
    compiled,
    cpu,
    cuda,
    decodes_with_and_without_search_kernels,
    interpreted,
    kernel_module,
)

pytest.importorskip("triton")


def _candidates(g: torch.Generator, n: int, K: int, V: int, eos: int, step: int, eos_rate: float):
    """What the fused top-k hands the bookkeeping: per beam row its 2K best (score + log-prob,
    best first) and their distinct tokens. Values on a 0.25 grid, so ties are common (across
    beams, and between finished hypotheses); at step 0 only beam 0 exists (the others -inf)."""
    R = 2 * K
    val = (-torch.randint(0, 40, (n * K, R), generator=g).float() / 4).sort(dim=1, descending=True).values
    if step == 0:
        val.view(n, K, R)[:, 1:] = float("-inf")
    col = torch.stack([torch.randperm(V, generator=g)[:R] for _ in range(n * K)])  # (n*K, R) distinct
    hit = torch.rand(n * K, generator=g) < eos_rate  # rows that have EOS among their candidates
    col[hit, torch.randint(0, R, (int(hit.sum()),), generator=g)] = eos
    col[hit] = torch.where((col[hit] == eos).cumsum(1) > 1, (col[hit] + 1) % V, col[hit])  # EOS once a row
    return val, col


@interpreted
@pytest.mark.parametrize(
    "K, nbest, lp, in_place, n, S",
    [
        (1, 1, None, False, 16, 7),
        (2, 2, 1.0, True, 16, 7),
        (3, 1, "avg", False, 10, 7),
        (5, 2, 0.6, True, 6, 7),
        (8, 8, None, True, 3, 260),
    ],
)
def test_beam_update_kernel_matches_advance(K, nbest, lp, in_place, n, S):
    """`advance_fused` (one Triton launch) against `advance` (the PyTorch bookkeeping) fed the
    same candidates in the same order: every state tensor, the history and the decoded
    hypotheses equal, over steps with EOS, length limits, ties, finished sentences and a
    sentence retired from the batch (eager mode's shrinking batch). S = 260: attention rows
    of three tiles."""
    kernel_module("search_beam")
    from mt.kernels.reference import best_candidates
    from mt.model import DecoderState, Memory
    from mt.search import _BeamSearch

    H, V, T, eos = 4, 50, 12, 3
    g = torch.Generator().manual_seed(K * 100 + nbest)
    limit = torch.tensor([12, 3, 7, 1, 12, 5, 12, 10, 12, 11, 12, 9, 12, 6, 12, 12])[:n]

    def make():
        memory = Memory(
            torch.zeros(n * K, S, H), torch.zeros(n * K, S, H), torch.ones(n * K, S, dtype=torch.bool), "triton"
        )
        dec = DecoderState(
            [torch.zeros(n * K, H) for _ in range(2)], [torch.zeros(n * K, H) for _ in range(2)], torch.zeros(n * K, H)
        )
        search = _BeamSearch(memory, dec, limit.clone(), T, K, nbest, lp, 2, eos, [0, 2])
        search.in_place = in_place
        return search

    ref, fused = make(), make()
    early = 0  # sentences stopped by the bound (no open hypothesis can win) before their limit
    for step in range(T):
        s = ref.state
        nw = s.scores.shape[0]
        val, col = _candidates(g, nw, K, V, eos, step, eos_rate=0.6)
        dec = DecoderState(
            [torch.randn(nw * K, H, generator=g) for _ in range(2)],
            [torch.randn(nw * K, H, generator=g) for _ in range(2)],
            torch.randn(nw * K, H, generator=g),
        )
        attn = torch.rand(nw * K, S, generator=g).to(torch.bfloat16)
        top_s, top_beam, top_tok = best_candidates(val.view(nw, K, -1), col.view(nw, K, -1), 2 * K)  # what step() does
        ref.state = ref.advance(s, top_s, top_beam, top_tok, dec, attn)
        prev = fused.state
        fused.state = fused.advance_fused(prev, val, col, dec, attn)
        a, b = ref.state, fused.state
        early += int((a.done & ~s.done & (a.t < ref.limit) & torch.isfinite(a.scores[:, 0])).sum())
        assert torch.equal(a.t, b.t) and torch.equal(a.done, b.done), step
        assert torch.equal(a.scores, b.scores) and torch.equal(a.last, b.last), step
        assert all(torch.equal(x, y) for x, y in zip(a.fin, b.fin)), (step, a.fin, b.fin)
        assert all(
            torch.equal(x, y) for x, y in zip(a.dec.h + a.dec.c + [a.dec.feed], b.dec.h + b.dec.c + [b.dec.feed])
        )
        assert b.scores is prev.scores and b.fin[2] is prev.fin[2]  # updated in place, nothing to copy back
        assert (b.dec.c[1] is prev.dec.c[1]) == in_place  # the decoder state too, on static buffers
        for name in ("tok_hist", "bp_hist", "attn_hist"):
            assert torch.equal(getattr(ref, name), getattr(fused, name)), (step, name)
        done = a.done.tolist()
        if all(done):
            break
        if step == 1 and not any(done[:2]) and len(done) > 2:  # sentence 1 leaves the batch (eager search)
            keep = [i for i in range(len(done)) if i != 1]
            ref.state, fused.state = ref.retire(a, [1], keep), fused.retire(b, [1], keep)
    assert early > 0 or n < 10, "the scenario never stopped a sentence early"
    assert torch.isfinite(ref.state.fin[0]).any(), "no hypothesis closed"
    ref.finish(), fused.finish()
    steps = int(ref.state.t)
    x, y = ref.output(steps, n, [S] * n), fused.output(steps, n, [S] * n)
    assert x.tokens == y.tokens and x.scores == y.scores
    assert [[(h.tokens, h.log_prob) for h in hs] for hs in x.nbest] == [
        [(h.tokens, h.log_prob) for h in hs] for hs in y.nbest
    ]


@interpreted
def test_beam_update_stops_when_the_best_open_hypothesis_only_ties():
    """K = 1: EOS and another token tie at -1.0; EOS (the lower column) closes a hypothesis, the
    other stays open with the same score, which cannot beat it: the sentence is done, in both."""
    kernel_module("search_beam")
    from mt.model import DecoderState, Memory
    from mt.search import _BeamSearch

    for fused in (False, True):
        memory = Memory(torch.zeros(1, 2, 1), torch.zeros(1, 2, 1), torch.ones(1, 2, dtype=torch.bool), "triton")
        dec = DecoderState([torch.zeros(1, 1)], [torch.zeros(1, 1)], torch.zeros(1, 1))
        search = _BeamSearch(memory, dec, torch.tensor([5]), 5, 1, 1, None, 2, 3, [2])
        val, col = torch.tensor([[-1.0, -1.0]]), torch.tensor([[3, 7]])
        s = search.state
        if fused:
            s = search.advance_fused(s, val, col, dec, torch.ones(1, 2))
        else:
            s = search.advance(s, val, torch.zeros(1, 2, dtype=torch.long), col, dec, torch.ones(1, 2))
        assert s.done.tolist() == [True] and s.fin[0][0, 0].item() == -1.0 and s.fin[2][0, 0].tolist() == [0, 0, 3]
        assert s.last.tolist() == [7] and s.scores.tolist() == [[-1.0]]


@pytest.mark.parametrize(
    "device, T, n0, n, K, m, S",
    [
        cpu(9, 6, 6, 3, 2, 5),
        cpu(12, 7, 4, 5, 5, 3),
        cpu(3, 2, 2, 2, 1, 300),
        cuda(40, 128, 128, 5, 1, 20),
        cuda(41, 64, 50, 5, 5, 33),
    ],
)
def test_backtrack_kernel_follows_the_back_pointers(device, T, n0, n, K, m, S):
    """`search_beam.backtrack` (beam search's output on the device, one launch) against a plain
    per-hypothesis walk on random histories (every token and attention row it defines; the
    host's `reference.backtrack` has the same test in test_search.py); `steps` below the history's
    length, sentences [0, n). On CUDA, the compiled kernel at the beam-5 bench's batch (128
    sentences, the best hypothesis each) and with all 5 hypotheses of part of a batch."""
    from conftest import assert_walked_back, random_beam_history

    search_beam = kernel_module("search_beam")
    tok, bp, attn, info = history = random_beam_history(T * 10 + n, T, n0, K, S)
    steps = T - 1
    info[..., 0].clamp_(max=steps - 1)
    tok, bp, attn, info = (x.to(device) for x in history)
    tokens, a = search_beam.backtrack(info, tok, bp, attn, n, m, steps)
    assert tokens.shape == (n, m, steps) and a.shape == (n, m, steps, S)
    assert_walked_back(history, tokens.cpu(), a.cpu(), n, m)
    with pytest.raises(ValueError, match="steps"):
        search_beam.backtrack(info, tok, bp, attn, n, m, T + 1)
    assert search_beam.backtrack_supported(attn)
    assert not search_beam.backtrack_supported(attn.double())
    # any source length: the rows go in tiles
    assert search_beam.backtrack_supported(torch.zeros(1, 1, 1, 5000, device=device))


@pytest.mark.parametrize("device, layers, H, N", [cpu(1, 40, 12), cpu(4, 16, 12), cuda(2, 512, 640)])
def test_gather_rows_moves_the_decoder_state_in_one_launch(device, layers, H, N):
    """`search_beam.gather_rows`: every destination row is its source's row `rows[r]` (repeats
    and all), cast to the destination's dtype (bf16 h, fp32 c, a bf16 feed into fp32), as
    index_select gives; 1 to MAX_STATE tensors. (A widening cast: the interpreter rounds fp32
    to bf16 differently from PyTorch.) On CUDA, the compiled kernel at the beam-5 bench's rows,
    with an fp32 feed into bf16: the narrowing cast rounds as PyTorch's does."""
    search_beam = kernel_module("search_beam")
    g = torch.Generator().manual_seed(layers)
    narrow = device == "cuda"
    rows = torch.randint(0, N, (N,), generator=g).to(device)
    rows[:3] = 5  # the same beam continued three times
    srcs = [torch.randn(N, H, generator=g).to(device, torch.bfloat16) for _ in range(layers)]  # h
    srcs += [torch.randn(N, H, generator=g).to(device) for _ in range(layers)]  # c, fp32
    feed = torch.float32 if narrow else torch.bfloat16
    srcs += [torch.randn(N, H, generator=g).to(device, feed)]  # the feed, into the other dtype below
    dsts = [
        torch.full(
            (N, H),
            7.0,
            device=device,
            dtype=torch.bfloat16 if i < layers or (narrow and i == 2 * layers) else torch.float32,
        )
        for i in range(2 * layers + 1)
    ]
    assert len(srcs) <= search_beam.MAX_STATE and search_beam.gather_rows_supported(rows, srcs, dsts)
    search_beam.gather_rows(rows, srcs, dsts)
    for src, dst in zip(srcs, dsts):
        assert torch.equal(dst, src.index_select(0, rows).to(dst.dtype))


@interpreted
def test_gather_rows_refuses_what_it_cannot_take():
    search_beam = kernel_module("search_beam")
    rows, a, b = torch.zeros(4, dtype=torch.long), torch.zeros(4, 8), torch.zeros(4, 8)
    assert search_beam.gather_rows_supported(rows, [a], [b])
    assert not search_beam.gather_rows_supported(rows, [a], [a])  # in place: rows would overwrite their sources
    assert not search_beam.gather_rows_supported(rows, [a], [b[:, :4]])  # another H, and strided
    assert not search_beam.gather_rows_supported(rows, [a.t().contiguous().t()], [b])  # not contiguous
    assert not search_beam.gather_rows_supported(rows, [a] * 10, [torch.zeros(4, 8) for _ in range(10)])  # > MAX_STATE
    assert not search_beam.gather_rows_supported(rows[:3], [a], [b])  # a row index per destination row
    assert not search_beam.gather_rows_supported(rows, [a, a.clone()], [b, b])  # two pairs into one tensor
    assert not search_beam.gather_rows_supported(rows.int(), [a], [b])  # int64 rows only
    assert not search_beam.gather_rows_supported(rows, [a.view(4, 2, 4)], [b])  # (N, H) tensors only
    assert not search_beam.gather_rows_supported(torch.zeros(8, dtype=torch.long)[::2], [a], [b])  # strided rows


@interpreted
def test_beam_update_refuses_what_it_cannot_take():
    search_beam = kernel_module("search_beam")
    val = torch.zeros(6, 4)
    assert search_beam.supported(val, 2, 50, 7)
    assert not search_beam.supported(val, 2, 3, 7)  # V < 2K: fewer than 2K candidates per beam
    assert not search_beam.supported(val, 3, 50, 7)  # not each beam's 2K best
    assert search_beam.supported(val, 2, 50, 5000)  # any source length: the attention rows go in tiles
    K = search_beam.MAX_BEAM
    assert search_beam.supported(torch.zeros(2 * K, 2 * K), K, 100, 7)
    assert not search_beam.supported(torch.zeros(2 * K + 2, 2 * K + 2), K + 1, 100, 7)  # more beams: PyTorch's ops
    with pytest.raises(ValueError, match="contiguous"):
        z = torch.zeros
        search_beam.beam_update(
            val,
            val.long(),
            z(6, 7),
            z(3).long(),
            z(3).long(),
            z(()).long(),
            z(12).double(),
            z(3).bool(),
            (z(3, 2).double(), z(3, 2), z(3, 2, 3).long()),
            z(2, 3).t(),
            z(6).long(),
            z(6).long(),
            z(9, 3, 2).long(),
            z(9, 3, 2).long(),
            z(9, 3, 2, 7),
            3,
            1,
        )


def _beam_update_args(limit: int, t: int, T: int = 9, n: int = 3, K: int = 2, S: int = 7) -> dict:
    """Valid beam_update arguments: n open sentences of K beams at step t of a T-step history,
    every sentence's length limit `limit`, candidates from `_candidates`."""
    g = torch.Generator().manual_seed(5)
    val, col = _candidates(g, n, K, 50, 3, step=1, eos_rate=0.5)
    z = torch.zeros
    return dict(
        val=val,
        col=col,
        attn=torch.rand(n * K, S, generator=g),
        limit=torch.full((n,), limit),
        sent=torch.arange(n),
        t=torch.tensor(t),
        lp_table=torch.arange(1, T + 3, dtype=torch.float64),
        done=z(n, dtype=torch.bool),
        fin=(
            torch.full((n, K), float("-inf"), dtype=torch.float64),
            torch.full((n, K), float("-inf")),
            z(n, K, 3, dtype=torch.long),
        ),
        scores=z(n, K),
        last=z(n * K, dtype=torch.long),
        rows=z(n * K, dtype=torch.long),
        tok_hist=z(T, n, K, dtype=torch.long),
        bp_hist=z(T, n, K, dtype=torch.long),
        attn_hist=z(T, n, K, S),
        eos=3,
        nbest=1,
    )


@interpreted
def test_beam_update_checks_shapes_and_stays_inside_the_length_penalty_table():
    """Wrong shapes are a ValueError, not stores to the wrong rows; and the length-penalty
    table (T + 2 entries) is read within its bounds whatever the limit (a limit past the
    history reads the last entry, as a limit of T + 1 does)."""
    search_beam = kernel_module("search_beam")
    for name, bad in (
        ("attn_hist", torch.zeros(9, 3, 2, 6)),
        ("val", torch.zeros(6, 3)),
        ("limit", torch.zeros(2)),
        ("lp_table", torch.zeros(10, dtype=torch.float64)),
    ):
        with pytest.raises(ValueError, match=name):
            search_beam.beam_update(**{**_beam_update_args(5, 2), name: bad})
    outs = []
    for limit in (9 + 1, 10**9):
        args = _beam_update_args(limit, t=8)
        search_beam.beam_update(**args)
        outs.append(
            [args[k] for k in ("done", "scores", "last", "rows", "tok_hist", "bp_hist", "attn_hist")]
            + list(args["fin"])
        )
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    assert outs[0][4][8].any()  # the last step's tokens were written


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_beam_search_kernels_on_cuda_decode_as_pytorch(monkeypatch, amp):
    """Beam search (5) on CUDA with the compiled bookkeeping kernels (`beam_update`, `gather_rows`,
    `backtrack`) against the same search with PyTorch's ops and the host's walk back, under CUDA
    graphs and eagerly: the same outputs (an untrained bf16 model's log-probs tie often)."""
    assert_same_decodes(decodes_with_and_without_search_kernels(monkeypatch, "cuda", 5, amp))
