"""The gate cell: Triton kernels (under the CPU interpreter) against the PyTorch reference,
the reference against nn.LSTM / nn.LSTMCell and gradcheck, and the backend dispatch.

TRITON_INTERPRET=1 is set before anything imports triton, so the kernels run on CPU tensors.
(The kernels' compile check runs in a subprocess without the interpreter.)
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton`

import importlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

from mt import kernels  # noqa: E402
from mt.errors import MTError  # noqa: E402
from mt.kernels import reference  # noqa: E402

pytest.importorskip("triton")
from mt.kernels import triton_cell  # noqa: E402

if type(triton_cell._cell_forward_kernel).__name__ != "InterpretedFunction":
    # another module imported triton_cell before TRITON_INTERPRET was set: rebuild the kernels
    triton_cell = importlib.reload(triton_cell)

REPO = Path(__file__).resolve().parents[1]

# (atol, rtol) for Triton vs reference in the same dtype. bf16/fp16 differ by rounding: the
# reference rounds gates/grads to the dtype after each op, the kernels keep fp32 in registers.
TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (4e-2, 4e-2),
}


def _close(actual, expected, dtype, what):
    atol, rtol = TOL[dtype]
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _cell_inputs(dtype, B, H, K, with_pre, with_bias, transposed, seed=0):
    g = torch.Generator().manual_seed(seed)
    inp = torch.randn(B, K, generator=g).to(dtype)
    c = torch.randn(B, H, generator=g)  # the cell state stays fp32, as in the model
    if transposed:  # the usual call: param (4H, K) passed as param.t()
        weight = (torch.randn(4 * H, K, generator=g) / K**0.5).to(dtype).t()
    else:
        weight = (torch.randn(K, 4 * H, generator=g) / K**0.5).to(dtype)
    pre = torch.randn(B, 4 * H, generator=g).to(dtype) if with_pre else None
    bias = torch.randn(4 * H, generator=g).to(dtype) if with_bias else None
    return inp, c, weight, pre, bias


def _run_cell(impl, inputs, seed=1):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in inputs]
    inp, c, weight, pre, bias = leaves
    h_new, c_new = impl.cell_step(inp, c, weight, pre=pre, bias=bias)
    g = torch.Generator().manual_seed(seed)
    loss = (h_new.float() * torch.randn(h_new.shape, generator=g)).sum()
    loss = loss + (c_new.float() * torch.randn(c_new.shape, generator=g)).sum()
    loss.backward()
    grads = [x.grad if x is not None else None for x in leaves]
    return (h_new, c_new), grads


@pytest.mark.parametrize(
    "dtype,B,H,K,with_pre,with_bias,transposed",
    [
        (torch.float32, 1, 16, 16, True, True, True),
        (torch.float32, 3, 32, 64, False, True, False),
        (torch.float32, 16, 16, 32, True, False, True),
        (torch.float32, 3, 24, 40, False, False, True),  # H, K not multiples of the tiles
        (torch.bfloat16, 3, 16, 32, True, True, True),
        (torch.float16, 16, 32, 32, True, True, True),
    ],
)
def test_cell_step_triton_matches_reference(dtype, B, H, K, with_pre, with_bias, transposed):
    inputs = _cell_inputs(dtype, B, H, K, with_pre, with_bias, transposed)
    (h_t, c_t), grads_t = _run_cell(triton_cell, inputs)
    (h_r, c_r), grads_r = _run_cell(reference, inputs)
    _close(h_t, h_r, dtype, "h'")
    _close(c_t, c_r, dtype, "c'")
    for name, gt, gr in zip(("inp", "c", "weight", "pre", "bias"), grads_t, grads_r):
        if gr is None:
            assert gt is None
            continue
        _close(gt, gr, dtype, f"d {name}")


def _seq_inputs(dtype, D, B, T, H, lengths, with_state, seed=0):
    g = torch.Generator().manual_seed(seed)
    xproj = torch.randn(D, B, T, 4 * H, generator=g).to(dtype)
    # a non-contiguous stack of transposes, as the model builds it from (4H, H) parameters
    w_hh = (torch.randn(D, 4 * H, H, generator=g) / H**0.5).to(dtype).transpose(1, 2)
    h0 = torch.randn(D, B, H, generator=g).to(dtype) if with_state else None
    c0 = torch.randn(D, B, H, generator=g) if with_state else None
    lens = torch.tensor(lengths) if lengths is not None else None
    return xproj, w_hh, lens, h0, c0


def _run_seq(impl, inputs, seed=1):
    xproj, w_hh, lens, h0, c0 = inputs
    leaves = [
        x.detach().clone().requires_grad_() if x is not None else None
        for x in (xproj, w_hh, h0, c0)
    ]
    xp, w, h, c = leaves
    out, h_n, c_n = impl.lstm_sequence(xp, w, lengths=lens, h0=h, c0=c)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in (out, h_n, c_n))
    loss.backward()
    return (out, h_n, c_n), [x.grad if x is not None else None for x in leaves]


@pytest.mark.parametrize(
    "dtype,D,B,T,H,lengths,with_state",
    [
        (torch.float32, 2, 3, 5, 16, [5, 2, 0], True),  # padded, empty sequence, reverse
        (torch.float32, 1, 1, 4, 32, None, False),
        (torch.float32, 1, 3, 4, 16, [4, 1, 2], True),  # one direction with an initial state
        (torch.float32, 2, 16, 3, 16, [3, 1, 2, 3] * 4, False),
        (torch.float32, 2, 3, 4, 24, [4, 3, 1], True),  # H not a multiple of the tile
        (torch.bfloat16, 2, 3, 4, 16, [4, 1, 3], True),
        (torch.float16, 2, 3, 4, 32, [2, 4, 3], False),
    ],
)
def test_lstm_sequence_triton_matches_reference(dtype, D, B, T, H, lengths, with_state):
    inputs = _seq_inputs(dtype, D, B, T, H, lengths, with_state)
    outs_t, grads_t = _run_seq(triton_cell, inputs)
    outs_r, grads_r = _run_seq(reference, inputs)
    for name, a, b in zip(("out", "h_n", "c_n"), outs_t, outs_r):
        _close(a, b, dtype, name)
    for name, a, b in zip(("xproj", "w_hh", "h0", "c0"), grads_t, grads_r):
        if b is None:
            assert a is None
            continue
        _close(a, b, dtype, f"d {name}")
    if lengths is not None:  # padded positions output exact zeros
        mask = torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None]  # (B, T)
        assert (outs_t[0][:, mask] == 0).all()


def test_inference_matches_training_forward():
    """Under no_grad the kernels skip saving activations; the outputs must not change."""
    seq = _seq_inputs(torch.float32, 2, 3, 4, 16, [4, 1, 2], True)
    cell = _cell_inputs(torch.float32, 3, 16, 32, True, True, True)
    with torch.no_grad():
        seq_a = triton_cell.lstm_sequence(*seq)
        cell_a = triton_cell.cell_step(*cell)
    seq_b = triton_cell.lstm_sequence(seq[0].clone().requires_grad_(), *seq[1:])
    cell_b = triton_cell.cell_step(cell[0].clone().requires_grad_(), *cell[1:])
    for a, b in zip(seq_a + cell_a, seq_b + cell_b):
        assert not a.requires_grad and b.requires_grad
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_dispatch_reaches_triton():
    inputs = _cell_inputs(torch.float32, 3, 16, 32, True, True, True)
    inp, c, weight, pre, bias = inputs
    h1, c1 = kernels.cell_step(inp, c, weight, pre=pre, bias=bias, backend="triton")
    h2, c2 = triton_cell.cell_step(inp, c, weight, pre=pre, bias=bias)
    torch.testing.assert_close(h1, h2, atol=0, rtol=0)
    torch.testing.assert_close(c1, c2, atol=0, rtol=0)
    xproj, w_hh, lens, h0, c0 = _seq_inputs(torch.float32, 2, 3, 3, 16, [3, 1, 2], True)
    out1 = kernels.lstm_sequence(xproj, w_hh, lens, h0, c0, backend="triton")
    out2 = reference.lstm_sequence(xproj, w_hh, lens, h0, c0)
    for a, b in zip(out1, out2):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_float64_falls_back_to_reference():
    inputs = _cell_inputs(torch.float64, 3, 16, 16, True, True, True)
    inputs = tuple(x.double() if x is not None else None for x in inputs)
    a = triton_cell.cell_step(*inputs)
    b = reference.cell_step(*inputs)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    xproj, w_hh, lens, _, _ = _seq_inputs(torch.float64, 2, 2, 3, 16, [3, 1], False)
    out_t = triton_cell.lstm_sequence(xproj, w_hh, lens)
    out_r = reference.lstm_sequence(xproj, w_hh, lens)
    assert out_t[2].dtype == torch.float64
    for x, y in zip(out_t, out_r):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_deferred_weight_grad_gives_the_per_step_gradients(dtype, tol):
    """A decoder-like loop (layer 0 with `pre`, layer 1 with a bias, each step's input depending
    on the last) through `cell_step` with a `DeferredWeightGrad` bank per layer, against the
    same loop with per-step weight gradients: every gradient equal (the bank sums the T steps
    in one fp32 matmul; per step they are summed in the weight's dtype, hence bf16's tolerance).
    A gradient that also reaches the attached weight another way is added; the banks end
    empty; the reference cell ignores a bank and gives the same gradients."""
    from mt import kernels

    g = torch.Generator().manual_seed(1)
    B, H, T = 5, 16, 4
    w0 = (torch.randn(4 * H, 2 * H, generator=g) / 4).to(dtype)  # acts on [feed; h0]
    w1 = (torch.randn(4 * H, 2 * H, generator=g) / 4).to(dtype)  # acts on [h0; h1]
    b1 = torch.randn(4 * H, generator=g).to(dtype)
    pre = torch.randn(T, B, 4 * H, generator=g).to(dtype)

    def run(backend: str, banked: bool):
        leaves = [x.clone().requires_grad_() for x in (w0, w1, b1, pre)]
        W0, W1, B1 = leaves[0].t(), leaves[1].t(), leaves[2]
        banks = [None, None]
        if banked:
            banks = [kernels.triton_cell.DeferredWeightGrad(), kernels.triton_cell.DeferredWeightGrad()]
            W0, _ = banks[0].attach(W0)
            W1, B1 = banks[1].attach(W1, B1)
        h0 = h1 = torch.zeros(B, H, dtype=dtype)
        c0 = c1 = torch.zeros(B, H)
        loss = (W1.float() ** 2).sum() * 1e-3  # another path to the attached weight
        for t in range(T):
            h0, c0 = kernels.cell_step(torch.cat([h1, h0], 1), c0, W0, pre=leaves[3][t], backend=backend,
                                       bank=banks[0])
            h1, c1 = kernels.cell_step(torch.cat([h0, h1], 1), c1, W1, bias=B1, backend=backend, bank=banks[1])
            loss = loss + (h1.float() * (t + 1)).sum() + c1.sum() * 0.1
        loss.backward()
        assert all(not (b.inps or b.dgates) for b in banks if b is not None)
        return [x.grad for x in leaves]

    want = run("triton", banked=False)
    for backend in ("triton", "torch"):
        got = run(backend, banked=True)
        for name, a, b in zip(("w0", "w1", "b1", "pre"), got, want):
            assert a.dtype == dtype, name
            torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol, msg=f"{backend} {name}")


def test_deferred_weight_grad_misuse_is_refused_or_harmless():
    """A bank is attached once; a weight or bias that is not the bank's is refused (its gradient
    would be lost); a backward that does not want the weight's gradient leaves nothing in the
    bank, so a later backward of the same graph gives the gradient once, not twice."""
    from mt.kernels.triton_cell import DeferredWeightGrad, cell_step

    g = torch.Generator().manual_seed(2)
    B, H = 3, 16
    w = (torch.randn(2 * H, 4 * H, generator=g) / 4).requires_grad_()
    bias = torch.randn(4 * H, generator=g).requires_grad_()
    bank = DeferredWeightGrad()
    W, Bias = bank.attach(w, bias)
    with pytest.raises(RuntimeError, match="attached once"):
        bank.attach(w, bias)
    inp, c = torch.randn(B, 2 * H, generator=g), torch.zeros(B, H)
    with pytest.raises(ValueError, match="bank.attach returned"):
        cell_step(inp, c, w, bias=Bias, bank=bank)  # the weight itself, not the bank's alias
    with pytest.raises(ValueError, match="bank.attach returned"):
        cell_step(inp, c, W, bias=bias, bank=bank)
    with pytest.raises(ValueError, match="bank.attach returned"):
        cell_step(inp, c, W, bank=bank)  # the bank sums a bias gradient over every step it saw

    pre = torch.randn(2, B, 4 * H, generator=g).requires_grad_()
    h = inp
    for t in range(2):
        h2, c = cell_step(torch.cat([h[:, :H], h[:, H:]], 1), c, W, pre=pre[t], bias=Bias, bank=bank)
        h = torch.cat([h2, h2], 1)
    loss = h.sum() + c.sum()
    torch.autograd.grad(loss, [pre], retain_graph=True)  # the weight's gradient not wanted
    assert not bank.inps
    loss.backward()
    w_once = w.grad.clone()
    w.grad = None
    h, c = inp, torch.zeros(B, H)
    for t in range(2):  # the same without a bank
        h2, c = cell_step(torch.cat([h[:, :H], h[:, H:]], 1), c, w, pre=pre[t], bias=bias)
        h = torch.cat([h2, h2], 1)
    (h.sum() + c.sum()).backward()
    torch.testing.assert_close(w_once, w.grad, atol=1e-5, rtol=1e-5)


def test_gradcheck_reference_cell_step():
    g = torch.Generator().manual_seed(0)
    B, K, H = 2, 3, 2
    args = [
        torch.randn(B, K, generator=g, dtype=torch.float64),
        torch.randn(B, H, generator=g, dtype=torch.float64),
        torch.randn(4 * H, K, generator=g, dtype=torch.float64).t(),
        torch.randn(B, 4 * H, generator=g, dtype=torch.float64),
        torch.randn(4 * H, generator=g, dtype=torch.float64),
    ]
    args = [a.detach().requires_grad_() for a in args]
    assert torch.autograd.gradcheck(
        lambda i, c, w, p, b: reference.cell_step(i, c, w, pre=p, bias=b), args
    )


def test_gradcheck_reference_lstm_sequence():
    g = torch.Generator().manual_seed(0)
    D, B, T, H = 2, 3, 3, 2
    xproj = torch.randn(D, B, T, 4 * H, generator=g, dtype=torch.float64, requires_grad=True)
    w_hh = torch.randn(D, H, 4 * H, generator=g, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(D, B, H, generator=g, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(D, B, H, generator=g, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([3, 1, 2])
    assert torch.autograd.gradcheck(
        lambda x, w, h, c: reference.lstm_sequence(x, w, lengths=lengths, h0=h, c0=c),
        (xproj, w_hh, h0, c0),
    )


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # interpreter's exp(1e4): inf
@pytest.mark.parametrize("impl", [reference, triton_cell], ids=["torch", "triton"])
def test_large_preactivations_stay_finite(impl):
    g = torch.Generator().manual_seed(0)
    B, H = 3, 16
    inp = torch.randn(B, H, generator=g)
    c = torch.randn(B, H, generator=g)
    weight = torch.randn(H, 4 * H, generator=g)
    pre = (torch.randint(0, 2, (B, 4 * H), generator=g) * 2 - 1).float() * 1e4  # +-1e4
    leaves = [x.clone().requires_grad_() for x in (inp, c, weight, pre)]
    h_new, c_new = impl.cell_step(*leaves)
    (h_new.sum() + c_new.sum()).backward()
    for t in [h_new, c_new] + [x.grad for x in leaves]:
        assert torch.isfinite(t).all()
    assert h_new.abs().max() <= 1.0

    xproj = (torch.randint(0, 2, (2, B, 3, 4 * H), generator=g) * 2 - 1).float() * 1e4
    xproj.requires_grad_()
    w_hh = torch.randn(2, H, 4 * H, generator=g, requires_grad=True)
    out, h_n, c_n = impl.lstm_sequence(xproj, w_hh, lengths=torch.tensor([3, 1, 2]))
    (out.sum() + h_n.sum() + c_n.sum()).backward()
    for t in (out, h_n, c_n, xproj.grad, w_hh.grad):
        assert torch.isfinite(t).all()


def test_reference_matches_nn_lstm_packed():
    """Pins the gate order (i, f, g, o) and the padding/reverse semantics on nn.LSTM's own maths."""
    torch.manual_seed(0)
    B, T, n_in, H = 4, 6, 5, 7
    lstm = nn.LSTM(n_in, H, batch_first=True, bidirectional=True).double()
    x = torch.randn(B, T, n_in, dtype=torch.float64)
    lengths = torch.tensor([6, 3, 1, 4])
    h0 = torch.randn(2, B, H, dtype=torch.float64)
    c0 = torch.randn(2, B, H, dtype=torch.float64)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out_p, (h_n, c_n) = lstm(packed, (h0, c0))
    out, _ = pad_packed_sequence(out_p, batch_first=True, total_length=T)  # (B, T, 2H)

    sfx = ["", "_reverse"]
    w_ih = [getattr(lstm, f"weight_ih_l0{s}") for s in sfx]
    b = [getattr(lstm, f"bias_ih_l0{s}") + getattr(lstm, f"bias_hh_l0{s}") for s in sfx]
    xproj = torch.stack([x @ w.t() + bb for w, bb in zip(w_ih, b)])  # (2, B, T, 4H)
    w_hh = torch.stack([getattr(lstm, f"weight_hh_l0{s}").t() for s in sfx])  # (2, H, 4H)
    with torch.no_grad():
        r_out, r_h, r_c = reference.lstm_sequence(xproj, w_hh, lengths=lengths, h0=h0, c0=c0)
    for d in range(2):
        torch.testing.assert_close(r_out[d], out[..., d * H : (d + 1) * H], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(r_h, h_n, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(r_c, c_n, atol=1e-10, rtol=1e-10)


def test_reference_cell_matches_nn_lstmcell():
    torch.manual_seed(0)
    B, K, H = 3, 5, 4
    cell = nn.LSTMCell(K, H).double()
    x = torch.randn(B, K, dtype=torch.float64)
    h = torch.randn(B, H, dtype=torch.float64)
    c = torch.randn(B, H, dtype=torch.float64)
    h_ref, c_ref = cell(x, (h, c))
    with torch.no_grad():
        h_new, c_new = reference.cell_step(
            torch.cat([x, h], 1),
            c,
            torch.cat([cell.weight_ih, cell.weight_hh], 1).t(),
            bias=cell.bias_ih + cell.bias_hh,
        )
    torch.testing.assert_close(h_new, h_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(c_new, c_ref, atol=1e-12, rtol=1e-12)


def test_resolve_backend():
    assert kernels.resolve_backend("auto", "cpu") == "torch"
    assert kernels.resolve_backend("torch", "cpu") == "torch"
    assert kernels.resolve_backend("triton", "cpu") == "triton"  # TRITON_INTERPRET=1 here
    with pytest.raises(MTError, match="unknown gate-cell backend"):
        kernels.resolve_backend("cuda-magic", "cpu")


def _record_variants(monkeypatch, kernels=None) -> set:
    """Record the key under which Triton's JIT would compile each kernel launch from now on
    (constexpr values, num_warps, and the specialization of every other argument: dtype,
    16-byte alignment, ints equal to 1 or divisible by 16, unless `do_not_specialize`d).
    Each distinct key is one compilation (about 1 s each on a GPU machine's CPU).
    kernels: (module, kernel name) pairs; default the gate cell's four."""
    import inspect

    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    keys: set = set()
    for module, name in kernels or [(triton_cell, n) for n in ("_cell_forward_kernel", "_cell_backward_kernel",
                                                               "_lstm_step_forward_kernel",
                                                               "_lstm_step_backward_kernel")]:
        kernel = getattr(module, name)
        params = list(inspect.signature(kernel.fn).parameters.values())
        dns = set(kernel.kwargs.get("do_not_specialize") or ())

        def run(*args, grid, warmup, _name=name, _params=params, _dns=dns, _run=kernel.run, **kw):
            bound = {**dict(zip((p.name for p in _params), args)), **kw}
            key = [_name, kw.get("num_warps")]
            for p in _params:
                v = bound[p.name]
                if "constexpr" in str(p.annotation):
                    key.append((p.name, v))
                else:
                    key.append((p.name, native_specialize_impl(BaseBackend, v, False, p.name not in _dns, True)))
            keys.add(tuple(key))
            return _run(*args, grid=grid, warmup=warmup, **kw)

        monkeypatch.setattr(kernel, "run", run)
    return keys


def test_compiled_variants_do_not_depend_on_batch_size_or_length(monkeypatch):
    """Batches come in many sizes and lengths: if Triton specialized on B or T (divisible by 16
    or not), every kernel would compile up to 4 times, each compile about a second of the
    recipe's first minute. Same tiles (BLOCK_B = 64 for B in 65..80), same variants."""
    keys = _record_variants(monkeypatch)
    H, K = 16, 48
    variants = {}
    for B, T in [(80, 16), (65, 17), (80, 17), (65, 16)]:
        keys.clear()
        g = torch.Generator().manual_seed(B * T)
        xproj = torch.randn(2, B, T, 4 * H, generator=g, requires_grad=True)
        w_hh = (torch.randn(2, H, 4 * H, generator=g) / H**0.5).requires_grad_()
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        out, h_n, c_n = triton_cell.lstm_sequence(xproj, w_hh, lengths)
        inp = torch.randn(B, K, generator=g, requires_grad=True)
        w = (torch.randn(K, 4 * H, generator=g) / K**0.5).requires_grad_()
        pre = torch.randn(B, 4 * H, generator=g, requires_grad=True)
        h, c = triton_cell.cell_step(inp, torch.zeros(B, H), w, pre=pre)
        (out.sum() + h_n.sum() + c_n.sum() + h.sum() + c.sum()).backward()
        variants[(B, T)] = frozenset(keys)
    kernels = {k[0] for k in next(iter(variants.values()))}
    assert kernels == {"_cell_forward_kernel", "_cell_backward_kernel", "_lstm_step_forward_kernel",
                       "_lstm_step_backward_kernel"}
    assert len(set(variants.values())) == 1, {s: len(v) for s, v in variants.items()}
    # one variant per kernel here: the backward's first launch (no later step) is not another
    assert len(next(iter(variants.values()))) == 4


def test_decoding_variants_do_not_depend_on_batch_size_or_source_length(monkeypatch):
    """Greedy and beam search with our Triton cell over batches of other sizes and source lengths
    (3, 9 and 20 positions: three powers of two apart) launch the same kernel variants: a
    translation job or a validation compiles each decoding kernel once, not per length."""
    from mt.config import ModelConfig
    from mt.kernels import search_greedy, search_topk
    from mt.model import Seq2Seq
    from mt.search import beam_search, greedy_search

    search_beam = _search_beam_module()
    decode_attention = _decode_attention_module()
    if type(search_greedy._greedy_update_kernel).__name__ != "InterpretedFunction":
        search_greedy = importlib.reload(search_greedy)
    if type(search_topk._log_softmax_topk_kernel).__name__ != "InterpretedFunction":
        search_topk = importlib.reload(search_topk)
    decoding = [(decode_attention, "_attention_step_kernel"), (search_topk, "_log_softmax_topk_kernel"),
                (search_greedy, "_greedy_update_kernel"), (search_beam, "_beam_update_kernel"),
                (search_beam, "_gather_rows_kernel"), (search_beam, "_beam_backtrack_kernel")]
    keys = _record_variants(monkeypatch, decoding)
    torch.manual_seed(0)
    cfg = ModelConfig(cell="triton", emb_dim=8, hidden_dim=8, enc_layers=1, dec_layers=2, attention="general",
                      dropout=0.0, emb_dropout=0.0)
    model = Seq2Seq(cfg, 30, 30, 0).eval()
    variants = {}
    for n, S in [(2, 3), (3, 9), (2, 20)]:
        g = torch.Generator().manual_seed(n * S)
        src = torch.randint(4, 30, (n, S), generator=g)
        src[:, -1] = 3
        src_len = torch.full((n,), S)
        keys.clear()
        greedy_search(model, src, src_len, 2, 3, max_len_a=0.0, max_len_b=3)
        beam_search(model, src, src_len, 2, 3, beam=2, max_len_a=0.0, max_len_b=3)
        variants[n, S] = frozenset(keys)
    names = {k[0] for k in next(iter(variants.values()))}
    assert names == {name for _, name in decoding}, names  # every decoding kernel ran...
    assert len(set(variants.values())) == 1, {s: len(v) for s, v in variants.items()}  # ...in the same variants


def _run_without_interpreter(script: str, timeout: int) -> None:
    """Run `script` in a fresh Python with the real Triton compiler (TRITON_INTERPRET unset);
    it must exit 0 and print "ok"."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok" in proc.stdout


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from mt.kernels import triton_cell as tc

    def build(kernel, ptrs, consts, num_warps=4):
        names = kernel.arg_names
        sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in names}
        consts = {(names.index(k),): v for k, v in consts.items()}
        src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
        assert k.asm.get("cubin"), kernel

    tiles = dict(BLOCK_B=64, BLOCK_H=32, BLOCK_K=64, INPUT_PRECISION="ieee", UPCAST_DOT=False)
    bf, f32 = "*bf16", "*fp32"
    build(tc._lstm_step_forward_kernel,
          dict(xproj_ptr=bf, w_ptr=bf, hbuf_ptr=bf, cbuf_ptr=f32, out_ptr=bf, act_ptr=f32,
               len_ptr="*i32"),
          dict(H=512, HAS_LENGTHS=True, STORE_ACT=True, **tiles))
    build(tc._lstm_step_backward_kernel,
          dict(dgates_ptr=bf, w_ptr=bf, act_ptr=f32, cbuf_ptr=f32, dout_ptr=bf, gbuf_ptr=f32,
               cbwd_ptr=f32, len_ptr="*i32"),
          dict(H=512, HAS_LENGTHS=True, HAS_DOUT=True, **tiles))
    build(tc._cell_forward_kernel,
          dict(inp_ptr=bf, w_ptr=bf, pre_ptr=bf, bias_ptr=bf, c_ptr=f32, h_out_ptr=bf,
               c_out_ptr=f32, act_ptr=f32),
          dict(K=1024, H=512, HAS_PRE=True, HAS_BIAS=True, STORE_ACT=True, **tiles))
    build(tc._cell_backward_kernel,
          dict(dh_ptr=bf, dc_ptr=f32, act_ptr=f32, c_ptr=f32, dgates_ptr=bf, dc_prev_ptr=f32),
          dict(HAS_DH=True, HAS_DC=True, BLOCK_B=64, BLOCK_H=32))
    from mt.kernels import search_beam as sb
    from mt.kernels import search_topk as st
    i64 = "*i64"
    for k in (1, 10, st.MAX_K):  # the chunked top-k at V = 8000 (the merge's warps as the wrapper picks them)
        split = triton.cdiv(8000, st.CHUNK)
        build(st._chunk_topk_kernel, dict(logits_ptr=bf, banned_ptr=i64, part_ptr=f32, cval_ptr=f32, ccol_ptr=i64),
              dict(NB=2, K=k, SPLIT=split, CHUNK=st.CHUNK), num_warps=1)
        block = triton.next_power_of_2(split * k)
        build(st._merge_topk_kernel, dict(part_ptr=f32, cval_ptr=f32, ccol_ptr=i64, bias_ptr=f32, val_ptr=f32,
                                          idx_ptr=i64),
              dict(K=k, SPLIT=split, HAS_BIAS=True, BLOCK_P=triton.next_power_of_2(split), BLOCK_M=block),
              num_warps=1 if block <= 512 else (4 if block <= 2048 else 8))
    for K in (1, 5, sb.MAX_BEAM):  # the beam bookkeeping (a launch uses one warp)
        build(sb._beam_update_kernel,
              dict(val_ptr=f32, col_ptr=i64, attn_ptr=bf, limit_ptr=i64, sent_ptr=i64, t_ptr=i64, lp_ptr="*fp64",
                   done_ptr="*i1", fin_score_ptr="*fp64", fin_logp_ptr=f32, fin_info_ptr=i64, scores_ptr=f32,
                   last_ptr=i64, rows_ptr=i64, tok_hist_ptr=i64, bp_hist_ptr=i64, attn_hist_ptr=f32),
              dict(K=K, NBEST=1, BLOCK_C=triton.next_power_of_2(2 * K * K), BLOCK_2K=triton.next_power_of_2(2 * K),
                   BLOCK_K=triton.next_power_of_2(K), BLOCK_S=sb.ROW_TILE), num_warps=1)
    from mt.kernels import decode_attention as da
    for q, m in ((bf, bf), (f32, f32)):  # a decoding step's attention at the Multi30k model's sizes
        build(da._attention_step_kernel, dict(q_ptr=q, keys_ptr=q, mem_ptr=m, mask_ptr="*i1", ctx_ptr=m, w_ptr=f32),
              dict(BLOCK_Q=512, BLOCK_M=512, BLOCK_S=da.TILE // 512))
        for has_dw in (False, True):  # training's backward of it
            build(da._attention_step_backward_kernel,
                  dict(q_ptr=q, keys_ptr=q, mem_ptr=m, mask_ptr="*i1", w_ptr=f32, dctx_ptr=m, dw_ptr=f32, dq_ptr=q,
                       dk_ptr=q, dm_ptr=m),
                  dict(HAS_DW=has_dw, BLOCK_Q=512, BLOCK_M=512, BLOCK_S=da.BACKWARD_TILE // 512),
                  num_warps=da.BACKWARD_WARPS)
    from mt.kernels import search_greedy as sg
    build(sg._greedy_update_kernel, dict(best_ptr=f32, tok_ptr=i64, attn_ptr=bf, limit_ptr=i64, t_ptr=i64,
                                         done_ptr="*i1", scores_ptr=f32, last_ptr=i64, tok_hist_ptr=i64,
                                         attn_hist_ptr=f32), dict(BLOCK=sb.ROW_TILE), num_warps=1)
    for nt in (3, sb.MAX_STATE):  # the decoder state's gather after a beam step
        build(sb._gather_rows_kernel, dict(rows_ptr=i64, **{f"{x}{i}": (bf if i % 2 == 0 else f32)
                                                           for i in range(sb.MAX_STATE) for x in "sd"}),
              dict(NT=nt, BLOCK_H=512), num_warps=2)
    for K in (1, 5):  # beam search's output: the walk back (a while loop)
        build(sb._beam_backtrack_kernel, dict(info_ptr=i64, tok_hist_ptr=i64, bp_hist_ptr=i64, attn_hist_ptr=f32,
                                              tok_out_ptr=i64, attn_out_ptr=f32),
              dict(K=K, M=1, BLOCK_S=sb.ROW_TILE), num_warps=1)
    print("ok")
    """
)


def test_kernels_compile_for_h100():
    """Compile (no launch) every kernel for sm_90 with the real compiler, ptxas included: catches
    what the interpreter does not check (types, layouts, tl.dot shapes) on machines without a GPU."""
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton build ships no ptxas")
    _run_without_interpreter(_COMPILE_SCRIPT, timeout=300)


# ----------------------------------------------------------------------------- decoding attention
def _decode_attention_module():
    from mt.kernels import decode_attention

    if type(decode_attention._attention_step_kernel).__name__ != "InterpretedFunction":
        decode_attention = importlib.reload(decode_attention)
    return decode_attention


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B, S, Q, M", [(5, 7, 16, 16), (3, 13, 48, 40), (2, 11, 1024, 512), (4, 1, 8, 24)])
def test_attention_step_triton_matches_reference(dtype, tol, B, S, Q, M):
    """One decoding step's dot/general attention: the fused kernel against the PyTorch ops, with
    padding (a row of one real token), keys, memory and mask rows taken from wider tensors
    (row strides), sources longer than one tile (Q = 1024: 4 positions a tile), sizes that are
    not powers of two; a query with a column stride is refused."""
    decode_attention = _decode_attention_module()
    g = torch.Generator().manual_seed(B * S + Q)
    query = (torch.randn(B, 2 * Q, generator=g) * 0.3).to(dtype)[:, ::2] if Q > 8 else torch.randn(B, Q, generator=g).to(dtype)
    keys = torch.randn(B, S, Q + 5, generator=g).to(dtype)[:, :, :Q]  # rows of a wider tensor
    memory = torch.randn(B, S, M + 3, generator=g).to(dtype)[:, :, :M]
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    lengths[0] = 1
    mask = (torch.arange(S + 2)[None, :] < lengths[:, None])[:, :S]
    if query.stride(1) != 1:  # the kernel wants contiguous rows: the wrapper's caller (the model) has them
        assert not decode_attention.supported(query, keys, memory, mask)
        query = query.contiguous()
    assert decode_attention.supported(query, keys, memory, mask)
    ctx, w = decode_attention.attention_step(query, keys, memory, mask)
    ref_ctx, ref_w = reference.attention_step(query, keys, memory, mask)
    assert ctx.dtype == dtype and w.dtype == torch.float32 and ctx.shape == (B, M) and w.shape == (B, S)
    torch.testing.assert_close(w, ref_w, atol=tol, rtol=tol)
    torch.testing.assert_close(ctx.float(), ref_ctx.float(), atol=tol, rtol=tol)
    assert (w[~mask] == 0).all() and torch.allclose(w.sum(-1), torch.ones(B), atol=1e-5)
    # the dispatcher takes the kernel for Triton, the reference otherwise, and the same answer
    torch.testing.assert_close(kernels.attention_step(query, keys, memory, mask, backend="triton")[1], w)
    torch.testing.assert_close(kernels.attention_step(query, keys, memory, mask, backend="torch")[1], ref_w)


def test_attention_step_refuses_what_it_cannot_take():
    decode_attention = _decode_attention_module()
    q, k, m, mask = torch.zeros(2, 8), torch.zeros(2, 3, 8), torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)
    assert decode_attention.supported(q, k, m, mask)
    assert not decode_attention.supported(q, k.transpose(1, 2).contiguous().transpose(1, 2), m, mask)  # strided rows
    assert not decode_attention.supported(q, k, m, mask.float())
    assert not decode_attention.supported(q.double(), k.double(), m.double(), mask)
    big = decode_attention.MAX_DIM + 1
    assert not decode_attention.supported(torch.zeros(2, big), torch.zeros(2, 3, big), m, mask)
    # while autograd records, the dispatcher takes the kernel with its backward; else the plain one
    q.requires_grad_()
    ctx, w = kernels.attention_step(q, k, m, mask, backend="triton")
    assert type(ctx.grad_fn).__name__ == "_AttentionStepFunctionBackward" and w.grad_fn is ctx.grad_fn
    assert kernels.attention_step(q, k, m, mask, backend="torch")[0].grad_fn is not None  # the reference's ops
    with torch.no_grad():
        assert kernels.attention_step(q, k, m, mask, backend="triton")[0].grad_fn is None
    assert kernels.attention_step(q.double(), k.double(), m.double(), mask, backend="triton")[0].grad_fn is not None


def _scaled_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B, S, Q, M, d_weights, shared", [(5, 7, 16, 16, True, False), (3, 13, 48, 40, False, False),
                                                           (2, 300, 16, 24, True, False), (4, 6, 32, 32, False, True),
                                                           (3, 70, 512, 512, True, False)])
