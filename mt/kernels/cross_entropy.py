"""The training loss and its gradient in one Triton kernel: label-smoothed cross-entropy over the
output layer's logits, fused.

    cross_entropy_sums(logits, target, label_smoothing, ignore_index) -> (loss_sum, nll_sum)

logits (N, V) in the compute dtype (bf16 under autocast), target (N,) int64. loss_sum is what
`nn.CrossEntropyLoss(ignore_index=..., label_smoothing=eps, reduction="sum")` returns on the
logits in fp32; nll_sum is the same without smoothing (the perplexity's numerator), which carries
no gradient. `reference.cross_entropy_sums` is the same function in plain PyTorch (the oracle).

One program per row (a target token), two passes over its V logits in BLOCK-wide tiles:

1. a running max, sum of exp and sum of the logits (online softmax, in fp32), then
   lse = log sum exp, nll = lse - x[target], smooth = lse - mean(x), and the row's loss
   (1 - eps) * nll + eps * smooth (0 at ignore_index rows);
2. the gradient of the row's loss, softmax(x) - (1 - eps) * onehot(target) - eps / V, written
   in the logits' dtype (0 at ignore_index rows).

The forward pass thus computes the backward's gradient too (as Liger-Kernel's fused cross-entropy
does); autograd's backward only scales it by the incoming gradient (1 / tokens in training). The
row sums are two torch reductions.

Why: PyTorch's path casts the (N, V) logits to fp32, takes a log-softmax for the loss and
another for the NLL, gathers, sums the smoothing term, and in the backward runs the
log-softmax's and the gather's backwards and casts the gradient back: about a dozen kernels
and several fp32 passes over N x V, where this is one launch that reads the logits twice and
writes the gradient once. The kernel count matters in a graphed step of a few milliseconds
(issue of the step's latency floor: docs/gpu.md, "Fused loss").

The loop over V has a runtime bound (a while loop: the interpreter cannot run a range() with a
runtime bound), and N, V and the strides are not specialized, so a model compiles one variant
per logits dtype, whatever its batch shapes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import common

BLOCK = 2048  # logits per tile: 4 KiB of bf16; V = 8000 in 4 tiles, 32k in 16


@triton.jit(do_not_specialize=["V", "stride_x", "stride_g", "ignore_index", "eps"])
def _cross_entropy_kernel(
    x_ptr,  # (N, V) logits, any float dtype, row r at r * stride_x
    target_ptr,  # (N,) int64
    loss_ptr,  # (N,) fp32 out: the row's label-smoothed loss
    nll_ptr,  # (N,) fp32 out: the row's -log p(target)
    grad_ptr,  # (N, V) out (if HAS_GRAD): d loss_row / d x, row r at r * stride_g
    V,
    stride_x,
    stride_g,
    ignore_index,
    eps,  # fp32 label smoothing
    HAS_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    row = x_ptr + r * stride_x
    tgt = tl.load(target_ptr + r)
    ignored = tgt == ignore_index
    # pass 1: max, sum of exp (rescaled as the max grows) and sum of the logits, all fp32
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    sx = tl.zeros([], tl.float32)
    v0 = 0
    while v0 < V:
        cols = v0 + tl.arange(0, BLOCK)
        valid = cols < V
        x = tl.load(row + cols, mask=valid, other=float("-inf")).to(tl.float32)  # (BLOCK,)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.where(valid, tl.exp(x - m_new), 0.0), axis=0)
        sx += tl.sum(tl.where(valid, x, 0.0), axis=0)
        m = m_new
        v0 += BLOCK
    lse = m + tl.log(s)
    in_range = (tgt >= 0) & (tgt < V)  # an ignored row's target may be any id: read nothing there
    x_tgt = tl.load(row + tgt, mask=in_range & (tgt != ignore_index), other=0.0).to(tl.float32)
    nll = lse - x_tgt
    loss = (1.0 - eps) * nll + eps * (lse - sx / V)
    tl.store(loss_ptr + r, tl.where(ignored, 0.0, loss))
    tl.store(nll_ptr + r, tl.where(ignored, 0.0, nll))
    if HAS_GRAD:
        # pass 2: softmax - (1 - eps) * onehot - eps / V, zero for an ignored row
        keep = tl.where(ignored, 0.0, 1.0)
        g_row = grad_ptr + r * stride_g
        v0 = 0
        while v0 < V:
            cols = v0 + tl.arange(0, BLOCK)
            valid = cols < V
            x = tl.load(row + cols, mask=valid, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - eps / V - tl.where(cols == tgt, 1.0 - eps, 0.0)
            tl.store(g_row + cols, (g * keep).to(grad_ptr.dtype.element_ty), mask=valid)
            v0 += BLOCK


def supported(logits: Tensor) -> bool:
    """Whether the kernel takes these logits (else `reference.cross_entropy_sums`)."""
    return common.runs_here(logits) and logits.dim() == 2 and logits.shape[1] >= 1 and logits.is_floating_point()


def _launch(logits: Tensor, target: Tensor, eps: float, ignore_index: int, with_grad: bool):
    """(loss per row, nll per row, gradient or None): see the module docstring."""
    N, V = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    target = target.contiguous()
    loss = torch.empty(N, device=logits.device, dtype=torch.float32)
    nll = torch.empty_like(loss)
    grad = torch.empty((N, V), device=logits.device, dtype=logits.dtype) if with_grad else None
    if N:
        _cross_entropy_kernel[(N,)](
            logits,
            target,
            loss,
            nll,
            grad if with_grad else loss,  # not written without HAS_GRAD
            V,
            logits.stride(0),
            V if with_grad else 0,
            ignore_index,
            float(eps),
            HAS_GRAD=with_grad,
            BLOCK=BLOCK,
            num_warps=8,
        )
    return loss, nll, grad


class _CrossEntropySums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, eps: float, ignore_index: int):
        loss, nll, grad = _launch(logits, target, eps, ignore_index, with_grad=True)
        ctx.save_for_backward(grad)
        nll_sum = nll.sum()
        ctx.mark_non_differentiable(nll_sum)
        return loss.sum(), nll_sum

    @staticmethod
    def backward(ctx, g_loss: Tensor, g_nll: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * g_loss.to(grad.dtype), None, None, None


def cross_entropy_sums(
    logits: Tensor, target: Tensor, label_smoothing: float = 0.0, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """See the module docstring: (loss_sum, nll_sum), fp32 scalars; loss_sum differentiable in
    `logits` when autograd records."""
    if target.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy_sums: {tuple(target.shape)} targets for logits {tuple(logits.shape)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1] (got {label_smoothing})")
    if torch.is_grad_enabled() and logits.requires_grad:
        return _CrossEntropySums.apply(logits, target, label_smoothing, ignore_index)
    loss, nll, _ = _launch(logits, target, label_smoothing, ignore_index, with_grad=False)
    return loss.sum(), nll.sum()


__all__ = ["supported", "cross_entropy_sums"]
