"""The training loss and its gradient in Triton kernels: label-smoothed cross-entropy over the
output layer's logits, fused (one kernel forward, one backward).

    cross_entropy_sums(logits, target, label_smoothing, ignore_index) -> (loss_sum, nll_sum)

logits (N, V) in the compute dtype (bf16 under autocast), target (N,) int64. loss_sum is what
`nn.CrossEntropyLoss(ignore_index=..., label_smoothing=eps, reduction="sum")` returns on the
logits in fp32; nll_sum is the same without smoothing (the perplexity's numerator), which carries
no gradient. `reference.cross_entropy_sums` is the same function in plain PyTorch (the oracle).

Two kernels, one program per row (a target token), each a loop over the row's V logits in
BLOCK-wide tiles:

- `_cross_entropy_forward_kernel`: a running max, sum of exp and sum of the logits (online
  softmax, fp32), then lse = log sum exp, nll = lse - x[target], smooth = lse - mean(x), and the
  row's loss (1 - eps) * nll + eps * smooth; 0 at ignore_index rows. It keeps lse per row.
- `_cross_entropy_backward_kernel` (while autograd records, in the backward):
  scale * (softmax(x) - (1 - eps) * onehot(target) - eps / V), softmax from the kept lse, with
  the incoming gradient `scale` read from device memory in fp32 (no host sync: CUDA graphs
  capture it), rounded once to the logits' dtype as PyTorch's path rounds it; 0 at ignore_index
  rows.

The forward keeps the logits for the backward instead of an fp32 log-softmax; the rows' sums are
two torch reductions.

Why: PyTorch's path casts the (N, V) logits to fp32, takes a log-softmax for the loss and
another for the NLL, gathers, sums the smoothing term, and in the backward runs the
log-softmax's and the gather's backwards and casts the gradient back: about a dozen kernels and
several fp32 passes over N x V, where this is two launches that read the logits twice and write
the gradient once. The kernel count matters in a graphed step of a few milliseconds
(docs/gpu.md, "Fused loss").

Targets must lie in [0, V) or equal ignore_index: PyTorch raises for others, which would need a
host sync here; the kernels assert it only under TRITON_DEBUG=1 (elsewhere such a row reads no
logit: its nll is lse).

Compiled variants: the loops over V have a runtime bound (while loops: the interpreter cannot
run a range() with a runtime bound) and the row count and padding id are not specialized, so a
model compiles the two kernels once per logits dtype (V and the row strides specialize only on
their divisibility by 16, which lets the tiles' loads vectorize).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import common

BLOCK = 2048  # logits per tile: 4 KiB of bf16; V = 8000 in 4 tiles, 32k in 16


@triton.jit(do_not_specialize=["ignore_index", "eps"])
def _cross_entropy_forward_kernel(
    x_ptr,  # (N, V) logits, any float dtype, row r at r * stride_x
    target_ptr,  # (N,) int64
    loss_ptr,  # (N,) fp32 out: the row's label-smoothed loss
    nll_ptr,  # (N,) fp32 out: the row's -log p(target)
    lse_ptr,  # (N,) fp32 out: the row's log-sum-exp (for the backward)
    V,
    stride_x,
    ignore_index,
    eps,  # fp32 label smoothing
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    row = x_ptr + r * stride_x
    tgt = tl.load(target_ptr + r)
    ignored = tgt == ignore_index
    in_range = (tgt >= 0) & (tgt < V)
    tl.device_assert(ignored | in_range, "cross_entropy: a target outside [0, V) that is not ignore_index")
    # max, sum of exp (rescaled as the max grows) and sum of the logits, all fp32
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    sx = tl.zeros([], tl.float32)
    v0 = 0
    while v0 < V:
        cols = tl.multiple_of(v0, BLOCK) + tl.arange(0, BLOCK)
        valid = cols < V
        x = tl.load(row + cols, mask=valid, other=float("-inf")).to(tl.float32)  # (BLOCK,)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.where(valid, tl.exp(x - m_new), 0.0), axis=0)
        sx += tl.sum(tl.where(valid, x, 0.0), axis=0)
        m = m_new
        v0 += BLOCK
    lse = m + tl.log(s)
    x_tgt = tl.load(row + tgt, mask=in_range & ~ignored, other=0.0).to(tl.float32)  # an ignored row reads nothing
    nll = lse - x_tgt
    loss = (1.0 - eps) * nll + eps * (lse - sx / V)
    tl.store(loss_ptr + r, tl.where(ignored, 0.0, loss))
    tl.store(nll_ptr + r, tl.where(ignored, 0.0, nll))
    tl.store(lse_ptr + r, lse)


@triton.jit(do_not_specialize=["ignore_index", "eps"])
def _cross_entropy_backward_kernel(
    x_ptr,  # (N, V) logits, row r at r * stride_x
    target_ptr,  # (N,) int64
    lse_ptr,  # (N,) fp32: the forward's log-sum-exp
    scale_ptr,  # () fp32: d out / d loss_sum (the incoming gradient)
    grad_ptr,  # (N, V) out, the logits' dtype, row r at r * stride_g
    V,
    stride_x,
    stride_g,
    ignore_index,
    eps,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    row = x_ptr + r * stride_x
    g_row = grad_ptr + r * stride_g
    tgt = tl.load(target_ptr + r)
    lse = tl.load(lse_ptr + r)
    scale = tl.where(tgt == ignore_index, 0.0, tl.load(scale_ptr).to(tl.float32))
    v0 = 0
    while v0 < V:
        cols = tl.multiple_of(v0, BLOCK) + tl.arange(0, BLOCK)
        valid = cols < V
        x = tl.load(row + cols, mask=valid, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - eps / V - tl.where(cols == tgt, 1.0 - eps, 0.0)
        tl.store(g_row + cols, (g * scale).to(grad_ptr.dtype.element_ty), mask=valid)
        v0 += BLOCK


def supported(logits: Tensor) -> bool:
    """Whether the kernels take these logits (else `reference.cross_entropy_sums`)."""
    return common.runs_here(logits) and logits.dim() == 2 and logits.shape[1] >= 1 and logits.is_floating_point()


def _forward(logits: Tensor, target: Tensor, eps: float, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """(loss per row, nll per row, lse per row), fp32 (N,) each."""
    N, V = logits.shape
    loss = torch.empty(N, device=logits.device, dtype=torch.float32)
    nll, lse = torch.empty_like(loss), torch.empty_like(loss)
    if N:
        _cross_entropy_forward_kernel[(N,)](
            logits, target, loss, nll, lse, V, logits.stride(0), ignore_index, float(eps), BLOCK=BLOCK, num_warps=8
        )
    return loss, nll, lse


def _backward(logits: Tensor, target: Tensor, lse: Tensor, scale: Tensor, eps: float, ignore_index: int) -> Tensor:
    """d (scale * loss_sum) / d logits, in the logits' dtype."""
    N, V = logits.shape
    grad = torch.empty((N, V), device=logits.device, dtype=logits.dtype)
    if N:
        _cross_entropy_backward_kernel[(N,)](
            logits,
            target,
            lse,
            scale.to(torch.float32).contiguous(),
            grad,
            V,
            logits.stride(0),
            grad.stride(0),
            ignore_index,
            float(eps),
            BLOCK=BLOCK,
            num_warps=8,
        )
    return grad


