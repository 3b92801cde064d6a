"""The loss of a batch under teacher forcing, the one computation behind the eager training step,
the graphed training step (mt.graphs) and the validation loss (mt.validation).

    loss_sum, nll_sum = loss_sums(model, src, src_len, tgt_in, tgt_out, criterion=criterion,
                                  pad_id=pad_id, amp_dtype=torch.bfloat16)
    (loss_sum / ntokens).backward()

Sums, not means: the caller divides by the batch's token count (a device tensor under CUDA
graphs) and sums over ranks before dividing for the log.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .runtime import autocast


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
    logits = logits.float().flatten(0, 1)  # (B*T, V)
    target = tgt_out.flatten()  # (B*T,)
    loss_sum = criterion(logits, target) if criterion is not None else None
    with torch.no_grad():
        nll_sum = F.cross_entropy(logits, target, ignore_index=pad_id, reduction="sum")
    return loss_sum, nll_sum