def test_attention_step_backward_matches_autograd_of_the_reference(dtype, tol, B, S, Q, M, d_weights, shared):
    """Training's attention: the fused forward + backward kernels (`attention_step_autograd`)
    and autograd through the PyTorch ops, both against the PyTorch ops in fp64: the gradients of
    query, keys and memory for a loss on the context (and on the weights: `d_weights`). The
    kernels' scaled error is at most `tol` or three times the PyTorch ops' own: in bf16 the two
    differ from each other by more than either does from fp64 (they round g to bf16 after
    summing in different orders, then subtract its weighted mean), and the interpreter rounds
    fp32 to bf16 by truncation (up to 2.6x the PyTorch ops' error here; gpu_checks.py allows 2x
    on a GPU, which rounds to nearest as PyTorch does). With padding (a row of one real
    token), keys and memory rows taken from wider tensors, sources of two tiles (S = 300),
    sizes that are not powers of two, and dot attention's keys that are the memory (`shared`:
    autograd adds the two gradients)."""
    decode_attention = _decode_attention_module()
    g = torch.Generator().manual_seed(B * S + Q + 7)
    query = torch.randn(B, Q, generator=g)
    memory = torch.randn(B, S, M + 3, generator=g)[:, :, :M]
    keys = memory if shared else (torch.randn(B, S, Q + 5, generator=g) * 0.3)[:, :, :Q]
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    lengths[0] = 1
    mask = torch.arange(S)[None, :] < lengths[:, None]
    d_context = torch.randn(B, M, generator=g)
    d_w = torch.randn(B, S, generator=g) if d_weights else None
    grads = []
    for fn, dt in ((reference.attention_step, torch.float64), (reference.attention_step, dtype),
                   (decode_attention.attention_step_autograd, dtype)):
        leaves = [query.to(dt).requires_grad_(), memory.to(dt).requires_grad_()]
        if not shared:  # (rows of a wider tensor: the kernels take row strides)
            leaves.append(torch.zeros(B, S, Q + 5, dtype=dt)[:, :, :Q].copy_(keys).requires_grad_())
        q_, m_ = leaves[0], leaves[1]
        k_ = m_ if shared else leaves[2]
        ctx, w = fn(q_, k_, m_, mask)
        torch.autograd.backward([ctx, w] if d_weights else [ctx],
                                [d_context.to(dt), d_w] if d_weights else [d_context.to(dt)])
        grads.append([x.grad for x in leaves])
    for name, truth, ref, ours in zip(("query", "memory", "keys"), *grads):
        assert ours.dtype == dtype and ours.shape == truth.shape, name
        err, ref_err = _scaled_error(ours, truth), _scaled_error(ref, truth)
        assert err <= max(tol, 3 * ref_err), (name, err, ref_err)
    if not shared:  # padding positions get no gradient
        assert (grads[2][2][~mask] == 0).all() and (grads[2][1][~mask] == 0).all()


