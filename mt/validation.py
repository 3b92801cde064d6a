"""What a validation measures: the teacher-forced loss, here; BLEU from a greedy decode of the
validation split (mt.trainer); and the report that nothing waits for (chrF, BLEU(lc), TensorBoard
texts and the attention figure), which the checkpoint writer's thread runs before it writes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from .errors import first_line
from .loss import loss_sums
from .metrics import corpus_scores
from .model import Seq2Seq
from .plotting import attention_figure

log = logging.getLogger("mt.train")


@torch.no_grad()
def validation_loss(model: Seq2Seq, loader, device, amp_dtype, pad_id: int) -> float:
    """Mean per-token negative log-likelihood (no label smoothing) under teacher forcing."""
    model.eval()
    total, ntok = 0.0, 0
    for batch in loader:
        batch = batch.to(device)
        _, nll_sum = loss_sums(
            model,
            batch.src,
            batch.src_len,
            batch.tgt_in,
            batch.tgt_out,
            criterion=None,
            pad_id=pad_id,
            amp_dtype=amp_dtype,
        )
        total += nll_sum.item()
        ntok += batch.ntokens
    return total / max(1, ntok)


def report_validation(
    snapshot: dict[str, Any],
    *,
    writer,
    step: int,
    metrics: dict[str, Any],
    hyps: list[str],
    refs: list[str],
    samples: list[str],
    attention: tuple | None,
    first: bool,
) -> None:
    """What a validation reports and nothing waits for, run by the checkpoint writer's thread
    before it writes the checkpoint (`snapshot`), while training goes on: chrF and BLEU (case:lc),
    added to `metrics` and to the checkpoint's metrics; their TensorBoard scalars, the texts and
    the attention figure; a log line. It decides nothing, so a failure here is a warning: training
    goes on and the checkpoint is written (without what the report did not get to)."""
    try:
        _report_validation(
            snapshot,
            writer=writer,
            step=step,
            metrics=metrics,
            hyps=hyps,
            refs=refs,
            samples=samples,
            attention=attention,
            first=first,
        )
    except Exception as e:
        log.warning(
            "step %d | the validation report failed (training goes on, the checkpoint is written): %s",
            step,
            first_line(e),
        )
        log.debug("the validation report's traceback", exc_info=True)


def _report_validation(snapshot, *, writer, step, metrics, hyps, refs, samples, attention, first) -> None:
    t0 = time.perf_counter()
    extra = corpus_scores(hyps, refs, names=("chrf", "bleu_lc"))
    metrics.update(extra)
    snapshot["metrics"].update(extra)
    for k in ("chrf", "bleu_lc"):  # (loss, ppl and BLEU were written by the training thread)
        writer.add_scalar(f"valid/{k}", metrics[k], step)
    if first:
        writer.add_text(
            "valid/signature", f"BLEU: {metrics['bleu_signature']}  \nchrF: {metrics['chrf_signature']}", step
        )
        log.info("sacreBLEU signatures: %s | %s", metrics["bleu_signature"], metrics["chrf_signature"])
    if samples:
        writer.add_text("valid/samples", "\n\n---\n\n".join(samples), step)
    if attention is not None:
        writer.add_figure("valid/attention", attention_figure(*attention), step)
    writer.flush()
    log.info(
        "step %d | valid chrF %.2f BLEU(lc) %.2f | reported in the background in %.1fs",
        step,
        metrics["chrf"],
        metrics["bleu_lc"],
        time.perf_counter() - t0,
    )
