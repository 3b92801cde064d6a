"""Train a translation model.

    python -m mt.train data.path=../shared/data/multi30k data.src=de data.tgt=en
    python -m mt.train debug=tiny data.path=DIR trainer.max_steps=200 hydra.run.dir=OUT
    torchrun --nproc_per_node=2 -m mt.train hydra.run.dir=OUT ...   # data parallel

Writes, under the Hydra run directory OUT:
    OUT/checkpoints/best.pt, OUT/checkpoints/last.pt    (model, optimizer, scheduler, RNG, config, SentencePiece)
    OUT/tensorboard/                                     (tensorboard --logdir OUT)
    OUT/.hydra/                                          (the composed config)

`main` is a thin Hydra wrapper; `train(config, out_dir)` is a plain function tests call directly.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from . import batching, data, graphs, precompile
from .checkpoint import CheckpointWriter, load_checkpoint
from .config import TrainConfig, from_dict, register_configs, to_dict
from .errors import CheckpointError, MTError, TrainingDiverged, first_line
from .kernels.precompile import CompileWatch, CompileWorkers
from .metrics import corpus_scores
from .model import Seq2Seq, cell_backend, count_parameters
from .plotting import attention_figure
from .search import decode_dataset, parse_length_penalty
from .step_stats import SUMMED, StepStats, step_values
from .tokenizer import Tokenizer

log = logging.getLogger("mt.train")

register_configs()


# --------------------------------------------------------------------------- set-up helpers
def resolve_device(name: str, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """trainer.device -> torch.device (checked like translate.py's --device). Under torchrun,
    "auto" and a bare "cuda" mean this process's GPU, cuda:LOCAL_RANK."""
    from .translator import resolve_device as check_device

    device = check_device(name)
    if device.type == "cuda" and device.index is None and (distributed or name.strip() == "auto"):
        device = check_device(f"cuda:{local_rank}")
    return device


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name == "fp16":  # fp16 gradients underflow without a GradScaler, which mt does not use
        raise MTError("trainer.precision=fp16 needs loss scaling, which mt does not do; use bf16 or fp32")
    table = {"bf16": torch.bfloat16, "fp32": None}
    if name not in table:
        raise MTError(f"unknown trainer.precision={name!r}; use auto, bf16 or fp32")
    return table[name]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": list(random.getstate()[1]), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), None))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if cfg.name not in kinds:
        raise MTError(f"unknown optim.name={cfg.name!r}; use adam or adamw")
    return kinds[cfg.name](model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                           weight_decay=cfg.weight_decay)


def _now() -> float:
    """The clock trainer.max_minutes reads (tests replace it)."""
    return time.perf_counter()


def make_scheduler(opt: torch.optim.Optimizer, cfg, max_steps: int):
    """Stepped once per update, except "plateau", stepped with each validation BLEU."""
    warm = max(1, cfg.warmup_steps)
    if cfg.scheduler == "inverse_sqrt":  # linear warm-up, then lr * sqrt(warmup / step)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, math.sqrt(warm / (s + 1))))
    if cfg.scheduler == "constant":  # linear warm-up, then constant
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 1.0))
    if cfg.scheduler == "cosine":  # linear warm-up, then half a cosine down to min_lr at max_steps
        floor = min(1.0, cfg.min_lr / cfg.lr) if cfg.lr > 0 else 0.0
        span = max(1, max_steps - warm)

        def cosine(s: int) -> float:
            if s + 1 <= warm:
                return (s + 1) / warm
            progress = min(1.0, (s + 1 - warm) / span)
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr)
    raise MTError(f"unknown optim.scheduler={cfg.scheduler!r}; use inverse_sqrt, cosine, constant or plateau")