def test_attention_step_backward_without_a_context_gradient():
    """Only the weights reach the loss (d context is None): the backward runs on a zero d context
    and agrees with the reference."""
    decode_attention = _decode_attention_module()
    g = torch.Generator().manual_seed(3)
    q, k, m = torch.randn(2, 8, generator=g), torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 4, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    target = torch.randn(2, 5, generator=g)
    grads = []
    for fn in (reference.attention_step, decode_attention.attention_step_autograd):
        q_ = q.clone().requires_grad_()
        (fn(q_, k, m, mask)[1] * target).sum().backward()
        grads.append(q_.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # (the interpreter, on the NaN row)
def test_attention_step_backward_edge_cases(monkeypatch):
    """A row with no real token: NaN weights and d memory, as with the PyTorch ops, and no
    gradient through its scores (d query, d keys 0: the mask's backward), the other rows
    unaffected. The backward is once differentiable: a second derivative is an error, not a
    silent zero. Rows too far apart for the kernels' int32 offsets go to the PyTorch ops."""
    decode_attention = _decode_attention_module()
    g = torch.Generator().manual_seed(4)
    q, k, m = torch.randn(3, 8, generator=g), torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, 6, generator=g)
    mask = torch.tensor([[True] * 4, [False] * 4, [True, True, False, False]])
    d_ctx = torch.randn(3, 6, generator=g)
    grads = []
    for fn in (reference.attention_step, decode_attention.attention_step_autograd):
        leaves = [x.clone().requires_grad_() for x in (q, k, m)]
        fn(*leaves, mask)[0].backward(d_ctx)
        grads.append([x.grad for x in leaves])
    for ref, ours in zip(*grads):
        assert torch.equal(ours.isnan(), ref.isnan())
        torch.testing.assert_close(ours.nan_to_num(), ref.nan_to_num(), atol=1e-6, rtol=1e-5)
    assert (grads[1][0][1] == 0).all() and (grads[1][1][1] == 0).all() and grads[1][2][1].isnan().all()
    q_ = q.clone().requires_grad_()
    ctx, _ = decode_attention.attention_step_autograd(q_, k, m, mask[[0, 2, 0]])
    d_q, = torch.autograd.grad(ctx.square().sum(), q_, create_graph=True)  # (d context depends on q)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        d_q.sum().backward()
    # (meta tensors: strides without the 8 GB of memory; "runs here" stands in for the device check)
    far = torch.empty(1, 2, 2**30 + 8, device="meta")[:, :, :8]  # row stride 2**30 + 8: offsets past int32
    monkeypatch.setattr(decode_attention.common, "runs_here", lambda t: True)
    qm, mm = torch.empty(1, 8, device="meta"), torch.ones(1, 2, dtype=torch.bool, device="meta")
    assert not decode_attention.supported(qm, far, far, mm)
    assert decode_attention.supported(qm, far[:, :1], far[:, :1], mm[:, :1])  # one position: offset 0


