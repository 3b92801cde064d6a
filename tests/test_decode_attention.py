"""A decoding step's attention, mt/kernels/decode_attention.py: the forward kernel and training's
backward kernel (under the CPU interpreter) against the PyTorch ops of `reference.attention_step`
and autograd through them, what the kernels refuse, and the edge cases of the backward.

TRITON_INTERPRET=1 is set before anything imports triton, so the kernels run on CPU tensors.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton`

import pytest  # noqa: E402
import torch  # noqa: E402
from kernel_utils import kernel_module  # noqa: E402

from mt import kernels  # noqa: E402
from mt.kernels import reference  # noqa: E402

pytest.importorskip("triton")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B, S, Q, M", [(5, 7, 16, 16), (3, 13, 48, 40), (2, 11, 1024, 512), (4, 1, 8, 24)])
def test_attention_step_triton_matches_reference(dtype, tol, B, S, Q, M):
    """One decoding step's dot/general attention: the fused kernel against the PyTorch ops, with
    padding (a row of one real token), keys, memory and mask rows taken from wider tensors
    (row strides), sources longer than one tile (Q = 1024: 4 positions a tile), sizes that are
    not powers of two; a query with a column stride is refused."""
    decode_attention = kernel_module("decode_attention")
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
    decode_attention = kernel_module("decode_attention")
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
        # copies, also where dt is already the dtype (.to would return the tensor itself, and the
        # second and third runs would add their gradients into one); rows of wider tensors: the
        # kernels take row strides
        leaves = [query.to(dt, copy=True).requires_grad_(),
                  torch.zeros(B, S, M + 3, dtype=dt)[:, :, :M].copy_(memory).requires_grad_()]
        if not shared:
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
    d_q, = torch.autograd.grad(ctx.square().sum(), q_, create_graph=True)  # (d context depends on q)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        d_q.sum().backward()
    # (meta tensors: strides without the 8 GB of memory; "runs here" stands in for the device check)
    far = torch.empty(1, 2, 2**30 + 8, device="meta")[:, :, :8]  # row stride 2**30 + 8: offsets past int32
    monkeypatch.setattr(decode_attention.common, "runs_here", lambda t: True)
    qm, mm = torch.empty(1, 8, device="meta"), torch.ones(1, 2, dtype=torch.bool, device="meta")
    assert not decode_attention.supported(qm, far, far, mm)
    assert decode_attention.supported(qm, far[:, :1], far[:, :1], mm[:, :1])  # one position: offset 0
