"""A decoding step's attention, mt/kernels/decode_attention.py: the forward kernel and training's
backward kernel (under the CPU interpreter) against the PyTorch ops of `reference.attention_step`
and autograd through them, what the kernels refuse, and the edge cases of the backward.

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


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "device, B, S, Q, M",
    [
        cpu(5, 7, 16, 16),
        cpu(3, 13, 48, 40),
        cpu(2, 11, 1024, 512),
        cpu(4, 1, 8, 24),
        cuda(640, 20, 512, 512),
        cuda(640, 200, 512, 512),
    ],
)
def test_attention_step_triton_matches_reference(dtype, tol, device, B, S, Q, M):
    """One decoding step's dot/general attention: the fused kernel against the PyTorch ops, with
    padding (a row of one real token), keys, memory and mask rows taken from wider tensors
    (row strides), sources longer than one tile (Q = 1024: 4 positions a tile), sizes that are
    not powers of two; a query with a column stride is refused. On CUDA, the compiled kernel at
    a beam-5 batch's rows (640) and at long sources (25 tiles a row), launched ten times: the
    same bits every time (a race between a program's warps would show as launches that differ)."""
    decode_attention = kernel_module("decode_attention")
    g = torch.Generator().manual_seed(B * S + Q)

    def on(x):  # (moved before the slicing: the views keep their strides on the device)
        return x.to(device=device, dtype=dtype)

    query = on(torch.randn(B, 2 * Q, generator=g) * 0.3)[:, ::2] if Q > 8 else on(torch.randn(B, Q, generator=g))
    keys = on(torch.randn(B, S, Q + 5, generator=g))[:, :, :Q]  # rows of a wider tensor
    memory = on(torch.randn(B, S, M + 3, generator=g))[:, :, :M]
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    lengths[0] = 1
    mask = (torch.arange(S + 2)[None, :] < lengths[:, None]).to(device)[:, :S]
    if query.stride(1) != 1:  # the kernel wants contiguous rows: the wrapper's caller (the model) has them
        assert not decode_attention.supported(query, keys, memory, mask)
        query = query.contiguous()
    assert decode_attention.supported(query, keys, memory, mask)
    ctx, w = decode_attention.attention_step(query, keys, memory, mask)
    for _ in range(9 if device == "cuda" else 0):
        again = decode_attention.attention_step(query, keys, memory, mask)
        assert torch.equal(again[0], ctx) and torch.equal(again[1], w)
    ref_ctx, ref_w = reference.attention_step(query, keys, memory, mask)
    assert ctx.dtype == dtype and w.dtype == torch.float32 and ctx.shape == (B, M) and w.shape == (B, S)
    torch.testing.assert_close(w, ref_w, atol=tol, rtol=tol)
    # on CUDA's large cases, the context within tol of 1 + its largest value: a bf16 score that
    # rounds the other way on one side (sums in another order) moves a weight, and the context
    ctx_atol = tol * (1 + ref_ctx.float().abs().max().item()) if device == "cuda" else tol
    torch.testing.assert_close(ctx.float(), ref_ctx.float(), atol=ctx_atol, rtol=tol)
    assert (w[~mask] == 0).all() and torch.allclose(w.sum(-1), torch.ones(B, device=device), atol=1e-5)
    # the dispatcher takes the kernel for Triton, the reference otherwise, and the same answer
    torch.testing.assert_close(kernels.attention_step(query, keys, memory, mask, backend="triton")[1], w)
    torch.testing.assert_close(kernels.attention_step(query, keys, memory, mask, backend="torch")[1], ref_w)


@interpreted
def test_attention_step_refuses_what_it_cannot_take():
    decode_attention = kernel_module("decode_attention")
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
@pytest.mark.parametrize(
    "device, B, S, Q, M, d_weights, shared",
    [
        cpu(5, 7, 16, 16, True, False),
        cpu(3, 13, 48, 40, False, False),
        cpu(2, 300, 16, 24, True, False),
        cpu(4, 6, 32, 32, False, True),
        cpu(3, 70, 512, 512, True, False),
        cuda(128, 20, 512, 512, False, False),
        cuda(128, 20, 512, 512, True, False),
        cuda(128, 20, 512, 512, False, True),
        cuda(128, 200, 512, 512, True, False),
    ],
)
def test_attention_step_backward_matches_autograd_of_the_reference(dtype, tol, device, B, S, Q, M, d_weights, shared):
    """Training's attention: the fused forward + backward kernels (`attention_step_autograd`)
    and autograd through the PyTorch ops, both against the PyTorch ops in fp64: the gradients of
    query, keys and memory for a loss on the context (and on the weights: `d_weights`). The
    kernels' scaled error is at most `tol` or three times the PyTorch ops' own: in bf16 the two
    differ from each other by more than either does from fp64 (they round g to bf16 after
    summing in different orders, then subtract its weighted mean), and the interpreter rounds
    fp32 to bf16 by truncation (up to 2.6x the PyTorch ops' error here; on CUDA, which rounds to
    nearest as PyTorch does, twice). With padding (a row of one real token), keys and memory
    rows taken from wider tensors, sources of two tiles (S = 300), sizes that are not powers of
    two, and dot attention's keys that are the memory (`shared`: autograd adds the two
    gradients). On CUDA, the compiled kernels at the training bench's shape (a loss on the
    context alone, as training runs; on the context and the weights; keys that are the memory)
    and at a long source, and ten backward launches that must give the same bits."""
    decode_attention = kernel_module("decode_attention")
    g = torch.Generator().manual_seed(B * S + Q + 7)
    query = torch.randn(B, Q, generator=g).to(device)
    memory = torch.randn(B, S, M + 3, generator=g).to(device)[:, :, :M]
    keys = memory if shared else (torch.randn(B, S, Q + 5, generator=g) * 0.3).to(device)[:, :, :Q]
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    lengths[0] = 1
    mask = (torch.arange(S)[None, :] < lengths[:, None]).to(device)
    d_context = torch.randn(B, M, generator=g).to(device)
    d_w = torch.randn(B, S, generator=g).to(device) if d_weights else None
    grads = []
    for fn, dt in (
        (reference.attention_step, torch.float64),
        (reference.attention_step, dtype),
        (decode_attention.attention_step_autograd, dtype),
    ):
        # copies, also where dt is already the dtype (.to would return the tensor itself, and the
        # second and third runs would add their gradients into one); rows of wider tensors: the
        # kernels take row strides
        leaves = [
            query.to(dt, copy=True).requires_grad_(),
            torch.zeros(B, S, M + 3, dtype=dt, device=device)[:, :, :M].copy_(memory).requires_grad_(),
        ]
        if not shared:
            leaves.append(torch.zeros(B, S, Q + 5, dtype=dt, device=device)[:, :, :Q].copy_(keys).requires_grad_())
        q_, m_ = leaves[0], leaves[1]
        k_ = m_ if shared else leaves[2]
        ctx, w = fn(q_, k_, m_, mask)
        torch.autograd.backward(
            [ctx, w] if d_weights else [ctx], [d_context.to(dt), d_w] if d_weights else [d_context.to(dt)]
        )
        grads.append([x.grad for x in leaves])
    for name, truth, ref, ours in zip(("query", "memory", "keys"), *grads):
        assert ours.dtype == dtype and ours.shape == truth.shape, name
        err, ref_err = _scaled_error(ours, truth), _scaled_error(ref, truth)
        assert err <= max(tol, (2 if device == "cuda" else 3) * ref_err), (name, err, ref_err)
    if not shared:  # padding positions get no gradient
        assert (grads[2][2][~mask] == 0).all() and (grads[2][1][~mask] == 0).all()
    if device == "cuda":  # the backward kernel launched ten times: the same bits every time
        q_, m_ = query.to(dtype), memory.to(dtype)
        k_ = m_ if shared else keys.to(dtype)
        w = decode_attention.attention_step(q_, k_, m_, mask)[1]
        runs = [
            decode_attention.attention_step_backward(q_, k_, m_, mask, w, d_context.to(dtype), d_w) for _ in range(10)
        ]
        assert all(torch.equal(x, y) for run in runs[1:] for x, y in zip(run, runs[0]))


@interpreted
def test_attention_step_backward_without_a_context_gradient():
    """Only the weights reach the loss (d context is None): the backward runs on a zero d context
    and agrees with the reference."""
    decode_attention = kernel_module("decode_attention")
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


@interpreted
@pytest.mark.filterwarnings("ignore:invalid value encountered")  # (the interpreter, on the NaN row)
def test_attention_step_backward_edge_cases(monkeypatch):
    """A row with no real token: NaN weights and d memory, as with the PyTorch ops, and no
    gradient through its scores (d query, d keys 0: the mask's backward), the other rows
    unaffected. The backward is once differentiable: a second derivative is an error, not a
    silent zero. Rows too far apart for the kernels' int32 offsets go to the PyTorch ops."""
    decode_attention = kernel_module("decode_attention")
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
    (d_q,) = torch.autograd.grad(ctx.square().sum(), q_, create_graph=True)  # (d context depends on q)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        d_q.sum().backward()
    # (meta tensors: strides without the 8 GB of memory; "runs here" stands in for the device check)
    far = torch.empty(1, 2, 2**30 + 8, device="meta")[:, :, :8]  # row stride 2**30 + 8: offsets past int32
    monkeypatch.setattr(decode_attention.common, "runs_here", lambda t: True)
    qm, mm = torch.empty(1, 8, device="meta"), torch.ones(1, 2, dtype=torch.bool, device="meta")
    assert not decode_attention.supported(qm, far, far, mm)
    assert decode_attention.supported(qm, far[:, :1], far[:, :1], mm[:, :1])  # one position: offset 0