# ----------------------------------------------------------------------------- search top-k
def _search_topk_module():
    from mt.kernels import search_topk

    if type(search_topk._log_softmax_topk_kernel).__name__ != "InterpretedFunction":
        search_topk = importlib.reload(search_topk)
    return search_topk


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N, V, k", [(7, 50, 10), (12, 1000, 10), (4, 64, 1), (5, 3, 3), (3, 33, 33),
                                     (5, 3000, 10), (4, 1030, 10), (2, 1300, 64), (3, 1100, 1)])
def test_log_softmax_topk_triton_matches_reference(dtype, N, V, k):
    """The fused search kernels: the k best of bias + log_softmax, banned columns never picked
    (unless nothing else is left), a row of -inf bias still returns k columns. Rows wider than
    ROW_V go through chunks (1030: a last chunk of 6 columns, fewer than k)."""
    search_topk = _search_topk_module()
    g = torch.Generator().manual_seed(N * V + k)
    logits = (torch.randn(N, V, generator=g) * 4).to(dtype)
    bias = torch.randn(N, generator=g) - 3
    bias[1] = float("-inf")  # a beam that does not exist yet
    banned = torch.tensor([0, 2]) if V > 3 else torch.tensor([1])
    vals, cols = search_topk.log_softmax_topk(logits, k, row_bias=bias, banned=banned)
    ref_vals, ref_cols = reference.log_softmax_topk(logits, k, row_bias=bias, banned=banned)
    assert vals.shape == (N, k) and vals.dtype == torch.float32 and cols.dtype == torch.int64
    torch.testing.assert_close(vals, ref_vals, atol=1e-5, rtol=1e-5)
    # columns: each picked one holds its value (near-ties may swap two columns' order)
    full = reference.log_softmax_topk(logits, V, row_bias=bias, banned=banned)
    by_col = torch.empty(N, V).scatter_(1, full[1], full[0])  # (N, V) the reference value of every column
    finite = torch.isfinite(ref_vals)
    torch.testing.assert_close(by_col.gather(1, cols)[finite], vals[finite], atol=1e-5, rtol=1e-5)
    assert all(len(set(r)) == k for r in cols.tolist())  # no column twice
    assert ((cols >= 0) & (cols < V)).all()
    if V > k + len(banned):
        assert not torch.isin(cols[finite], banned).any()
    assert cols[1].tolist() == list(range(k))  # all -inf: the lowest columns, banned or not