class _CrossEntropySums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, eps: float, ignore_index: int):
        loss, nll, lse = _forward(logits, target, eps, ignore_index)
        ctx.save_for_backward(logits, target, lse)
        ctx.eps, ctx.ignore_index = eps, ignore_index
        nll_sum = nll.sum()
        ctx.mark_non_differentiable(nll_sum)
        return loss.sum(), nll_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss: Tensor, g_nll: Tensor):
        logits, target, lse = ctx.saved_tensors
        return _backward(logits, target, lse, g_loss, ctx.eps, ctx.ignore_index), None, None, None


def cross_entropy_sums(
    logits: Tensor, target: Tensor, label_smoothing: float = 0.0, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """See the module docstring: (loss_sum, nll_sum), fp32 scalars; loss_sum differentiable in
    `logits` when autograd records."""
    if target.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy_sums: {tuple(target.shape)} targets for logits {tuple(logits.shape)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1] (got {label_smoothing})")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    target = target.contiguous()
    if torch.is_grad_enabled() and logits.requires_grad:
        return _CrossEntropySums.apply(logits, target, label_smoothing, ignore_index)
    loss, nll, _ = _forward(logits, target, label_smoothing, ignore_index)
    return loss.sum(), nll.sum()


__all__ = ["supported", "cross_entropy_sums"]