def check_compatible(saved: TrainConfig, cfg: TrainConfig, path: Path) -> None:
    """Resuming needs the same model and vocabulary; other settings (steps, lr...) may change."""
    for group in ("model", "tokenizer"):
        a, b = asdict(getattr(saved, group)), asdict(getattr(cfg, group))
        diff = [f"{group}.{k}: {a[k]!r} in checkpoint, {b[k]!r} now" for k in a if a[k] != b[k]
                and k != "cell"]  # the cell backend is free: same parameters on every backend
        if diff:
            raise CheckpointError(f"checkpoint {path} does not fit this config ({'; '.join(diff[:3])})")
    if (saved.data.src, saved.data.tgt) != (cfg.data.src, cfg.data.tgt):
        raise CheckpointError(f"checkpoint {path} translates {saved.data.src}->{saved.data.tgt}, "
                              f"not {cfg.data.src}->{cfg.data.tgt}")


class Distributed:
    """torchrun environment: rank, world size; gloo on CPU, NCCL on CUDA."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1

    def init(self, device: torch.device) -> None:
        if self.enabled and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_sum_(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a small device tensor over ranks, in place (queued on the stream: no host sync)."""
        if self.enabled:
            dist.all_reduce(values)
        return values

    def broadcast(self, values: list[float], device: torch.device) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if self.enabled:
            dist.broadcast(t, 0)
        return t.tolist()

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------- validation
def report_validation(snapshot: dict[str, Any], *, writer, step: int, metrics: dict[str, Any], hyps: list[str],
                      refs: list[str], samples: list[str], attention: tuple | None, first: bool) -> None:
    """What a validation reports and nothing waits for, run by the checkpoint writer's thread
    before it writes the checkpoint (`snapshot`), while training goes on: chrF and BLEU (case:lc)
    (0.3-0.6 s of sacreBLEU for Multi30k's 1014 sentences), added to `metrics` and to the
    checkpoint's metrics; their TensorBoard scalars, the texts and the attention figure; a log
    line. It decides nothing, so a failure here is a warning: training goes on and the
    checkpoint is written (without what the report did not get to)."""
    try:
        _report_validation(snapshot, writer=writer, step=step, metrics=metrics, hyps=hyps, refs=refs,
                           samples=samples, attention=attention, first=first)
    except Exception as e:
        log.warning("step %d | the validation report failed (training goes on, the checkpoint is written): %s",
                    step, first_line(e))
        log.debug("the validation report's traceback", exc_info=True)


def _report_validation(snapshot, *, writer, step, metrics, hyps, refs, samples, attention, first) -> None:
    t0 = time.perf_counter()
    extra = corpus_scores(hyps, refs, names=("chrf", "bleu_lc"))
    metrics.update(extra)
    snapshot["metrics"].update(extra)
    for k in ("chrf", "bleu_lc"):  # (loss, ppl and BLEU were written by the training thread)
        writer.add_scalar(f"valid/{k}", metrics[k], step)
    if first:
        writer.add_text("valid/signature", f"BLEU: {metrics['bleu_signature']}  \nchrF: {metrics['chrf_signature']}",
                        step)
        log.info("sacreBLEU signatures: %s | %s", metrics["bleu_signature"], metrics["chrf_signature"])
    if samples:
        writer.add_text("valid/samples", "\n\n---\n\n".join(samples), step)
    if attention is not None:
        writer.add_figure("valid/attention", attention_figure(*attention), step)
    writer.flush()
    log.info("step %d | valid chrF %.2f BLEU(lc) %.2f | reported in the background in %.1fs", step, metrics["chrf"],
             metrics["bleu_lc"], time.perf_counter() - t0)


@torch.no_grad()
def validation_loss(model: Seq2Seq, loader, device, amp_dtype, pad_id: int) -> float:
    """Mean per-token negative log-likelihood (no label smoothing) under teacher forcing."""
    model.eval()
    total, ntok = 0.0, 0
    for batch in loader:
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits, _ = model(batch.src, batch.src_len, batch.tgt_in)
        total += F.cross_entropy(logits.float().flatten(0, 1), batch.tgt_out.flatten(),
                                 ignore_index=pad_id, reduction="sum").item()
        ntok += batch.ntokens
    return total / max(1, ntok)