@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract")  # interpreter: -inf - (-inf), masked
def test_log_softmax_topk_ties_go_to_the_lower_column():
    search_topk = _search_topk_module()
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 2.0]])
    vals, cols = search_topk.log_softmax_topk(logits, 5)
    assert cols.tolist() == [[1, 2, 4, 3, 5]] == reference.log_softmax_topk(logits, 5)[1].tolist()
    assert vals[0, 0] == vals[0, 1] == vals[0, 2] > vals[0, 3] == vals[0, 4]
    wide = torch.zeros(1, 1500)  # chunked: ties within a chunk and across chunks
    wide[0, [1200, 3, 700, 701, 9]] = 3.0
    wide[0, [1499, 256]] = 2.0
    vals, cols = search_topk.log_softmax_topk(wide, 8, banned=torch.tensor([9]))
    assert cols.tolist() == [[3, 700, 701, 1200, 256, 1499, 0, 1]] == reference.log_softmax_topk(
        wide, 8, banned=torch.tensor([9]))[1].tolist()
    sparse = torch.full((1, 1030), float("-inf"))  # 3 finite columns: the rest of the 10 are the lowest
    sparse[0, [1029, 500, 4]] = torch.tensor([1.0, 2.0, 3.0])  # -inf ones (the last chunk holds 6 columns)
    vals, cols = search_topk.log_softmax_topk(sparse, 10)
    assert cols.tolist() == [[4, 500, 1029, 0, 1, 2, 3, 5, 6, 7]] == reference.log_softmax_topk(sparse, 10)[1].tolist()
    assert torch.isfinite(vals).sum() == 3 and not vals.isnan().any()


