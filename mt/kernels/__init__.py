"""THE gate cell: one LSTM implementation shared by the encoder and the decoder.

Two functions make the contract (see `reference.py` for the maths and shapes):

    cell_step(inp, c, weight, pre=None, bias=None, backend=...) -> (h', c')          # one step
    lstm_sequence(xproj, w_hh, lengths=None, h0=None, c0=None, backend=...) -> (out, h_n, c_n)

and two more for the decoder, fused on the GPU: the attention of one decoder step
(`decode_attention.py`; a forward kernel, and a backward one for training) and the search's
candidates (mt.search, `search_topk.py`):

    attention_step(query, keys, memory, mask, backend=...) -> (context, weights)
    log_softmax_topk(logits, k, row_bias=None, banned=None, backend=...) -> (values, columns)

(The search's bookkeeping after it is one more Triton kernel, `search_greedy.py` and
`search_beam.py`, which also has the decoder state's reorder and the rebuild of beam search's
hypotheses at the end; `mt.search` calls them, or their references `reference.greedy_update`,
`beam_update`, `gather_rows` and `backtrack`. Helpers several kernel modules use: `common.py`.)
And one for training, the label-smoothed loss with its gradient (`cross_entropy.py`; mt.loss
calls it where `trainer.fused_loss` is on):

    cross_entropy_sums(logits, target, label_smoothing, ignore_index, backend=...) -> (loss_sum, nll_sum)

Backends:
  "torch"   the pure-PyTorch reference (any device; the test oracle)
  "triton"  fused Triton kernels (CUDA; CPU tensors under TRITON_INTERPRET=1)
  "auto"    triton on CUDA tensors when Triton imports, torch elsewhere
The model adds a third, "cudnn" (nn.LSTM / nn.LSTMCell on the same parameters), at module level.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ..errors import MTError
from . import reference

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    """True when the Triton kernels can run here (CUDA, or the CPU interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Turn "auto" into a concrete backend for tensors on `device`; validate the others."""
    device = torch.device(device)
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "torch":
        return backend
    if backend == "triton":
        if not triton_available():
            raise MTError("model.cell=triton needs Triton and a CUDA device (or TRITON_INTERPRET=1 on CPU)")
        return backend
    raise MTError(f"unknown gate-cell backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _impl(backend: str):
    if backend == "torch":
        return reference
    if backend == "triton":
        from . import triton_cell

        return triton_cell
    raise ValueError(f"unresolved gate-cell backend {backend!r}")


def cell_step(
    inp: Tensor,
    c: Tensor,
    weight: Tensor,
    pre: Tensor | None = None,
    bias: Tensor | None = None,
    backend: str = "auto",
    bank=None,
) -> tuple[Tensor, Tensor]:
    """One LSTM step; see `reference.cell_step`. bank: a `triton_cell.DeferredWeightGrad` whose
    attached weight and bias these are: the Triton cell leaves their gradients to it (one matmul
    after the step loop); the reference computes them per step (the same gradients)."""
    name = resolve_backend(backend, inp.device)
    if name == "triton" and bank is not None:
        return _impl(name).cell_step(inp, c, weight, pre=pre, bias=bias, bank=bank)
    return _impl(name).cell_step(inp, c, weight, pre=pre, bias=bias)


def lstm_sequence(
    xproj: Tensor,
    w_hh: Tensor,
    lengths: Tensor | None = None,
    h0: Tensor | None = None,
    c0: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer over a whole sequence in 1 or 2 directions; see `reference.lstm_sequence`."""
    impl = _impl(resolve_backend(backend, xproj.device))
    return impl.lstm_sequence(xproj, w_hh, lengths=lengths, h0=h0, c0=c0)


def attention_step(
    query: Tensor,
    keys: Tensor,
    memory: Tensor,
    mask: Tensor,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """One decoder step's dot/general attention; see `reference.attention_step`. Triton: one
    kernel, and while autograd records, one more for the backward (`decode_attention.py`)."""
    if resolve_backend(backend, query.device) == "triton":
        from . import decode_attention

        if decode_attention.supported(query, keys, memory, mask):
            if torch.is_grad_enabled() and any(x.requires_grad for x in (query, keys, memory)):
                return decode_attention.attention_step_autograd(query, keys, memory, mask)
            return decode_attention.attention_step(query, keys, memory, mask)
    return reference.attention_step(query, keys, memory, mask)


def log_softmax_topk(
    logits: Tensor,
    k: int,
    row_bias: Tensor | None = None,
    banned: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """A search step's k best candidates per row; see `reference.log_softmax_topk`."""
    if resolve_backend(backend, logits.device) == "triton":
        from . import search_topk

        if search_topk.supported(logits, k):
            return search_topk.log_softmax_topk(logits, k, row_bias=row_bias, banned=banned)
    return reference.log_softmax_topk(logits, k, row_bias=row_bias, banned=banned)


def cross_entropy_sums(
    logits: Tensor,
    target: Tensor,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """The training loss's two sums; see `reference.cross_entropy_sums`. Triton: one kernel for the
    sums, one in the backward for the gradient (`cross_entropy.py`)."""
    if resolve_backend(backend, logits.device) == "triton":
        from . import cross_entropy

        if cross_entropy.supported(logits):
            return cross_entropy.cross_entropy_sums(logits, target, label_smoothing, ignore_index)
    return reference.cross_entropy_sums(logits, target, label_smoothing, ignore_index)
