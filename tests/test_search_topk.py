"""A search step's fused log-softmax and top-k, mt/kernels/search_topk.py (under the CPU
interpreter), against `reference.log_softmax_topk`: values, columns, ties, banned columns, rows
in chunks, the dispatch; and greedy and beam search with all the fused decoding kernels against
the same search with PyTorch's ops.

Where there is no GPU the kernels run on CPU tensors through the Triton interpreter; on a GPU
machine the cases marked gpu run the compiled kernels on CUDA (tests/kernel_utils.py).
"""

from __future__ import annotations

import pytest
import torch
from kernel_utils import cpu, cuda, interpreted, kernel_module

from mt import kernels
from mt.kernels import reference

pytest.importorskip("triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "device, N, V, k",
    [
        cpu(7, 50, 10),
        cpu(12, 1000, 10),
        cpu(4, 64, 1),
        cpu(5, 3, 3),
        cpu(3, 33, 33),
        cpu(5, 3000, 10),
        cpu(4, 1030, 10),
        cpu(2, 1300, 64),
        cpu(3, 1100, 1),
        cuda(640, 8000, 10),
        cuda(128, 8000, 1),
        cuda(37, 50, 10),
    ],
)
def test_log_softmax_topk_triton_matches_reference(dtype, device, N, V, k):
    """The fused search kernels: the k best of bias + log_softmax, banned columns never picked
    (unless nothing else is left), a row of -inf bias still returns k columns. Rows wider than
    ROW_V go through chunks (1030: a last chunk of 6 columns, fewer than k). On CUDA, the
    compiled kernels at the beam-5 bench's shape (640 rows of 8000), greedy's (k = 1) and a
    small one."""
    search_topk = kernel_module("search_topk")
    g = torch.Generator().manual_seed(N * V + k)
    logits = (torch.randn(N, V, generator=g) * 4).to(device=device, dtype=dtype)
    bias = (torch.randn(N, generator=g) - 3).to(device)
    bias[1] = float("-inf")  # a beam that does not exist yet
    banned = (torch.tensor([0, 2]) if V > 3 else torch.tensor([1])).to(device)
    vals, cols = search_topk.log_softmax_topk(logits, k, row_bias=bias, banned=banned)
    ref_vals, ref_cols = reference.log_softmax_topk(logits, k, row_bias=bias, banned=banned)
    assert vals.shape == (N, k) and vals.dtype == torch.float32 and cols.dtype == torch.int64
    torch.testing.assert_close(vals, ref_vals, atol=1e-5, rtol=1e-5)
    # columns: each picked one holds its value (near-ties may swap two columns' order)
    full = reference.log_softmax_topk(logits, V, row_bias=bias, banned=banned)
    by_col = torch.empty(N, V, device=device).scatter_(
        1, full[1], full[0]
    )  # (N, V) the reference value of every column
    finite = torch.isfinite(ref_vals)
    torch.testing.assert_close(by_col.gather(1, cols)[finite], vals[finite], atol=1e-5, rtol=1e-5)
    assert all(len(set(r)) == k for r in cols.tolist())  # no column twice
    assert ((cols >= 0) & (cols < V)).all()
    if V > k + len(banned):
        assert not torch.isin(cols[finite], banned).any()
    assert cols[1].tolist() == list(range(k))  # all -inf: the lowest columns, banned or not


@interpreted
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract")  # interpreter: -inf - (-inf), masked
def test_log_softmax_topk_ties_go_to_the_lower_column():
    search_topk = kernel_module("search_topk")
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 2.0]])
    vals, cols = search_topk.log_softmax_topk(logits, 5)
    assert cols.tolist() == [[1, 2, 4, 3, 5]] == reference.log_softmax_topk(logits, 5)[1].tolist()
    assert vals[0, 0] == vals[0, 1] == vals[0, 2] > vals[0, 3] == vals[0, 4]
    wide = torch.zeros(1, 1500)  # chunked: ties within a chunk and across chunks
    wide[0, [1200, 3, 700, 701, 9]] = 3.0
    wide[0, [1499, 256]] = 2.0
    vals, cols = search_topk.log_softmax_topk(wide, 8, banned=torch.tensor([9]))
    assert (
        cols.tolist()
        == [[3, 700, 701, 1200, 256, 1499, 0, 1]]
        == reference.log_softmax_topk(wide, 8, banned=torch.tensor([9]))[1].tolist()
    )
    sparse = torch.full((1, 1030), float("-inf"))  # 3 finite columns: the rest of the 10 are the lowest
    sparse[0, [1029, 500, 4]] = torch.tensor([1.0, 2.0, 3.0])  # -inf ones (the last chunk holds 6 columns)
    vals, cols = search_topk.log_softmax_topk(sparse, 10)
    assert cols.tolist() == [[4, 500, 1029, 0, 1, 2, 3, 5, 6, 7]] == reference.log_softmax_topk(sparse, 10)[1].tolist()
    assert torch.isfinite(vals).sum() == 3 and not vals.isnan().any()