def test_log_softmax_topk_dispatch():
    logits = torch.randn(3, 20)
    a = kernels.log_softmax_topk(logits, 4, backend="triton")
    b = kernels.log_softmax_topk(logits, 4, backend="torch")
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(a[1], b[1])
    c = kernels.log_softmax_topk(logits.double(), 4, backend="triton")  # fp64: the reference
    torch.testing.assert_close(c[0], b[0], atol=1e-5, rtol=1e-5)
    search_topk = _search_topk_module()
    k = search_topk.MAX_K  # chunks x k candidates beyond what one program merges: the reference
    V = search_topk.MAX_CANDIDATES // k * search_topk.CHUNK
    wide = torch.randn(2, V + 1)
    assert not search_topk.supported(wide, k) and search_topk.supported(wide[:, :-1], k)
    assert search_topk.supported(wide, 3)
    many = torch.randn(2, 200)  # k picks are unrolled: large k takes the reference too
    assert search_topk.supported(many, search_topk.MAX_K) and not search_topk.supported(many, search_topk.MAX_K + 1)
    d = kernels.log_softmax_topk(wide, k, backend="triton")
    assert torch.equal(d[1], reference.log_softmax_topk(wide, k)[1])


@pytest.mark.parametrize("graphed, V", [(False, 40), (True, 40), (False, 1100)],
                         ids=["eager", "emulated-graphs", "eager-chunked-topk"])
