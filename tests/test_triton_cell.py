"""The gate cell, mt/kernels/triton_cell.py: its Triton kernels (under the CPU interpreter) against
the PyTorch reference at each dtype's tolerance, the reference against nn.LSTM / nn.LSTMCell and
gradcheck, the backend dispatch, the deferred weight gradients, and the compiled variants.

Where there is no GPU the kernels run on CPU tensors through the Triton interpreter; on a GPU
machine the cases marked gpu run the compiled kernels on CUDA (tests/kernel_utils.py).
"""

from __future__ import annotations

import pytest
import torch
from kernel_utils import compiled, interpreted, kernel_module, record_variants
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from mt import kernels
from mt.kernels import reference

pytest.importorskip("triton")
triton_cell = kernel_module("triton_cell")

# (atol, rtol) for Triton vs reference in the same dtype. bf16/fp16 differ by rounding: the
# reference rounds gates/grads to the dtype after each op, the kernels keep fp32 in registers.
TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (4e-2, 4e-2),
}


def close(actual, expected, dtype, what):
    atol, rtol = TOL[dtype]
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def cell_inputs(dtype, B, H, K, with_pre, with_bias, transposed, seed=0):
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


def run_cell(impl, inputs, seed=1):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in inputs]
    inp, c, weight, pre, bias = leaves
    h_new, c_new = impl.cell_step(inp, c, weight, pre=pre, bias=bias)
    g = torch.Generator().manual_seed(seed)
    loss = (h_new.float() * torch.randn(h_new.shape, generator=g)).sum()
    loss = loss + (c_new.float() * torch.randn(c_new.shape, generator=g)).sum()
    loss.backward()
    grads = [x.grad if x is not None else None for x in leaves]
    return (h_new, c_new), grads


@interpreted
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
    inputs = cell_inputs(dtype, B, H, K, with_pre, with_bias, transposed)
    (h_t, c_t), grads_t = run_cell(triton_cell, inputs)
    (h_r, c_r), grads_r = run_cell(reference, inputs)
    close(h_t, h_r, dtype, "h'")
    close(c_t, c_r, dtype, "c'")
    for name, gt, gr in zip(("inp", "c", "weight", "pre", "bias"), grads_t, grads_r):
        if gr is None:
            assert gt is None
            continue
        close(gt, gr, dtype, f"d {name}")


def seq_inputs(dtype, D, B, T, H, lengths, with_state, seed=0):
    g = torch.Generator().manual_seed(seed)
    xproj = torch.randn(D, B, T, 4 * H, generator=g).to(dtype)
    # a non-contiguous stack of transposes, as the model builds it from (4H, H) parameters
    w_hh = (torch.randn(D, 4 * H, H, generator=g) / H**0.5).to(dtype).transpose(1, 2)
    h0 = torch.randn(D, B, H, generator=g).to(dtype) if with_state else None
    c0 = torch.randn(D, B, H, generator=g) if with_state else None
    lens = torch.tensor(lengths) if lengths is not None else None
    return xproj, w_hh, lens, h0, c0


def run_seq(impl, inputs, seed=1):
    xproj, w_hh, lens, h0, c0 = inputs
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (xproj, w_hh, h0, c0)]
    xp, w, h, c = leaves
    out, h_n, c_n = impl.lstm_sequence(xp, w, lengths=lens, h0=h, c0=c)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in (out, h_n, c_n))
    loss.backward()
    return (out, h_n, c_n), [x.grad if x is not None else None for x in leaves]


@interpreted
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
    inputs = seq_inputs(dtype, D, B, T, H, lengths, with_state)
    outs_t, grads_t = run_seq(triton_cell, inputs)
    outs_r, grads_r = run_seq(reference, inputs)
    for name, a, b in zip(("out", "h_n", "c_n"), outs_t, outs_r):
        close(a, b, dtype, name)
    for name, a, b in zip(("xproj", "w_hh", "h0", "c0"), grads_t, grads_r):
        if b is None:
            assert a is None
            continue
        close(a, b, dtype, f"d {name}")
    if lengths is not None:  # padded positions output exact zeros
        mask = torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None]  # (B, T)
        assert (outs_t[0][:, mask] == 0).all()


