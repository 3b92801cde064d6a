"""The training loop, as the algorithm reads: set up, resume, warm up, then training steps with a
validation and a checkpoint every `trainer.eval_every` steps, until a budget ends; finish.

    summary = train(cfg, out_dir)        # what `python -m mt.train` runs (mt/train.py)

`Trainer.run` is the loop; each phase is one method:

    set_up()          data, tokenizer, model, optimizer, scheduler, the step (eager or CUDA graphs),
                      loaders, TensorBoard
    resume()          weights, optimizer, scheduler, counters and RNG from OUT/checkpoints/last.pt
    warm_up()         Triton kernels compiled in parallel before the first step (mt/precompile.py)
    train_step(batch) forward, backward, update; the step's numbers are read back a step later
    validate()        loss, greedy BLEU, early stopping; the report runs in the background
    save_checkpoint() best.pt / last.pt, written in the background after the report
    finish()          the last numbers, TensorBoard's hparams, the summary

Orderings that matter (each kept where it is for a reason given there):
- a step's loss reaches the host one step late (mt/step_stats.py) and the queue is drained before
  every validation, so no checkpoint is written after a non-finite loss;
- the validation BLEU is broadcast to every rank before the plateau scheduler steps on it, and the
  scheduler steps before the checkpoint is taken, so a resumed run has seen the same BLEU;
- the background report (chrF, BLEU(lc), TensorBoard) runs before the checkpoint write, and adds
  its scores to that checkpoint.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from . import batching, data, graphs, precompile
from .averaging import (
    EMA,
    average_checkpoints,
    choose_for_average,
    prune_step_checkpoints,
    step_checkpoint_name,
    step_checkpoints,
)
from .checkpoint import CheckpointWriter, load_checkpoint, save_checkpoint
from .config import TrainConfig, from_dict, to_dict
from .distributed import Distributed, FlatGradients, rng_state, seed_everything, set_rng_state
from .errors import CheckpointError, MTError, TrainingDiverged, first_line
from .kernels.precompile import CompileWatch, CompileWorkers
from .loss import FusedCrossEntropyLoss
from .metrics import corpus_scores
from .model import Seq2Seq, cell_backend, count_parameters
from .optim import make_optimizer, make_scheduler, steps_per_update
from .pace import Pace
from .runtime import autocast, resolve_cuda_graphs, resolve_device, resolve_precision, set_tf32
from .search import decode_dataset, parse_length_penalty
from .step_stats import SUMMED, StepStats, step_values
from .subword_sampling import EpochSegmentations, check_settings
from .tokenizer import Tokenizer
from .validation import report_validation, validation_loss

log = logging.getLogger("mt.train")


def _now() -> float:
    """The clock trainer.max_minutes reads (tests replace it)."""
    return time.perf_counter()


def _pace_clock() -> float:
    """The clock of the pace and ETA lines (tests replace it; apart from _now, whose every look
    the time-limit tests count)."""
    return time.perf_counter()


FIRST_PACE_S = 10.0  # the first pace line comes this long after the first step, log_every or not


@dataclass
class TrainState:
    """The counters of a run: what a checkpoint needs to resume it exactly."""

    step: int = 0  # updates done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this epoch trained on (resuming skips them)
    best_bleu: float = -1.0
    bad_evals: int = 0  # validations since the best BLEU improved (trainer.patience)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in asdict(self):
            setattr(self, k, state[k])


def check_compatible(saved: TrainConfig, cfg: TrainConfig, path: Path) -> None:
    """Resuming needs the same model and vocabulary; other settings (steps, lr...) may change."""
    # free: the cell backend (same parameters on every backend) and how the tokenizer, which the
    # checkpoint brings along, was trained from the text
    free = ("cell", "train_on")
    for group in ("model", "tokenizer"):
        a, b = asdict(getattr(saved, group)), asdict(getattr(cfg, group))
        diff = [f"{group}.{k}: {a[k]!r} in checkpoint, {b[k]!r} now" for k in a if a[k] != b[k] and k not in free]
        if diff:
            raise CheckpointError(f"checkpoint {path} does not fit this config ({'; '.join(diff[:3])})")
    if (saved.data.src, saved.data.tgt) != (cfg.data.src, cfg.data.tgt):
        raise CheckpointError(
            f"checkpoint {path} translates {saved.data.src}->{saved.data.tgt}, not {cfg.data.src}->{cfg.data.tgt}"
        )


class Trainer:
    """One training run on this process (one rank of it under torchrun)."""

    def __init__(
        self,
        cfg: TrainConfig,
        out_dir: Path,
        ddp: Distributed,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        use_graphs: bool,
        saver: CheckpointWriter,
        workers: CompileWorkers | None = None,
        watch: CompileWatch | None = None,
        precompile_barrier: bool = False,
    ):
        self.started = _now()  # trainer.max_minutes counts from here
        self.set_up_began = time.perf_counter()  # for the "first step" line (benchmarks/bench_data.py reads it)
        self.cfg, self.tc, self.oc = cfg, cfg.trainer, cfg.optim
        self.ddp, self.device, self.amp_dtype, self.use_graphs = ddp, device, amp_dtype, use_graphs
        self.saver, self.workers, self.watch, self.precompile_barrier = saver, workers, watch, precompile_barrier
        ckpt_dir = out_dir / "checkpoints"
        self.out_dir, self.last_path, self.best_path = out_dir, ckpt_dir / "last.pt", ckpt_dir / "best.pt"
        self.ckpt_dir, self.ema_path, self.averaged_path = ckpt_dir, ckpt_dir / "ema.pt", ckpt_dir / "averaged.pt"
        # step_<k>.pt of the last validations: trainer.keep_last, at least what average_last needs
        self.keep = max(cfg.trainer.keep_last, cfg.trainer.average_last)
        self.ema: EMA | None = None
        self.ema_metrics: dict[str, Any] = {}  # the EMA weights' scores at the last validation
        self.averaged_metrics: dict[str, Any] = {}
        self.state = TrainState()
        self.last_metrics: dict[str, Any] = {}
        self.stopped_early = self.time_up = False
        self.signature_logged = False
        self.decoder_graphs = self.buckets = None
        self.writer = self.progress = None
        self.last_eval_step = -1  # the step of the last validation (-1: none in this run yet)
        self.segmentations: EpochSegmentations | None = None  # trainer.subword_alpha > 0
        self.segmentation_logged = -1  # the epoch whose sampled segmentation was logged

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        try:
            return self.train_and_finish()
        finally:
            self.stop_sampling()

    def train_and_finish(self) -> dict[str, Any]:
        tc, s = self.tc, self.state
        resume_from = self.set_up()  # data, model, optimizer (resuming: with last.pt's tokenizer)
        if resume_from is not None:
            self.resume(resume_from)  # weights, optimizer, scheduler, counters, RNG
            self.last_eval_step = s.step
        self.prepare_steps(resumed=resume_from is not None)  # the step (eager or graphs), loaders, logs
        self.warm_up()  # Triton kernels compiled before the first step
        self.model.train()
        self.progress = self.progress_bar()
        done = s.step >= tc.max_steps
        while not done and s.epoch < tc.max_epochs:
            # resuming: the epoch starts after the batches already trained on
            self.train_loader.batch_sampler.set_epoch(s.epoch, start=s.batch_in_epoch)
            self.log_segmentation()
            for batch in self.train_loader:
                self.train_step(batch)
                if s.step % tc.eval_every == 0 or s.step >= tc.max_steps:
                    if self.validate():
                        self.stopped_early = done = True
                        if self.ddp.main:
                            log.info("early stopping: no BLEU improvement in %d validations", tc.patience)
                        break
                if s.step >= tc.max_steps:
                    done = True
                    break
                if self.time_up:
                    if self.ddp.main:
                        log.info("time limit: stopping after step %d (trainer.max_minutes=%g)", s.step, tc.max_minutes)
                    done = True
                    break
            else:  # the epoch ran out
                s.epoch, s.batch_in_epoch = s.epoch + 1, 0
        self.stop_sampling()  # no epoch after this one: its sampling would only slow the validation
        self.settle(self.pending.drain())  # the last step's numbers: its NaN check and log line
        if self.last_eval_step != s.step:  # max_epochs or max_minutes reached between validations
            self.validate()
        return self.finish()

    # ------------------------------------------------------------------ set-up
    def set_up(self) -> dict[str, Any] | None:
        """Everything the loop needs; returns the checkpoint to resume from (trainer.resume), or None."""
        cfg, tc = self.cfg, self.tc
        if cfg.decoding.beam < 1:  # a recipe's decoding typo fails now, not when the run is over
            raise MTError(f"decoding.beam must be >= 1 (got {cfg.decoding.beam})")
        parse_length_penalty(cfg.decoding.length_penalty)
        check_settings(tc.subword_alpha, tc.subword_nbest)
        resume_state, tokenizer = self.read_resume_checkpoint() if tc.resume else (None, None)
        self.prepare_data(tokenizer)
        tok = self.tok

        seed_everything(tc.seed)
        self.model = Seq2Seq(cfg.model, tok.src_vocab_size, tok.tgt_vocab_size, tok.pad_id).to(self.device)
        self.optimizer = make_optimizer(self.model, self.oc)
        if tc.ema_decay > 0:
            self.ema = EMA(self.model, tc.ema_decay)
        self.scheduler = make_scheduler(self.optimizer, self.oc, tc.max_steps)
        if tc.fused_loss:  # Triton kernels for the loss and its gradient (mt/kernels/cross_entropy.py)
            self.criterion = FusedCrossEntropyLoss(ignore_index=tok.pad_id, label_smoothing=self.oc.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss(
                ignore_index=tok.pad_id, label_smoothing=self.oc.label_smoothing, reduction="sum"
            )
        return resume_state

    def read_resume_checkpoint(self) -> tuple[dict[str, Any], Tokenizer]:
        """last.pt and its tokenizer (the data is encoded with it), checked against this config."""
        if not self.last_path.exists():
            raise CheckpointError(f"trainer.resume=true but there is no checkpoint at {self.last_path}")
        state = load_checkpoint(self.last_path)
        try:
            saved_cfg = from_dict(state["config"])
            tokenizer = Tokenizer.from_state_dict(state["tokenizer"])
        except MTError:
            raise
        except Exception as e:
            raise CheckpointError(f"checkpoint {self.last_path} has an unusable config or tokenizer: {e}") from None
        check_compatible(saved_cfg, self.cfg, self.last_path)
        self.cfg.tokenizer.train_on = saved_cfg.tokenizer.train_on  # what the checkpoints record of it stays true
        return state, tokenizer

    def prepare_data(self, tokenizer: Tokenizer | None) -> None:
        """The tokenized corpus (rank 0 trains the tokenizer first; the others then find it in the cache)."""
        cfg, ddp = self.cfg, self.ddp
        seed_everything(self.tc.seed)
        cache_dir = data.default_cache_dir(cfg.data)
        if not ddp.main:
            ddp.barrier()
        try:
            self.corpus = data.prepare_corpus(
                cfg.data,
                cfg.tokenizer,
                cache_dir,
                log=log.info if ddp.main else (lambda *_: None),
                tokenizer=tokenizer,
                progress=cfg.trainer.progress,
            )
        finally:  # release the other ranks even when rank 0 fails: they then meet the same error
            if ddp.main:
                ddp.barrier()
        self.tok = self.corpus.tokenizer
        if self.corpus.valid is None or len(self.corpus.valid) == 0:
            raise MTError(
                f"no validation split in {cfg.data.path} (looked for {cfg.data.valid_split}, valid, val, dev)"
            )

    def resume(self, state: dict[str, Any]) -> None:
        """Weights, optimizer, scheduler, counters and this rank's RNG from the checkpoint."""
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint {self.last_path} does not fit this model: {first_line(e)}") from None
        self.state.load_state_dict(state)
        if self.ema is not None:
            if "ema" in state:
                self.ema.load_state_dict(state["ema"])
            else:  # trainer.ema_decay switched on for the rest of a run
                self.ema = EMA(self.model, self.tc.ema_decay)
                if self.ddp.main:
                    log.warning("%s has no EMA weights: the EMA starts from its weights now", self.last_path)
        rngs = state["rng"]
        set_rng_state(rngs[self.ddp.rank] if self.ddp.rank < len(rngs) else rngs[0])
        if self.ddp.main:
            s = self.state
            log.info(
                "resumed from %s at step %d (epoch %d, batch %d)", self.last_path, s.step, s.epoch, s.batch_in_epoch
            )

    def prepare_steps(self, resumed: bool) -> None:
        """The training step (eager or CUDA graphs), the loaders and TensorBoard."""
        self.make_stepper()
        self.make_loaders()
        ddp, s = self.ddp, self.state
        self.pending = StepStats(self.device, lag=1)
        self.win_loss = self.win_nll = self.win_tok = 0.0
        self.win_t0 = time.perf_counter()
        self.pace, self.pace_told = Pace(self.tc.max_steps, self.tc.eval_every), False
        self.first_step_told = False
        # the validation split's columns as lists, once (datasets reads Arrow at every access)
        valid = self.corpus.valid
        self.valid_src_ids, self.valid_srcs, self.valid_refs = (
            (list(valid[c]) if ddp.main else []) for c in ("src_ids", "src", "tgt")
        )
        if not ddp.main:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=s.step + 1 if resumed else None)
        log.info(
            "model: %s parameters, cell=%s (%s), device=%s, precision=%s, world=%d",
            f"{count_parameters(self.model):,}",
            self.cfg.model.cell,
            self.model.backend(self.device),
            self.device,
            self.amp_dtype or "fp32",
            ddp.world,
        )
        log.info(
            "data: %d train / %d valid pairs, vocab %d/%d",
            len(self.corpus.train),
            len(valid),
            self.tok.src_vocab_size,
            self.tok.tgt_vocab_size,
        )

    def progress_bar(self) -> tqdm | None:
        """On rank 0; disable=None: a bar only when stderr is a terminal (trainer.progress decides)."""
        tc = self.tc
        if not self.ddp.main:
            return None
        return tqdm(
            total=tc.max_steps,
            initial=self.state.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=None if tc.progress is None else not tc.progress,
        )

    def make_stepper(self) -> None:
        """One training step: eager (DDP-wrapped under torchrun), or replayed from CUDA graphs
        (mt/graphs.py; docs/gpu.md), one graph per bucket shape (under torchrun with the gradients'
        all-reduce inside: mt.distributed.FlatGradients)."""
        cfg, tc, model = self.cfg, self.tc, self.model
        kw = dict(
            pad_id=self.tok.pad_id, amp_dtype=self.amp_dtype, clip_norm=self.oc.clip_grad_norm, device=self.device
        )
        if not self.use_graphs:
            train_model: nn.Module = model
            if self.ddp.enabled:
                train_model = nn.parallel.DistributedDataParallel(
                    model, device_ids=[self.device] if self.device.type == "cuda" else None
                )
            self.stepper = graphs.TrainStep(
                model, self.optimizer, self.criterion, train_model=train_model, ema=self.ema, **kw
            )
            return
        graphs.make_capturable(self.optimizer, self.device)  # after resume's load: lr as a device tensor
        self.buckets = graphs.ShapeBuckets.from_budget(
            tc.max_tokens,
            tc.max_sentences,
            max(cfg.data.max_src_len, cfg.data.max_tgt_len) + 1,
            lengths=tc.graph_lengths,
            batch_sizes=tc.graph_batch_sizes,
        )
        grad_sync = None
        if self.ddp.enabled:  # DDP's job inside the graphs: rank 0's weights, then one all-reduce a step
            self.ddp.broadcast_module_(model)
            grad_sync = FlatGradients(model.parameters(), self.ddp)
        self.stepper = graphs.GraphedTrainStep(
            model, self.optimizer, self.criterion, buckets=self.buckets, ema=self.ema, grad_sync=grad_sync, **kw
        )
        self.decoder_graphs = graphs.GraphedDecoder(model)
        if self.ddp.main:
            log.info("CUDA graphs on: %d batch shapes (batch, src, tgt) %s", len(self.buckets), self.buckets.shapes)

    def make_loaders(self) -> None:
        tc, ddp, s = self.tc, self.ddp, self.state

        def loader_for(ds, shuffle: bool, rank=ddp.rank, world=ddp.world, pin_memory=False, segment=None):
            return batching.make_loader(
                ds,
                self.tok,
                tc.max_tokens,
                tc.max_sentences,
                shuffle=shuffle,
                seed=tc.seed,
                num_replicas=world,
                rank=rank,
                num_workers=tc.num_workers,
                pin_memory=pin_memory,
                segment=segment,
            )

        # eager on CUDA: batches pinned by the loader, copied without waiting (graphs.to_device);
        # under graphs pad_batch makes the pinned copy
        pin = self.device.type == "cuda" and not self.use_graphs
        segment = None
        if tc.subword_alpha > 0:  # subword regularization: every epoch segmented anew

            def segment(best: batching.PairDataset) -> EpochSegmentations:
                self.segmentations = EpochSegmentations(
                    self.tok,
                    self.corpus.train,
                    best,
                    alpha=tc.subword_alpha,
                    nbest=tc.subword_nbest,
                    seed=tc.seed,
                    limits=(self.cfg.data.max_src_len, self.cfg.data.max_tgt_len, self.cfg.data.max_len_ratio),
                    epochs=tc.max_epochs,
                )
                return self.segmentations

        self.train_loader = loader_for(self.corpus.train, shuffle=True, pin_memory=pin, segment=segment)
        self.valid_loader = loader_for(self.corpus.valid, shuffle=False, rank=0, world=1)
        if len(self.train_loader) == 0:
            raise MTError("the training split is empty after filtering; check data.max_src_len/max_tgt_len")
        self.train_loader.batch_sampler.set_epoch(s.epoch)
        first = next(iter(self.train_loader.batch_sampler))
        log.info(
            "rank %d/%d: %d batches per epoch, first batch rows %s",
            ddp.rank,
            ddp.world,
            len(self.train_loader),
            sorted(first)[:8],
        )

    def stop_sampling(self) -> None:
        """Subword regularization: drop the next epoch's sampling, queued or under way."""
        if self.segmentations is not None:
            self.segmentations.close()

    def log_segmentation(self) -> None:
        """Subword regularization: what this epoch's sampled segmentation came to, once an epoch."""
        seg = getattr(self.train_loader.batch_sampler, "last", None)
        if seg is None or not self.ddp.main or seg.epoch == self.segmentation_logged:
            return
        self.segmentation_logged = seg.epoch
        src, tgt = seg.pieces()
        stats = self.corpus.stats
        log.info(
            "epoch %d: sampled segmentation, %d source / %d target pieces (best: %d / %d), %d pairs kept the best "
            "(length limits); %d batches; sampled in %.1f s",
            seg.epoch,
            src,
            tgt,
            stats["train_src_tokens"],
            stats["train_tgt_tokens"],
            seg.kept_best,
            len(self.train_loader),
            seg.seconds,
        )

    def warm_up(self) -> None:
        """Triton kernels compiled in parallel now, not one by one at first launch (mt/precompile.py)."""
        tc, workers = self.tc, self.workers
        if workers is not None:
            t0 = time.perf_counter()
            try:
                variants, report = precompile.precompile(
                    workers,
                    self.model,
                    tok=self.tok,
                    device=self.device,
                    amp_dtype=self.amp_dtype,
                    criterion=self.criterion,
                    clip_norm=self.oc.clip_grad_norm,
                    use_graphs=self.use_graphs,
                    buckets=self.buckets,
                    train_batch_sizes=[] if self.use_graphs else [len(b) for b in self.train_loader.batch_sampler],
                    valid_batch_sizes=[len(b) for b in self.valid_loader.batch_sampler],
                    n_valid=len(self.valid_src_ids),
                    valid_batch_size=tc.valid_batch_size,
                    max_len_a=tc.valid_max_len_a,
                    max_len_b=tc.valid_max_len_b,
                )
            except Exception as e:  # only a head start: the first launches compile what is missing
                workers.close()
                log.warning(
                    "precompile: skipped after %.1f s (%s: %s); kernels compile at first launch",
                    time.perf_counter() - t0,
                    type(e).__name__,
                    first_line(e),
                )
            else:
                if self.watch is not None:
                    self.watch.expect(variants)
                (log.warning if report.errors else log.info)(
                    "precompile: %s; %.1f s in all, the dry run included", report.summary(), time.perf_counter() - t0
                )
        if self.precompile_barrier:
            self.ddp.barrier()  # the other ranks then load what rank 0 compiled (on one machine)

    # ------------------------------------------------------------------ one training step
    def train_step(self, batch) -> None:
        """Forward, backward and update; the numbers of the PREVIOUS step are read back and logged.

        Each step's numbers reach the host a step late (mt/step_stats.py): the host builds and
        launches step k+1 while the GPU still runs step k. The NaN check, the training log and
        the time limit therefore act on step k during step k+1."""
        s = self.state
        # eager: forward + backward, then the update; graphs: the whole step in forward_backward
        loss_sum, nll_sum = self.stepper.forward_backward(batch)
        grad_norm = self.stepper.update()  # clip, optimizer step, zero grads (graphs: already done)
        if steps_per_update(self.scheduler):
            self.scheduler.step()
        s.step += 1
        s.batch_in_epoch += 1
        values = step_values(
            loss_sum,
            nll_sum,
            batch.ntokens,
            self.out_of_time(),
            grad_norm,
            self.optimizer.param_groups[0]["lr"],
            self.device,
        )  # (6,) on the device
        self.ddp.all_sum_(values[:SUMMED])  # every rank sees the same sums, so all stop together
        self.pending.push((s.step, s.epoch), values)
        self.time_up = self.settle(self.pending.ready())  # the previous step's numbers
        if self.progress is not None:
            self.progress.update(1)

    def out_of_time(self) -> bool:
        return self.tc.max_minutes > 0 and _now() - self.started >= 60.0 * self.tc.max_minutes

    def settle(self, rows) -> bool:
        """Account for the steps read back: NaN check, training log. True if a rank is out of time."""
        late = False
        for (at_step, at_epoch), (loss_tot, nll_tot, ntok_tot, ranks_out_of_time, grad_norm, lr_now) in rows:
            if not math.isfinite(loss_tot):  # (this step's update, and maybe the next one's, are in memory)
                self.saver.wait(raise_error=False)  # the last validation's checkpoint is on disk
                last = self.last_path if self.last_path.exists() else "none yet"
                raise TrainingDiverged(
                    f"loss is {loss_tot} at step {at_step}; stopped without saving (last good checkpoint: {last})"
                )
            late = late or ranks_out_of_time > 0
            self.win_loss += loss_tot
            self.win_nll += nll_tot
            self.win_tok += ntok_tot
            now = _pace_clock()
            self.pace.add(at_step, ntok_tot, now)
            if self.ddp.main and not self.first_step_told:
                self.first_step_told = True
                log.info("first step: %.1f s after set-up began", time.perf_counter() - self.set_up_began)
            if self.ddp.main and (at_step % self.tc.log_every == 0 or at_step == self.tc.max_steps):
                self.log_training(at_step, at_epoch, grad_norm, lr_now)
                self.log_pace(at_step, now)
            elif self.ddp.main and not self.pace_told and self.pace.elapsed(now) >= FIRST_PACE_S:
                self.log_pace(at_step, now)  # a first estimate long before the first log_every line
        return late

    def log_training(self, step: int, epoch: int, grad_norm: float, lr: float) -> None:
        """The window's mean loss, perplexity and throughput since the last log line."""
        elapsed = time.perf_counter() - self.win_t0
        loss_avg, nll_avg = self.win_loss / max(1, self.win_tok), self.win_nll / max(1, self.win_tok)
        tok_per_s = self.win_tok / max(elapsed, 1e-9)
        for k, v in (
            ("loss", loss_avg),
            ("ppl", math.exp(min(nll_avg, 50))),
            ("lr", lr),
            ("grad_norm", grad_norm),
            ("tokens_per_s", tok_per_s),
        ):
            self.writer.add_scalar(f"train/{k}", v, step)
        self.progress.set_postfix(loss=f"{loss_avg:.3f}", lr=f"{lr:.2e}")
        log.info(
            "step %d | epoch %d | loss %.4f | ppl %.2f | lr %.3e | grad norm %.3f | %.0f tok/s",
            step,
            epoch,
            loss_avg,
            math.exp(min(nll_avg, 50)),
            lr,
            grad_norm,
            tok_per_s,
        )
        self.win_loss = self.win_nll = self.win_tok = 0.0
        self.win_t0 = time.perf_counter()

    def log_pace(self, step: int, now: float) -> None:
        """Steps/s, target tokens/s and the time to max_steps and to the next validation."""
        summary = self.pace.summary(step, now)
        if summary is not None:
            log.info("pace: %s", summary)
            self.pace_told = True

    # ------------------------------------------------------------------ validation and checkpoint
    def validate(self) -> bool:
        """Validate on rank 0 and save a checkpoint; every rank learns the BLEU, whether to stop
        early (the return value) and whether the time limit has passed (rank 0's clock, after
        validating: `time_up`)."""
        ddp, tc, s = self.ddp, self.tc, self.state
        self.time_up = self.settle(self.pending.drain()) or self.time_up  # nothing unchecked is saved
        t0 = time.perf_counter()
        metrics: dict[str, Any] = {}
        report = None
        improved = False
        if ddp.main:
            metrics, report = self.score_validation()
            if self.ema is not None:
                with self.ema.swapped_in():
                    self.ema_metrics = self.score_weights("valid_ema")
            improved = metrics["bleu"] > s.best_bleu
            if improved:
                s.best_bleu, s.bad_evals = metrics["bleu"], 0
            else:
                s.bad_evals += 1
        bleu, stop, timed_out = ddp.broadcast(
            [
                metrics.get("bleu", 0.0),
                float(tc.patience > 0 and s.bad_evals >= tc.patience),
                float(self.out_of_time()),
            ],
            self.device,
        )
        if not steps_per_update(self.scheduler):
            self.scheduler.step(bleu)  # before saving, so a resumed run's scheduler has seen this BLEU too
        self.save_checkpoint(metrics, improved, report)
        if ddp.main:
            log.info(
                "step %d | valid loss %.3f ppl %.2f | BLEU %.2f | best %.2f%s | %.1fs",
                s.step,
                metrics["loss"],
                metrics["ppl"],
                metrics["bleu"],
                s.best_bleu,
                " *" if improved else "",
                time.perf_counter() - t0,
            )
            if self.ema is not None:
                m = self.ema_metrics
                log.info("step %d | EMA weights: valid loss %.3f | BLEU %.2f", s.step, m["loss"], m["bleu"])
        self.model.train()
        self.last_metrics, self.last_eval_step = metrics, s.step
        self.time_up = self.time_up or bool(timed_out)  # the validation may have used up the time
        return bool(stop)

    def decode_validation(self):
        """The validation loss (teacher forcing) and the greedy decode of the validation split,
        with the weights the model holds now."""
        tc, tok = self.tc, self.tok
        vloss = validation_loss(self.model, self.valid_loader, self.device, self.amp_dtype, tok.pad_id)
        with autocast(self.device, self.amp_dtype):
            decoded = decode_dataset(
                self.model,
                self.valid_src_ids,
                tok,
                self.device,
                batch_size=tc.valid_batch_size,
                max_len_a=tc.valid_max_len_a,
                max_len_b=tc.valid_max_len_b,
                graphs=self.decoder_graphs,
            )
        return vloss, decoded

    def score_validation(self) -> tuple[dict[str, Any], functools.partial]:
        """Loss and BLEU of the validation split now (BLEU picks the best checkpoint); the rest of
        the report (report_validation) is returned to run in the background."""
        tc, tok, step = self.tc, self.tok, self.state.step
        vloss, decoded = self.decode_validation()
        hyps, refs, srcs = tok.decode_tgt(decoded.tokens), self.valid_refs, self.valid_srcs
        metrics = {"loss": vloss, "ppl": math.exp(min(vloss, 50)), **corpus_scores(hyps, refs, names=("bleu",))}
        for k in ("loss", "ppl", "bleu"):
            self.writer.add_scalar(f"valid/{k}", metrics[k], step)
        samples = [
            f"**src:** {srcs[i]}  \n**ref:** {refs[i]}  \n**hyp:** {hyps[i]}"
            for i in range(min(tc.num_samples, len(hyps)))
        ]
        attention = None
        if tc.attention_images and len(hyps):
            src_ids = self.valid_src_ids[0] + [tok.eos_id]
            out_ids = decoded.tokens[0] + [tok.eos_id]
            attn = decoded.attention[0][: len(out_ids), : len(src_ids)]  # (T_out, S) CPU
            attention = (attn, tok.src_pieces(src_ids), tok.tgt_pieces(out_ids)[: attn.shape[0]])
        report = functools.partial(
            report_validation,
            writer=self.writer,
            step=step,
            metrics=metrics,
            hyps=hyps,
            refs=refs,
            samples=samples,
            attention=attention,
            first=not self.signature_logged,
        )
        self.signature_logged = True
        return metrics, report

    def score_weights(self, tag: str) -> dict[str, Any]:
        """Loss and the three scores of the validation split for the weights the model holds now
        (the EMA's, an average's), on TensorBoard under `tag`/: what best.pt's weights are
        compared with."""
        vloss, decoded = self.decode_validation()
        hyps, step = self.tok.decode_tgt(decoded.tokens), self.state.step
        metrics = {"loss": vloss, "ppl": math.exp(min(vloss, 50)), **corpus_scores(hyps, self.valid_refs)}
        for k in ("loss", "bleu", "chrf", "bleu_lc"):
            self.writer.add_scalar(f"{tag}/{k}", metrics[k], step)
        return metrics

    def save_checkpoint(self, metrics: dict[str, Any], improved: bool, report) -> None:
        """In the background: the report, then the checkpoint (improved: best.pt, then last.pt as
        the same file; mt/checkpoint.py). The next save waits for both. Every rank's RNG is in it."""
        rngs = self.ddp.gather_objects(rng_state())  # every rank's RNG, for an exact resume
        if not self.ddp.main:
            return
        opt_state, sched_state = self.optimizer.state_dict(), self.scheduler.state_dict()
        if self.use_graphs:  # tensor learning rates -> floats: the checkpoint loads without graphs too
            opt_state, sched_state = graphs.portable_state(opt_state), graphs.portable_state(sched_state)
        checkpoint = {
            "model": self.model.state_dict(),
            "optimizer": opt_state,
            "scheduler": sched_state,
            **self.state.state_dict(),
            "rng": rngs,
            "config": to_dict(self.cfg),
            "tokenizer": self.tok.state_dict(),
            "metrics": metrics,
        }
        derived = []
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()  # resumed exactly from last.pt
            ema_metrics, decay = dict(self.ema_metrics), self.ema.decay
            derived.append((self.ema_path, lambda snap: ema_checkpoint(snap, ema_metrics, decay)))
        links = [self.last_path] if improved else []
        if self.keep > 0:
            links.append(self.ckpt_dir / step_checkpoint_name(self.state.step))
        self.saver.save(
            checkpoint,
            self.best_path if improved else self.last_path,
            also=links,
            before_write=report,
            derived=derived,
            after_write=(lambda: prune_step_checkpoints(self.ckpt_dir, self.keep)) if self.keep > 0 else None,
        )

    # ------------------------------------------------------------------ finish
    def finish(self) -> dict[str, Any]:
        s = self.state
        if self.ddp.main:
            self.progress.close()
            self.saver.wait()  # the last validation's report (TensorBoard, log) and checkpoint are done
            if self.tc.average_last > 0:
                self.average_last()
            if self.watch is not None:
                log.info("triton: %s", self.watch.summary())
            if self.use_graphs:
                log.info(
                    "CUDA graphs: %s; decoder steps: %s",
                    self.stepper.summary(),
                    ", ".join(f"{k} {v}" for k, v in sorted(self.decoder_graphs.stats.items())) or "none",
                )
            cfg = self.cfg
            hparams = {
                f"{g}.{k}": (v if isinstance(v, (int, float, str, bool)) else str(v))
                for g in ("model", "optim", "tokenizer")
                for k, v in asdict(getattr(cfg, g)).items()
            }
            hparams.update(
                {"trainer.max_tokens": cfg.trainer.max_tokens, "data.src": cfg.data.src, "data.tgt": cfg.data.tgt}
            )
            self.writer.add_hparams(hparams, {"hparam/best_bleu": s.best_bleu}, run_name=".")
            self.writer.close()
            log.info("training took %.1f min (%d steps)", (_now() - self.started) / 60, s.step)
            self.log_next_steps()
        return {
            "step": s.step,
            "epoch": s.epoch,
            "best_bleu": s.best_bleu,
            "last": self.last_metrics,
            "stopped_early": self.stopped_early,
            "best_path": str(self.best_path),
            "last_path": str(self.last_path),
            "ema_bleu": self.ema_metrics.get("bleu"),
            "averaged_bleu": self.averaged_metrics.get("bleu"),
            "chosen_path": str(self.chosen()[1]),
        }

    def average_last(self) -> None:
        """averaged.pt: the mean of the last trainer.average_last step_<k>.pt, validated (rank 0)."""
        n = self.tc.average_last
        paths = choose_for_average(self.ckpt_dir, min(n, len(step_checkpoints(self.ckpt_dir))))
        t0 = time.perf_counter()
        state = average_checkpoints(paths)
        live = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        try:
            self.model.load_state_dict(state["model"])  # in place: the decoder's CUDA graphs read it too
            self.averaged_metrics = self.score_weights("valid_averaged")
        finally:
            self.model.load_state_dict(live)
        state["metrics"] = self.averaged_metrics
        save_checkpoint(state, self.averaged_path)
        log.info(
            "averaged the last %d checkpoints (steps %s): valid loss %.3f | BLEU %.2f | %.1fs -> %s",
            len(paths),
            ", ".join(str(k) for k in state["averaged"]["steps"]),
            self.averaged_metrics["loss"],
            self.averaged_metrics["bleu"],
            time.perf_counter() - t0,
            self.averaged_path,
        )

    def candidates(self) -> list[tuple[float, Path]]:
        """(validation BLEU, checkpoint) of this run's weights, greedy as every validation
        decodes: best.pt, then ema.pt (its last validation) and averaged.pt where written."""
        best = self.best_path if self.best_path.exists() else self.last_path
        found = [(self.state.best_bleu, best)]
        if self.ema_metrics and self.ema_path.exists():
            found.append((self.ema_metrics["bleu"], self.ema_path))
        if self.averaged_metrics and self.averaged_path.exists():
            found.append((self.averaged_metrics["bleu"], self.averaged_path))
        return found

    def chosen(self) -> tuple[float, Path]:
        """The candidate with the best validation BLEU (ties: the first, best.pt)."""
        return max(self.candidates(), key=lambda c: c[0])

    def log_next_steps(self) -> None:
        """The commands that use this run, with its real paths: for its checkpoint with the best
        validation BLEU."""
        candidates, (_, path) = self.candidates(), self.chosen()
        if len(candidates) > 1:
            why = ", ".join(f"{p.name} {b:.2f}" for b, p in candidates)
            log.info("validation BLEU (greedy): %s -> %s", why, path.name)
        best = shlex.quote(str(path))
        src, tgt = self.cfg.data.src, self.cfg.data.tgt
        log.info(
            "next:\n  evaluate:  mt-evaluate checkpoint=%s split=test\n"
            "  translate: mt-translate --checkpoint %s < input.%s > output.%s\n"
            "  watch:     tensorboard --logdir %s",
            best,
            best,
            src,
            tgt,
            shlex.quote(str(self.out_dir / "tensorboard")),
        )