def test_search_with_fused_topk_matches_pytorch_topk(monkeypatch, graphed, V):
    """Greedy and beam search with our Triton gate cell use the fused kernels (the decoder step's
    attention; top-k; the bookkeeping; beam search's output walk back); the same model with
    PyTorch's attention, log_softmax + topk and bookkeeping and the host's walk back (what cuDNN
    and the reference cell run) decodes the same. V = 1100: the top-k in chunks."""
    from mt import graphs, search
    from mt.config import ModelConfig
    from mt.model import Seq2Seq

    torch.manual_seed(0)
    cfg = ModelConfig(cell="triton", emb_dim=16, hidden_dim=16, enc_layers=2, dec_layers=2,
                      attention="general", dropout=0.0, emb_dropout=0.0)
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

    decode_attention = _decode_attention_module()
    # each of our kernels (the decision to take it, or its step), spied on in the "fused" run
    switches = {"fused": (search, "fused"), "backtrack": (search, "_backtrack_kernel_takes"),
                "attention": (decode_attention, "supported")}
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
            outs[run, beam] = search.search(model, src, src_len, 2, 3, beam=beam, nbest=min(beam, 2),
                                            length_penalty=1.0 if beam > 1 else None, max_len_b=3, graphs=runner)
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


# ----------------------------------------------------------------------------- beam bookkeeping
def _search_beam_module():
    from mt.kernels import search_beam

    if type(search_beam._beam_update_kernel).__name__ != "InterpretedFunction":
        search_beam = importlib.reload(search_beam)
    return search_beam


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


@pytest.mark.parametrize("K, nbest, lp, in_place, n, S", [(1, 1, None, False, 16, 7), (2, 2, 1.0, True, 16, 7),
                                                          (3, 1, "avg", False, 10, 7), (5, 2, 0.6, True, 6, 7),
                                                          (8, 8, None, True, 3, 260)])
def test_beam_update_kernel_matches_advance(K, nbest, lp, in_place, n, S):
    """`advance_fused` (one Triton launch) against `advance` (the PyTorch bookkeeping) fed the
    same candidates in the same order: every state tensor, the history and the decoded
    hypotheses equal, over steps with EOS, length limits, ties, finished sentences and a
    sentence retired from the batch (eager mode's shrinking batch). S = 260: attention rows
    of three tiles."""
    _search_beam_module()
    from mt.kernels.reference import best_candidates
    from mt.model import DecoderState, Memory
    from mt.search import _BeamSearch

    H, V, T, eos = 4, 50, 12, 3
    g = torch.Generator().manual_seed(K * 100 + nbest)
    limit = torch.tensor([12, 3, 7, 1, 12, 5, 12, 10, 12, 11, 12, 9, 12, 6, 12, 12])[:n]

    def make():
        memory = Memory(torch.zeros(n * K, S, H), torch.zeros(n * K, S, H), torch.ones(n * K, S, dtype=torch.bool),
                        "triton")
        dec = DecoderState([torch.zeros(n * K, H) for _ in range(2)],
                           [torch.zeros(n * K, H) for _ in range(2)], torch.zeros(n * K, H))
        search = _BeamSearch(memory, dec, limit.clone(), T, K, nbest, lp, 2, eos, [0, 2])
        search.in_place = in_place
        return search

    ref, fused = make(), make()
    early = 0  # sentences stopped by the bound (no open hypothesis can win) before their limit
    for step in range(T):
        s = ref.state
        nw = s.scores.shape[0]
        val, col = _candidates(g, nw, K, V, eos, step, eos_rate=0.6)
        dec = DecoderState([torch.randn(nw * K, H, generator=g) for _ in range(2)],
                           [torch.randn(nw * K, H, generator=g) for _ in range(2)], torch.randn(nw * K, H, generator=g))
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
        assert all(torch.equal(x, y) for x, y in zip(a.dec.h + a.dec.c + [a.dec.feed], b.dec.h + b.dec.c + [b.dec.feed]))
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
    assert [[(h.tokens, h.log_prob) for h in hs] for hs in x.nbest] == [[(h.tokens, h.log_prob) for h in hs] for hs in y.nbest]


def test_beam_update_stops_when_the_best_open_hypothesis_only_ties():
    """K = 1: EOS and another token tie at -1.0; EOS (the lower column) closes a hypothesis, the
    other stays open with the same score, which cannot beat it: the sentence is done, in both."""
    _search_beam_module()
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