def _scaled_err(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    """The largest |x - ref| / (1 + max |ref|) over pairs of tensors."""
    return max(((x - y).abs().max() / (1 + y.abs().max())).item() for x, y in zip(outs, refs))


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_cell_step_on_cuda_matches_reference(dtype, tol):
    """The compiled kernels (fp32 with IEEE dots, and bf16) against the reference on CUDA, with
    `pre`, a bias and a transposed weight view, more than one tile of B and K: h', c' and every
    gradient within `tol` of 1 + the reference's largest value."""
    err = _cell_step_err_on_cuda(dtype)
    assert err < tol, err


@pytest.mark.gpu
@pytest.mark.tf32
@compiled
def test_cell_step_on_cuda_in_tf32_by_default():
    """PyTorch's defaults (cuDNN TF32 on): the fp32 kernels compile with TF32 dots, and stay
    within TF32's rounding (10 bits of mantissa) of the IEEE reference."""
    assert torch.backends.cudnn.allow_tf32 and triton_cell.fp32_precision() == "tf32"
    err = _cell_step_err_on_cuda(torch.float32)
    assert err < 1e-2, err


def _cell_step_err_on_cuda(dtype) -> float:
    torch.manual_seed(0)
    dev = "cuda"
    B, K, H = 37, 96, 64
    inp = torch.randn(B, K, device=dev, dtype=dtype)
    c = torch.randn(B, H, device=dev, dtype=torch.float32)
    w = (torch.randn(4 * H, K, device=dev, dtype=dtype) / K**0.5).t()  # a transposed view
    pre = torch.randn(B, 4 * H, device=dev, dtype=dtype)
    bias = torch.randn(4 * H, device=dev, dtype=dtype)
    outs = []
    for impl in (triton_cell, reference):
        args = [t.detach().clone().requires_grad_() for t in (inp, c, w, pre, bias)]
        h2, c2 = impl.cell_step(args[0], args[1], args[2], pre=args[3], bias=args[4])
        (h2.float().square().sum() + (c2 * 0.5).sum()).backward()
        outs.append([h2.float(), c2.float()] + [a.grad.float() for a in args])
    return _scaled_err(*outs)


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_lstm_sequence_on_cuda_matches_reference(dtype, tol):
    """The compiled kernels against the reference on CUDA: both directions over 9 steps, lengths
    with an empty sequence, an initial state; out, h_n, c_n and every gradient within `tol` of
    1 + the reference's largest value."""
    torch.manual_seed(0)
    dev = "cuda"
    D, B, T, H = 2, 8, 9, 64
    lengths = torch.tensor([9, 4, 1, 7, 9, 2, 5, 0], device=dev)
    xproj = torch.randn(D, B, T, 4 * H, device=dev, dtype=dtype)
    w_hh = (torch.randn(D, 4 * H, H, device=dev, dtype=dtype) / H**0.5).transpose(1, 2)
    h0 = torch.randn(D, B, H, device=dev, dtype=dtype)
    c0 = torch.randn(D, B, H, device=dev, dtype=torch.float32)
    outs = []
    for impl in (triton_cell, reference):
        args = [t.detach().clone().requires_grad_() for t in (xproj, w_hh, h0, c0)]
        out, h_n, c_n = impl.lstm_sequence(args[0], args[1], lengths, h0=args[2], c0=args[3])
        (out.float().square().sum() + 2 * h_n.float().sum() + 3 * c_n.sum()).backward()
        outs.append([out.float(), h_n.float(), c_n.float()] + [a.grad.float() for a in args])
    err = _scaled_err(*outs)
    assert err < tol, err


@interpreted
def test_inference_matches_training_forward():
    """Under no_grad the kernels skip saving activations; the outputs must not change."""
    seq = seq_inputs(torch.float32, 2, 3, 4, 16, [4, 1, 2], True)
    cell = cell_inputs(torch.float32, 3, 16, 32, True, True, True)
    with torch.no_grad():
        seq_a = triton_cell.lstm_sequence(*seq)
        cell_a = triton_cell.cell_step(*cell)
    seq_b = triton_cell.lstm_sequence(seq[0].clone().requires_grad_(), *seq[1:])
    cell_b = triton_cell.cell_step(cell[0].clone().requires_grad_(), *cell[1:])
    for a, b in zip(seq_a + cell_a, seq_b + cell_b):
        assert not a.requires_grad and b.requires_grad
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@interpreted
def test_dispatch_reaches_triton():
    inputs = cell_inputs(torch.float32, 3, 16, 32, True, True, True)
    inp, c, weight, pre, bias = inputs
    h1, c1 = kernels.cell_step(inp, c, weight, pre=pre, bias=bias, backend="triton")
    h2, c2 = triton_cell.cell_step(inp, c, weight, pre=pre, bias=bias)
    torch.testing.assert_close(h1, h2, atol=0, rtol=0)
    torch.testing.assert_close(c1, c2, atol=0, rtol=0)
    xproj, w_hh, lens, h0, c0 = seq_inputs(torch.float32, 2, 3, 3, 16, [3, 1, 2], True)
    out1 = kernels.lstm_sequence(xproj, w_hh, lens, h0, c0, backend="triton")
    out2 = reference.lstm_sequence(xproj, w_hh, lens, h0, c0)
    for a, b in zip(out1, out2):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_float64_falls_back_to_reference():
    inputs = cell_inputs(torch.float64, 3, 16, 16, True, True, True)
    inputs = tuple(x.double() if x is not None else None for x in inputs)
    a = triton_cell.cell_step(*inputs)
    b = reference.cell_step(*inputs)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    xproj, w_hh, lens, _, _ = seq_inputs(torch.float64, 2, 2, 3, 16, [3, 1], False)
    out_t = triton_cell.lstm_sequence(xproj, w_hh, lens)
    out_r = reference.lstm_sequence(xproj, w_hh, lens)
    assert out_t[2].dtype == torch.float64
    for x, y in zip(out_t, out_r):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


@interpreted
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
            h0, c0 = kernels.cell_step(torch.cat([h1, h0], 1), c0, W0, pre=leaves[3][t], backend=backend, bank=banks[0])
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


@interpreted
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
    assert torch.autograd.gradcheck(lambda i, c, w, p, b: reference.cell_step(i, c, w, pre=p, bias=b), args)


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
@pytest.mark.parametrize("impl", [reference, pytest.param(triton_cell, marks=interpreted)], ids=["torch", "triton"])
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


@interpreted
def test_compiled_variants_do_not_depend_on_batch_size_or_length(monkeypatch):
    """Batches come in many sizes and lengths: if Triton specialized on B or T (divisible by 16
    or not), every kernel would compile up to 4 times, each compile about a second of the
    recipe's first minute. Same tiles (BLOCK_B = 64 for B in 65..80), same variants."""
    keys = record_variants(monkeypatch)
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
    assert kernels == {
        "_cell_forward_kernel",
        "_cell_backward_kernel",
        "_lstm_step_forward_kernel",
        "_lstm_step_backward_kernel",
    }
    assert len(set(variants.values())) == 1, {s: len(v) for s, v in variants.items()}
    # one variant per kernel here: the backward's first launch (no later step) is not another
    assert len(next(iter(variants.values()))) == 4


def test_fp32_dots_follow_cudnn_tf32_flag(monkeypatch):
    """fp32 dots run as PyTorch lets cuDNN run (TF32 by default, IEEE with the flag off, as
    trainer.tf32=false sets it); MT_TRITON_FP32_PRECISION overrides; 16-bit operands are unaffected."""
    monkeypatch.delenv("MT_TRITON_FP32_PRECISION", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert triton_cell.fp32_precision() == "tf32"
    assert triton_cell._precision(torch.float32) == "tf32" and triton_cell._precision(torch.bfloat16) == "ieee"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert triton_cell.fp32_precision() == "ieee"
    monkeypatch.setenv("MT_TRITON_FP32_PRECISION", "tf32x3")
    assert triton_cell.fp32_precision() == "tf32x3"
    monkeypatch.setenv("MT_TRITON_FP32_PRECISION", "fast")
    with pytest.raises(ValueError, match="MT_TRITON_FP32_PRECISION='fast'"):
        triton_cell.fp32_precision()


@interpreted
@pytest.mark.parametrize("allow", [True, False])
def test_launches_pass_the_fp32_precision(monkeypatch, allow):
    """Every kernel of an fp32 step that has a dot compiles for the precision the flag selects."""
    monkeypatch.delenv("MT_TRITON_FP32_PRECISION", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow)
    keys = record_variants(monkeypatch)
    xproj = torch.randn(1, 3, 4, 64, requires_grad=True)
    w_hh = (torch.randn(1, 16, 64) / 4).requires_grad_()
    out, h_n, c_n = triton_cell.lstm_sequence(xproj, w_hh, torch.tensor([4, 2, 3]))
    h, c = triton_cell.cell_step(torch.randn(3, 32, requires_grad=True), torch.zeros(3, 16), torch.randn(32, 64))
    (out.sum() + h.sum() + c.sum()).backward()
    with_dots = [dict(k[2:])["INPUT_PRECISION"] for k in keys if "INPUT_PRECISION" in dict(k[2:])]
    assert len(with_dots) == 3 and set(with_dots) == {"tf32" if allow else "ieee"}, (
        keys
    )  # (the cell's backward: no dot)