def ema_checkpoint(snap: dict[str, Any], metrics: dict[str, Any], decay: float) -> dict[str, Any]:
    """ema.pt from a validation's checkpoint snapshot: the EMA weights as the model, loadable by
    every command (no optimizer: runs resume from last.pt, which holds the EMA too)."""
    return {
        "model": snap["ema"]["model"],
        "config": snap["config"],
        "tokenizer": snap["tokenizer"],
        "step": snap["step"],
        "metrics": metrics,
        "averaged": {"kind": "ema", "decay": decay, "step": snap["step"]},
    }


def train(cfg: TrainConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Train per `cfg`, writing checkpoints and TensorBoard logs under `out_dir`.

    Returns a summary: steps, best validation BLEU, last validation scores, paths."""
    out_dir = Path(out_dir)
    ddp = Distributed()
    tc = cfg.trainer
    device = resolve_device(tc.device, ddp.local_rank, ddp.enabled)
    amp_dtype = resolve_precision(tc.precision, device)
    set_tf32(tc.tf32)  # before anything runs (the Triton cell reads it at each launch, precompile's dry run too)
    use_graphs = resolve_cuda_graphs(tc.cuda_graphs, device)
    backend = cell_backend(cfg.model.cell, device)  # an unusable model.cell fails now, before the data
    n_compile = precompile.resolve_workers(tc.precompile_workers, device, backend)
    triton_on_cuda = backend == "triton" and device.type == "cuda"
    # the same answer on every rank (n_compile depends on each rank's CPUs): rank 0 precompiles,
    # then every rank passes one barrier
    precompile_barrier = ddp.enabled and triton_on_cuda and tc.precompile_workers != 0
    if tc.num_threads > 0:
        torch.set_num_threads(tc.num_threads)
    ddp.init(device)
    saver = CheckpointWriter()  # checkpoints are written in the background while training goes on
    workers = watch = None
    try:
        # Triton: compile processes that import while the data is prepared (mt/precompile.py),
        # and the time the first launches of each kernel variant take on this process's threads
        if n_compile and ddp.main:
            try:
                workers = CompileWorkers.start(n_compile)
            except OSError as e:  # only a head start: the first launches compile instead
                log.warning(
                    "precompile: cannot start %d processes (%s); kernels compile at first launch",
                    n_compile,
                    first_line(e),
                )
        if triton_on_cuda:
            watch = CompileWatch()
        summary = Trainer(
            cfg, out_dir, ddp, device, amp_dtype, use_graphs, saver, workers, watch, precompile_barrier
        ).run()
    except BaseException:
        saver.wait(raise_error=False)  # the run's own error first; the write in flight completes
        raise
    finally:
        if workers is not None:
            workers.close()
        if watch is not None:
            watch.close()
        ddp.close()
    saver.wait()  # the checkpoints are on disk when train() returns
    return summary
