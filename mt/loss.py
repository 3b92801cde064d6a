"""The loss of a batch under teacher forcing, the one computation behind the eager training step,
the graphed training step (mt.graphs) and the validation loss (mt.validation).

    loss_sum, nll_sum = loss_sums(model, src, src_len, tgt_in, tgt_out, criterion=criterion,
                                  pad_id=pad_id, amp_dtype=torch.bfloat16)
    (loss_sum / ntokens).backward()

Sums, not means: the caller divides by the batch's token count (a device tensor under CUDA
graphs) and sums over ranks before dividing for the log.

The criterion is `nn.CrossEntropyLoss(reduction="sum")` or, with `trainer.fused_loss=true`,
`FusedCrossEntropyLoss`: the same loss, where both sums and the gradient come from two Triton
kernels on the logits in the compute dtype (mt/kernels/cross_entropy.py) instead of a dozen ops
on an fp32 copy of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .runtime import autocast


class FusedCrossEntropyLoss(nn.CrossEntropyLoss):
    """`nn.CrossEntropyLoss(ignore_index, label_smoothing, reduction="sum")` computed by
    `kernels.cross_entropy_sums`: the Triton kernels where they run (CUDA; CPU tensors under
    TRITON_INTERPRET=1), its PyTorch reference elsewhere. Class weights are not supported."""

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0):
        super().__init__(ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="sum")

    def sums(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """logits (N, V) in any float dtype, target (N,) -> (loss sum, NLL sum), fp32."""
        backend = "triton" if kernels.triton_available() else "torch"
        return kernels.cross_entropy_sums(logits, target, self.label_smoothing, self.ignore_index, backend)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.sums(logits, target)[0]


def loss_sums(
    model: nn.Module,
    src: Tensor,
    src_len: Tensor,
    tgt_in: Tensor,
    tgt_out: Tensor,
    *,
    criterion: nn.Module | None,
    pad_id: int,
    amp_dtype: torch.dtype | None,
) -> tuple[Tensor | None, Tensor]:
    """The forward pass under the run's autocast, then (criterion's sum, NLL sum) in fp32.

    criterion: the training loss with reduction="sum" (label smoothing, pad ignored), or None for
    the NLL only (validation). The NLL sum (no label smoothing) carries no gradient."""
    with autocast(src.device, amp_dtype):
        logits, _ = model(src, src_len, tgt_in)  # (B, T, V)
    target = tgt_out.flatten()  # (B*T,)
    if isinstance(criterion, FusedCrossEntropyLoss):
        if criterion.ignore_index != pad_id:  # its NLL sum ignores the criterion's index
            raise ValueError(f"FusedCrossEntropyLoss ignores {criterion.ignore_index}, the padding id is {pad_id}")
        return criterion.sums(logits.flatten(0, 1), target)  # the compute dtype: no fp32 copy
    logits = logits.float().flatten(0, 1)  # (B*T, V)
    loss_sum = criterion(logits, target) if criterion is not None else None
    with torch.no_grad():
        nll_sum = F.cross_entropy(logits, target, ignore_index=pad_id, reduction="sum")
    return loss_sum, nll_sum