@pytest.mark.parametrize("T, n0, n, K, m, S", [(9, 6, 6, 3, 2, 5), (12, 7, 4, 5, 5, 3), (3, 2, 2, 2, 1, 300)])
def test_backtrack_kernel_follows_the_back_pointers(T, n0, n, K, m, S):
    """`search_beam.backtrack` (beam search's output on the device, one launch) against a plain
    per-hypothesis walk on random histories (every token and attention row it defines; the
    host's `reference.backtrack` has the same test in test_search.py); `steps` below the history's
    length, sentences [0, n)."""
    from conftest import assert_walked_back, random_beam_history

    search_beam = _search_beam_module()
    tok, bp, attn, info = history = random_beam_history(T * 10 + n, T, n0, K, S)
    steps = T - 1
    info[..., 0].clamp_(max=steps - 1)
    tokens, a = search_beam.backtrack(info, tok, bp, attn, n, m, steps)
    assert tokens.shape == (n, m, steps) and a.shape == (n, m, steps, S)
    assert_walked_back(history, tokens, a, n, m)
    with pytest.raises(ValueError, match="steps"):
        search_beam.backtrack(info, tok, bp, attn, n, m, T + 1)
    assert search_beam.backtrack_supported(attn)
    assert not search_beam.backtrack_supported(attn.double())
    assert search_beam.backtrack_supported(torch.zeros(1, 1, 1, 5000))  # any source length: the rows go in tiles


@pytest.mark.parametrize("in_place, S", [(False, 7), (True, 300)])
def test_greedy_update_kernel_matches_advance(in_place, S):
    """`_GreedySearch.advance_fused` (one Triton launch, plus the state's gather under graphs)
    against `advance` (the PyTorch bookkeeping) fed the same best tokens: every state tensor and
    the histories equal over steps with EOS, length limits and rows already done; S = 300: the
    attention row in three tiles."""
    from mt.kernels import search_greedy

    _search_beam_module()  # first: the greedy kernel calls one of its helpers
    if type(search_greedy._greedy_update_kernel).__name__ != "InterpretedFunction":
        importlib.reload(search_greedy)
    from mt.model import DecoderState, Memory
    from mt.search import _GreedySearch

    N, H, T, eos = 9, 4, 8, 3
    g = torch.Generator().manual_seed(S)
    limit = torch.tensor([8, 2, 5, 1, 8, 3, 8, 6, 7])

    def make():
        memory = Memory(torch.zeros(N, S, H), torch.zeros(N, S, H), torch.ones(N, S, dtype=torch.bool), "triton")
        dec = DecoderState([torch.zeros(N, H) for _ in range(2)], [torch.zeros(N, H) for _ in range(2)],
                           torch.zeros(N, H))
        search = _GreedySearch(memory, dec, limit.clone(), T, 2, eos, [0, 2])
        search.in_place = in_place
        search.reset(N - 1)  # the last row is padding: done from the start
        return search

    ref, fused = make(), make()
    for step in range(T):
        best = -torch.rand(N, generator=g) * 3
        tok = torch.randint(4, 50, (N,), generator=g)
        tok[torch.rand(N, generator=g) < 0.2] = eos
        dec = DecoderState([torch.randn(N, H, generator=g) for _ in range(2)],
                           [torch.randn(N, H, generator=g) for _ in range(2)], torch.randn(N, H, generator=g))
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
    search_greedy.greedy_update(best, tok, attn, fused.limit, s.t, s.done, s.scores, s.last, tok_buf[:T],
                                attn_buf[:T], eos)
    assert (tok_buf[T] == -7).all() and (attn_buf[T] == -7).all()
    assert torch.equal(tok_buf[:T], fused.tok_hist) and torch.equal(attn_buf[:T], fused.attn_hist)


@pytest.mark.parametrize("layers, H", [(1, 40), (4, 16)])
def test_gather_rows_moves_the_decoder_state_in_one_launch(layers, H):
    """`search_beam.gather_rows`: every destination row is its source's row `rows[r]` (repeats
    and all), cast to the destination's dtype (bf16 h, fp32 c, a bf16 feed into fp32), as
    index_select gives; 1 to MAX_STATE tensors. (A widening cast: the interpreter rounds fp32
    to bf16 differently from PyTorch.)"""
    search_beam = _search_beam_module()
    g = torch.Generator().manual_seed(layers)
    N = 12
    rows = torch.randint(0, N, (N,), generator=g)
    rows[:3] = 5  # the same beam continued three times
    srcs = [torch.randn(N, H, generator=g).to(torch.bfloat16) for _ in range(layers)]  # h
    srcs += [torch.randn(N, H, generator=g) for _ in range(layers)]  # c, fp32
    srcs += [torch.randn(N, H, generator=g).to(torch.bfloat16)]  # the feed, into fp32 below
    dsts = [torch.full((N, H), 7.0, dtype=torch.bfloat16 if i < layers else torch.float32)
            for i in range(2 * layers + 1)]
    assert len(srcs) <= search_beam.MAX_STATE and search_beam.gather_rows_supported(rows, srcs, dsts)
    search_beam.gather_rows(rows, srcs, dsts)
    for src, dst in zip(srcs, dsts):
        assert torch.equal(dst, src.index_select(0, rows).to(dst.dtype))


def test_gather_rows_refuses_what_it_cannot_take():
    search_beam = _search_beam_module()
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


def test_beam_update_refuses_what_it_cannot_take():
    search_beam = _search_beam_module()
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
        search_beam.beam_update(val, val.long(), z(6, 7), z(3).long(), z(3).long(), z(()).long(), z(12).double(),
                                z(3).bool(), (z(3, 2).double(), z(3, 2), z(3, 2, 3).long()), z(2, 3).t(), z(6).long(),
                                z(6).long(), z(9, 3, 2).long(), z(9, 3, 2).long(), z(9, 3, 2, 7), 3, 1)


def _beam_update_args(limit: int, t: int, T: int = 9, n: int = 3, K: int = 2, S: int = 7) -> dict:
    """Valid beam_update arguments: n open sentences of K beams at step t of a T-step history,
    every sentence's length limit `limit`, candidates from `_candidates`."""
    g = torch.Generator().manual_seed(5)
    val, col = _candidates(g, n, K, 50, 3, step=1, eos_rate=0.5)
    z = torch.zeros
    return dict(val=val, col=col, attn=torch.rand(n * K, S, generator=g), limit=torch.full((n,), limit),
                sent=torch.arange(n), t=torch.tensor(t), lp_table=torch.arange(1, T + 3, dtype=torch.float64),
                done=z(n, dtype=torch.bool),
                fin=(torch.full((n, K), float("-inf"), dtype=torch.float64), torch.full((n, K), float("-inf")),
                     z(n, K, 3, dtype=torch.long)),
                scores=z(n, K), last=z(n * K, dtype=torch.long), rows=z(n * K, dtype=torch.long),
                tok_hist=z(T, n, K, dtype=torch.long), bp_hist=z(T, n, K, dtype=torch.long), attn_hist=z(T, n, K, S),
                eos=3, nbest=1)


def test_beam_update_checks_shapes_and_stays_inside_the_length_penalty_table():
    """Wrong shapes are a ValueError, not stores to the wrong rows; and the length-penalty
    table (T + 2 entries) is read within its bounds whatever the limit (a limit past the
    history reads the last entry, as a limit of T + 1 does)."""
    search_beam = _search_beam_module()
    for name, bad in (("attn_hist", torch.zeros(9, 3, 2, 6)), ("val", torch.zeros(6, 3)), ("limit", torch.zeros(2)),
                      ("lp_table", torch.zeros(10, dtype=torch.float64))):
        with pytest.raises(ValueError, match=name):
            search_beam.beam_update(**{**_beam_update_args(5, 2), name: bad})
    outs = []
    for limit in (9 + 1, 10**9):
        args = _beam_update_args(limit, t=8)
        search_beam.beam_update(**args)
        outs.append([args[k] for k in ("done", "scores", "last", "rows", "tok_hist", "bp_hist", "attn_hist")]
                    + list(args["fin"]))
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    assert outs[0][4][8].any()  # the last step's tokens were written