@interpreted
def test_log_softmax_topk_dispatch():
    logits = torch.randn(3, 20)
    a = kernels.log_softmax_topk(logits, 4, backend="triton")
    b = kernels.log_softmax_topk(logits, 4, backend="torch")
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(a[1], b[1])
    c = kernels.log_softmax_topk(logits.double(), 4, backend="triton")  # fp64: the reference
    torch.testing.assert_close(c[0], b[0], atol=1e-5, rtol=1e-5)
    search_topk = kernel_module("search_topk")
    k = search_topk.MAX_K  # chunks x k candidates beyond what one program merges: the reference
    V = search_topk.MAX_CANDIDATES // k * search_topk.CHUNK
    wide = torch.randn(2, V + 1)
    assert not search_topk.supported(wide, k) and search_topk.supported(wide[:, :-1], k)
    assert search_topk.supported(wide, 3)
    many = torch.randn(2, 200)  # k picks are unrolled: large k takes the reference too
    assert search_topk.supported(many, search_topk.MAX_K) and not search_topk.supported(many, search_topk.MAX_K + 1)
    d = kernels.log_softmax_topk(wide, k, backend="triton")
    assert torch.equal(d[1], reference.log_softmax_topk(wide, k)[1])


@interpreted
@pytest.mark.parametrize(
    "graphed, V", [(False, 40), (True, 40), (False, 1100)], ids=["eager", "emulated-graphs", "eager-chunked-topk"]
)
def test_search_with_fused_topk_matches_pytorch_topk(monkeypatch, graphed, V):
    """Greedy and beam search with our Triton gate cell use the fused kernels (the decoder step's
    attention; top-k; the bookkeeping; beam search's output walk back); the same model with
    PyTorch's attention, log_softmax + topk and bookkeeping and the host's walk back (what cuDNN
    and the reference cell run) decodes the same. V = 1100: the top-k in chunks."""
    from mt import graphs, search
    from mt.config import ModelConfig
    from mt.model import Seq2Seq

    torch.manual_seed(0)
    cfg = ModelConfig(
        cell="triton",
        emb_dim=16,
        hidden_dim=16,
        enc_layers=2,
        dec_layers=2,
        attention="general",
        dropout=0.0,
        emb_dropout=0.0,
    )
    model = Seq2Seq(cfg, 40, V, 0).eval()
    g = torch.Generator().manual_seed(3)
    lengths = [6, 3, 5] if V <= 1024 else [6, 4]  # (the interpreter is slow: 2 sentences through chunks)
    src = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        src[i, : n - 1] = torch.randint(4, 40, (n - 1,), generator=g)
        src[i, n - 1] = 3
    src_len = torch.tensor(lengths)

    def spy(owner, name: str, log: list):
        """Record what owner.name returns (or that it ran) while the real one runs; -> the real one."""
        real = getattr(owner, name)

        def wrapper(*a):
            log.append(real(*a))
            return log[-1]

        monkeypatch.setattr(owner, name, wrapper)
        return wrapper

    decode_attention = kernel_module("decode_attention")
    # each of our kernels (the decision to take it, or its step), spied on in the "fused" run
    switches = {
        "fused": (search, "fused"),
        "backtrack": (search, "_backtrack_kernel_takes"),
        "attention": (decode_attention, "supported"),
    }
    logs = {name: [] for name in [*switches, "beam", "greedy"]}
    spy(search._BeamSearch, "advance_fused", logs["beam"])
    spy(search._GreedySearch, "advance_fused", logs["greedy"])
    on = {name: spy(owner, attr, logs[name]) for name, (owner, attr) in switches.items()}
    beams = (3,) if V > 1024 else (1, 3)  # (the chunked case: beam search only, the interpreter is slow)
    outs = {}
    for run in ("fused", "pytorch"):
        for name, (owner, attr) in switches.items():  # "pytorch": what cuDNN and the reference cell run
            monkeypatch.setattr(owner, attr, on[name] if run == "fused" else (lambda *a: False))
        for beam in beams:
            runner = graphs.GraphedDecoder(model, emulate=True) if graphed else None
            outs[run, beam] = search.search(
                model,
                src,
                src_len,
                2,
                3,
                beam=beam,
                nbest=min(beam, 2),
                length_penalty=1.0 if beam > 1 else None,
                max_len_b=3,
                graphs=runner,
            )
    for name in switches:  # the fused path really ran: the top-k, the walk back, the attention...
        assert logs[name] and all(logs[name]), name
    assert logs["beam"]  # ...beam search's bookkeeping kernel...
    assert logs["greedy"] or V > 1024  # ...and greedy search's (the chunked case runs beam search only)
    for beam in beams:
        a, b = outs["fused", beam], outs["pytorch", beam]
        assert a.tokens == b.tokens
        assert [[h.tokens for h in hs] for hs in a.nbest] == [[h.tokens for h in hs] for hs in b.nbest]
        for x, y in zip([h.attention for hs in a.nbest for h in hs], [h.attention for hs in b.nbest for h in hs]):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(a.scores), torch.tensor(b.scores), atol=1e-5, rtol=1e-5)