# --------------------------------------------------------------------------- training
def train(cfg: TrainConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Train per `cfg`, writing checkpoints and TensorBoard logs under `out_dir`.

    Returns a summary: steps, best validation BLEU, last validation scores, paths.
    """
    out_dir = Path(out_dir)
    ddp = Distributed()
    tc = cfg.trainer
    device = resolve_device(tc.device, ddp.local_rank, ddp.enabled)
    amp_dtype = resolve_precision(tc.precision, device)
    use_graphs = graphs.resolve_cuda_graphs(tc.cuda_graphs, device, ddp.enabled)
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
                log.warning("precompile: cannot start %d processes (%s); kernels compile at first launch",
                            n_compile, first_line(e))
        if triton_on_cuda:
            watch = CompileWatch()
        summary = _train(cfg, out_dir, ddp, device, amp_dtype, use_graphs, saver, workers, watch,
                         precompile_barrier)
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


def _train(cfg: TrainConfig, out_dir: Path, ddp: Distributed, device, amp_dtype, use_graphs: bool,
           saver: CheckpointWriter, workers: CompileWorkers | None = None,
           watch: CompileWatch | None = None, precompile_barrier: bool = False) -> dict[str, Any]:
    started = _now()  # trainer.max_minutes counts from here
    tc, oc = cfg.trainer, cfg.optim
    if cfg.decoding.beam < 1:  # a recipe's decoding typo fails now, not when the run is over
        raise MTError(f"decoding.beam must be >= 1 (got {cfg.decoding.beam})")
    parse_length_penalty(cfg.decoding.length_penalty)
    ckpt_dir = out_dir / "checkpoints"
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"

    # ---- resume: the checkpoint's tokenizer and state
    resume_state = None
    tokenizer = None
    if tc.resume:
        if not last_path.exists():
            raise CheckpointError(f"trainer.resume=true but there is no checkpoint at {last_path}")
        resume_state = load_checkpoint(last_path)
        try:
            saved_cfg = from_dict(resume_state["config"])
            tokenizer = Tokenizer.from_state_dict(resume_state["tokenizer"])
        except MTError:
            raise
        except Exception as e:
            raise CheckpointError(f"checkpoint {last_path} has an unusable config or tokenizer: {e}") from None
        check_compatible(saved_cfg, cfg, last_path)

    # ---- data (rank 0 trains the tokenizer first; the others then find it in the cache)
    seed_everything(tc.seed)
    cache_dir = data.default_cache_dir(cfg.data)
    if not ddp.main:
        ddp.barrier()
    try:
        corpus = data.prepare_corpus(cfg.data, cfg.tokenizer, cache_dir,
                                     log=log.info if ddp.main else (lambda *_: None), tokenizer=tokenizer)
    finally:  # release the other ranks even when rank 0 fails: they then meet the same error
        if ddp.main:
            ddp.barrier()
    tok = corpus.tokenizer
    if corpus.valid is None or len(corpus.valid) == 0:
        raise MTError(f"no validation split in {cfg.data.path} (looked for {cfg.data.valid_split}, valid, val, dev)")

    # ---- model, optimizer, scheduler
    seed_everything(tc.seed)
    model = Seq2Seq(cfg.model, tok.src_vocab_size, tok.tgt_vocab_size, tok.pad_id).to(device)
    optimizer = make_optimizer(model, oc)
    scheduler = make_scheduler(optimizer, oc, tc.max_steps)
    criterion = nn.CrossEntropyLoss(ignore_index=tok.pad_id, label_smoothing=oc.label_smoothing, reduction="sum")
    step, epoch, batch_in_epoch, best_bleu, bad_evals = 0, 0, 0, -1.0, 0
    if resume_state is not None:
        try:
            model.load_state_dict(resume_state["model"])
            optimizer.load_state_dict(resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["scheduler"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint {last_path} does not fit this model: {first_line(e)}") from None
        step, epoch = resume_state["step"], resume_state["epoch"]
        batch_in_epoch = resume_state["batch_in_epoch"]
        best_bleu, bad_evals = resume_state["best_bleu"], resume_state["bad_evals"]
        rngs = resume_state["rng"]
        set_rng_state(rngs[ddp.rank] if ddp.rank < len(rngs) else rngs[0])
        if ddp.main:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", last_path, step, epoch, batch_in_epoch)
    train_model: nn.Module = model
    if ddp.enabled:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    # one training step: eager, or replayed from CUDA graphs (mt/graphs.py; README "GPU speed")
    decoder_graphs = buckets = None
    if use_graphs:
        graphs.make_capturable(optimizer, device)  # after loading: lr as a device tensor
        buckets = graphs.ShapeBuckets.from_budget(
            tc.max_tokens, tc.max_sentences, max(cfg.data.max_src_len, cfg.data.max_tgt_len) + 1,
            lengths=tc.graph_lengths, batch_sizes=tc.graph_batch_sizes)
        stepper = graphs.GraphedTrainStep(model, optimizer, criterion, pad_id=tok.pad_id, amp_dtype=amp_dtype,
                                          clip_norm=oc.clip_grad_norm, buckets=buckets, device=device)
        decoder_graphs = graphs.GraphedDecoder(model)
        if ddp.main:
            log.info("CUDA graphs on: %d batch shapes (batch, src, tgt) %s", len(buckets), buckets.shapes)
    else:
        stepper = graphs.TrainStep(model, optimizer, criterion, pad_id=tok.pad_id, amp_dtype=amp_dtype,
                                   clip_norm=oc.clip_grad_norm, device=device, train_model=train_model)

    def loader_for(ds, shuffle: bool, rank=ddp.rank, world=ddp.world, pin_memory=False):
        return batching.make_loader(ds, tok, tc.max_tokens, tc.max_sentences, shuffle=shuffle, seed=tc.seed,
                                    num_replicas=world, rank=rank, num_workers=tc.num_workers, pin_memory=pin_memory)

    # eager on CUDA: batches pinned by the loader, copied without waiting (graphs.to_device);
    # under graphs pad_batch makes the pinned copy
    train_loader = loader_for(corpus.train, shuffle=True, pin_memory=device.type == "cuda" and not use_graphs)
    valid_loader = loader_for(corpus.valid, shuffle=False, rank=0, world=1)
    if len(train_loader) == 0:
        raise MTError("the training split is empty after filtering; check data.max_src_len/max_tgt_len")
    train_loader.batch_sampler.set_epoch(epoch)
    first = next(iter(train_loader.batch_sampler))
    log.info("rank %d/%d: %d batches per epoch, first batch rows %s", ddp.rank, ddp.world, len(train_loader),
             sorted(first)[:8])

    writer = None
    if ddp.main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=step + 1 if resume_state else None)
        log.info("model: %s parameters, cell=%s (%s), device=%s, precision=%s, world=%d",
                 f"{count_parameters(model):,}", cfg.model.cell, model.backend(device), device,
                 amp_dtype or "fp32", ddp.world)
        log.info("data: %d train / %d valid pairs, vocab %d/%d", len(corpus.train), len(corpus.valid),
                 tok.src_vocab_size, tok.tgt_vocab_size)

    def checkpoint_state(metrics: dict, rngs: list) -> dict:
        opt_state, sched_state = optimizer.state_dict(), scheduler.state_dict()
        if use_graphs:  # tensor learning rates -> floats: the checkpoint loads without graphs too
            opt_state, sched_state = graphs.portable_state(opt_state), graphs.portable_state(sched_state)
        return {
            "model": model.state_dict(), "optimizer": opt_state, "scheduler": sched_state,
            "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "best_bleu": best_bleu,
            "bad_evals": bad_evals, "rng": rngs, "config": to_dict(cfg),
            "tokenizer": tok.state_dict(), "metrics": metrics,
        }

    signature_logged = False

    def out_of_time() -> bool:
        return tc.max_minutes > 0 and _now() - started >= 60.0 * tc.max_minutes

    # the validation split's columns as lists, once (datasets reads Arrow at every access)
    valid_src_ids, valid_srcs, valid_refs = ((list(corpus.valid[c]) if ddp.main else []) for c in ("src_ids", "src", "tgt"))

    # ---- Triton kernels: compiled in parallel now, not one by one at first launch (mt/precompile.py)
    if workers is not None:
        t0 = time.perf_counter()
        try:
            variants, report = precompile.precompile(
                workers, model, tok=tok, device=device, amp_dtype=amp_dtype, criterion=criterion,
                clip_norm=oc.clip_grad_norm, use_graphs=use_graphs, buckets=buckets,
                train_batch_sizes=[] if use_graphs else [len(b) for b in train_loader.batch_sampler],
                valid_batch_sizes=[len(b) for b in valid_loader.batch_sampler], n_valid=len(valid_src_ids),
                valid_batch_size=tc.valid_batch_size, max_len_a=tc.valid_max_len_a, max_len_b=tc.valid_max_len_b)
        except Exception as e:  # only a head start: the first launches compile what is missing
            workers.close()
            log.warning("precompile: skipped after %.1f s (%s: %s); kernels compile at first launch",
                        time.perf_counter() - t0, type(e).__name__, first_line(e))
        else:
            if watch is not None:
                watch.expect(variants)
            (log.warning if report.errors else log.info)(
                "precompile: %s; %.1f s in all, the dry run included", report.summary(), time.perf_counter() - t0)
    if precompile_barrier:
        ddp.barrier()  # the other ranks then load what rank 0 compiled (on one machine)

    def evaluate() -> tuple[dict, bool, bool]:
        """Validate on rank 0; every rank learns the BLEU, whether to stop early and whether the
        time limit has passed (rank 0's clock, after validating). Saves checkpoints."""
        nonlocal best_bleu, bad_evals, signature_logged
        metrics: dict[str, Any] = {}
        improved = False
        t0 = time.perf_counter()
        if ddp.main:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                vloss = validation_loss(model, valid_loader, device, amp_dtype, tok.pad_id)
                decoded = decode_dataset(model, valid_src_ids, tok, device, batch_size=tc.valid_batch_size,
                                         max_len_a=tc.valid_max_len_a, max_len_b=tc.valid_max_len_b,
                                         graphs=decoder_graphs)
            hyps = tok.decode_tgt(decoded.tokens)
            refs = valid_refs
            # BLEU now: it picks the best checkpoint; the rest in report_validation, in the background
            metrics = {"loss": vloss, "ppl": math.exp(min(vloss, 50)), **corpus_scores(hyps, refs, names=("bleu",))}
            srcs = valid_srcs
            samples = [f"**src:** {srcs[i]}  \n**ref:** {refs[i]}  \n**hyp:** {hyps[i]}" for i in range(min(tc.num_samples, len(hyps)))]
            attention = None
            if tc.attention_images and len(hyps):
                src_ids = valid_src_ids[0] + [tok.eos_id]
                out_ids = decoded.tokens[0] + [tok.eos_id]
                attn = decoded.attention[0][: len(out_ids), : len(src_ids)]  # (T_out, S) CPU
                attention = (attn, tok.src_pieces(src_ids), tok.tgt_pieces(out_ids)[: attn.shape[0]])
            for k in ("loss", "ppl", "bleu"):
                writer.add_scalar(f"valid/{k}", metrics[k], step)
            improved = metrics["bleu"] > best_bleu
            if improved:
                best_bleu, bad_evals = metrics["bleu"], 0
            else:
                bad_evals += 1
        bleu, stop, timed_out = ddp.broadcast([metrics.get("bleu", 0.0), float(tc.patience > 0 and bad_evals >= tc.patience),
                                               float(out_of_time())], device)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(bleu)  # before saving, so a resumed run's scheduler has seen this BLEU too
        rngs = ddp.gather_objects(rng_state())  # every rank's RNG, for an exact resume
        if ddp.main:
            # in the background: the report, then the checkpoint (improved: best.pt, then last.pt
            # as the same file; mt/checkpoint.py). The next validation's save waits for both.
            report = functools.partial(report_validation, writer=writer, step=step, metrics=metrics, hyps=hyps,
                                       refs=refs, samples=samples, attention=attention, first=not signature_logged)
            signature_logged = True
            saver.save(checkpoint_state(metrics, rngs), best_path if improved else last_path,
                       also=last_path if improved else None, before_write=report)
            log.info("step %d | valid loss %.3f ppl %.2f | BLEU %.2f | best %.2f%s | %.1fs",
                     step, metrics["loss"], metrics["ppl"], metrics["bleu"], best_bleu, " *" if improved else "",
                     time.perf_counter() - t0)
        model.train()
        return metrics, bool(stop), bool(timed_out)

    # ---- the loop
    # Each step's numbers reach the host a step late (mt/step_stats.py): the host builds and
    # launches step k+1 while the GPU still runs step k. The NaN check, the training log and the
    # time limit therefore act on step k during step k+1; everything is settled (drained)
    # before a validation, so no checkpoint is ever written after a non-finite loss.
    model.train()
    progress = None
    if ddp.main:  # disable=None: a bar only when stderr is a terminal
        progress = tqdm(total=tc.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                        disable=None if tc.progress is None else not tc.progress)
    last_metrics: dict[str, Any] = {}
    stopped_early = False
    win_loss = win_nll = win_tok = 0.0
    win_t0 = time.perf_counter()
    pending = StepStats(device, lag=1)

    def settle(rows) -> bool:
        """Account for the steps read back: NaN check, training log. True if a rank is out of time."""
        nonlocal win_loss, win_nll, win_tok, win_t0
        late = False
        for (at_step, at_epoch), (loss_tot, nll_tot, ntok_tot, ranks_out_of_time, grad_norm, lr_now) in rows:
            if not math.isfinite(loss_tot):  # (this step's update, and maybe the next one's, are in memory)
                saver.wait(raise_error=False)  # the last validation's checkpoint is on disk
                raise TrainingDiverged(
                    f"loss is {loss_tot} at step {at_step}; stopped without saving "
                    f"(last good checkpoint: {last_path if last_path.exists() else 'none yet'})")
            late = late or ranks_out_of_time > 0
            win_loss += loss_tot
            win_nll += nll_tot
            win_tok += ntok_tot
            if ddp.main and (at_step % tc.log_every == 0 or at_step == tc.max_steps):
                elapsed = time.perf_counter() - win_t0
                loss_avg, nll_avg = win_loss / max(1, win_tok), win_nll / max(1, win_tok)
                writer.add_scalar("train/loss", loss_avg, at_step)
                writer.add_scalar("train/ppl", math.exp(min(nll_avg, 50)), at_step)
                writer.add_scalar("train/lr", lr_now, at_step)
                writer.add_scalar("train/grad_norm", grad_norm, at_step)
                writer.add_scalar("train/tokens_per_s", win_tok / max(elapsed, 1e-9), at_step)
                progress.set_postfix(loss=f"{loss_avg:.3f}", lr=f"{lr_now:.2e}")
                log.info("step %d | epoch %d | loss %.4f | ppl %.2f | lr %.3e | grad norm %.3f | %.0f tok/s",
                         at_step, at_epoch, loss_avg, math.exp(min(nll_avg, 50)), lr_now, grad_norm,
                         win_tok / max(elapsed, 1e-9))
                win_loss = win_nll = win_tok = 0.0
                win_t0 = time.perf_counter()
        return late

    last_eval_step = step if resume_state else -1
    done = step >= tc.max_steps
    while not done and epoch < tc.max_epochs:
        train_loader.batch_sampler.set_epoch(epoch, start=batch_in_epoch)  # resuming: skip what was trained on
        for i, batch in enumerate(train_loader, start=batch_in_epoch):
            # eager: forward + backward, then the update; graphs: the whole step in forward_backward
            loss_sum, nll_sum = stepper.forward_backward(batch)
            grad_norm = stepper.update()  # clip, optimizer step, zero grads (graphs: already done)
            if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step()
            step += 1
            batch_in_epoch = i + 1
            values = step_values(loss_sum, nll_sum, batch.ntokens, out_of_time(), grad_norm,
                                 optimizer.param_groups[0]["lr"], device)  # (6,) on the device
            ddp.all_sum_(values[:SUMMED])  # every rank sees the same sums, so all stop together
            pending.push((step, epoch), values)
            ranks_out_of_time = settle(pending.ready())  # the previous step's numbers
            if ddp.main:
                progress.update(1)
            if step % tc.eval_every == 0 or step >= tc.max_steps:
                ranks_out_of_time = settle(pending.drain()) or ranks_out_of_time  # nothing unchecked is saved
                last_metrics, stop, timed_out = evaluate()
                last_eval_step = step
                ranks_out_of_time = ranks_out_of_time or timed_out  # the validation may have used up the time
                if stop:
                    stopped_early = True
                    if ddp.main:
                        log.info("early stopping: no BLEU improvement in %d validations", tc.patience)
                    done = True
                    break
            if step >= tc.max_steps:
                done = True
                break
            if ranks_out_of_time:
                if ddp.main:
                    log.info("time limit: stopping after step %d (trainer.max_minutes=%g)", step, tc.max_minutes)
                done = True
                break
        else:  # the epoch ran out
            epoch += 1
            batch_in_epoch = 0
    settle(pending.drain())  # the last step's numbers: its NaN check and log line
    if last_eval_step != step:  # max_epochs or max_minutes reached between validations
        last_metrics, _, _ = evaluate()
    if ddp.main:
        progress.close()
        saver.wait()  # the last validation's report (TensorBoard, log) and checkpoint are done
        if watch is not None:
            log.info("triton: %s", watch.summary())
        if use_graphs:
            log.info("CUDA graphs: %s; decoder steps: %s", stepper.summary(),
                     ", ".join(f"{k} {v}" for k, v in sorted(decoder_graphs.stats.items())) or "none")
        hparams = {f"{g}.{k}": (v if isinstance(v, (int, float, str, bool)) else str(v))
                   for g in ("model", "optim", "tokenizer") for k, v in asdict(getattr(cfg, g)).items()}
        hparams.update({"trainer.max_tokens": tc.max_tokens, "data.src": cfg.data.src, "data.tgt": cfg.data.tgt})
        writer.add_hparams(hparams, {"hparam/best_bleu": best_bleu}, run_name=".")
        writer.close()
        log.info("training took %.1f min (%d steps)", (_now() - started) / 60, step)
    return {"step": step, "epoch": epoch, "best_bleu": best_bleu, "last": last_metrics,
            "stopped_early": stopped_early, "best_path": str(best_path), "last_path": str(last_path)}


# --------------------------------------------------------------------------- CLI
@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(dcfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    cfg: TrainConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
    out_dir = HydraConfig.get().runtime.output_dir
    try:
        summary = train(cfg, out_dir)
    except MTError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if int(os.environ.get("RANK", "0")) == 0:
        log.info("done: step %d, best validation BLEU %.2f, checkpoints in %s", summary["step"], summary["best_bleu"],
                 Path(out_dir) / "checkpoints")
    return summary["best_bleu"]  # the value a Hydra sweeper would optimise


if __name__ == "__main__":
    main()
