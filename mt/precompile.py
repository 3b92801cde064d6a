"""Compile the Triton kernels a training run will launch before it launches them.

    python -m mt.train experiment=multi30k_de_en trainer.precompile_workers=8   # default null: auto

A first run on a machine compiles every Triton kernel variant it meets (about a second each, on
the training thread: the de->en recipe met 12, six at its first step and six at its first
validation, before the search's and the decoding attention's kernels were added). With the
Triton gate cell on CUDA, mt.train instead

1. starts `trainer.precompile_workers` compile processes (mt/kernels/precompile.py) before it
   prepares the data, so they import Triton meanwhile;
2. once the model, its step function and the loaders exist, runs `dry_run` on a copy of the
   model: one training step per batch tile, a validation loss and a greedy decode per batch tile,
   through the run's own step, loss and search code, with every Triton launch recorded and skipped
   (no values are computed: only which kernel variants the run needs);
3. hands the variants to the workers, which compile them into Triton's on-disk cache in parallel,
   and waits for them; the run's first launches then load them from the cache.

The batch tile (`triton_cell.batch_tile`) is what changes a kernel variant from one batch to the
next (batch size and length are not specialized), so one batch per tile stands for all of them.
What the dry run misses still compiles on first launch, as before: the end-of-run log line
"triton: first launches of N Triton kernel variants ..." says how many, and how long they took.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .batching import Batch, collate
from .errors import MTError
from .kernels import precompile as kp
from .model import Seq2Seq
from .runtime import autocast

__all__ = ["resolve_workers", "dry_run", "one_per_tile", "precompile"]

AUTO_MAX_WORKERS = 8


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_workers(value: int | None, device: torch.device, backend: str) -> int:
    """trainer.precompile_workers -> how many compile processes (0 = no precompiling).
    None (auto): with the Triton gate cell on CUDA, min(8, CPUs - 1), and none below 2."""
    if value is None:
        if device.type != "cuda" or backend != "triton":
            return 0
        n = min(AUTO_MAX_WORKERS, _cpus() - 1)
        return n if n >= 2 else 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MTError(
            f"trainer.precompile_workers must be null (auto), 0 (off) or a number of processes, got {value!r}"
        )
    if value and (device.type != "cuda" or backend != "triton"):
        raise MTError(
            f"trainer.precompile_workers={value} compiles Triton kernels for CUDA, but this run uses the "
            f"{backend} cell on {device}; use trainer.precompile_workers=null (auto) or 0"
        )
    return value


def one_per_tile(sizes: Iterable[int]) -> list[int]:
    """The smallest batch size of each batch tile among `sizes`."""
    from .kernels.triton_cell import batch_tile

    first: dict[int, int] = {}
    for b in sorted(set(int(s) for s in sizes)):
        first.setdefault(batch_tile(b), b)
    return sorted(first.values())


def _batch(n: int, src_len: int, tgt_len: int, token: int, pad: int, bos: int, eos: int) -> Batch:
    """n sentences whose padded shapes are (n, src_len) and (n, tgt_len) (EOS and BOS included)."""
    row = {"src_ids": [token] * (src_len - 1), "tgt_ids": [token] * (tgt_len - 1), "idx": 0}
    return collate([row] * n, pad, bos, eos)


def dry_run(
    model: Seq2Seq,
    *,
    tok,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    criterion: nn.Module,
    clip_norm: float,
    train_shapes: Sequence[tuple[int, int, int]],
    valid_batch_sizes: Sequence[int],
    decode_sizes: Sequence[int],
    valid_batch_size: int,
    max_len_a: float,
    max_len_b: int,
    use_graphs: bool,
    buckets=None,
) -> None:
    """Run the run's training step on each of `train_shapes` (batch, src_len, tgt_len), its
    validation loss on one batch per size in `valid_batch_sizes`, and its greedy decode of n
    sentences per n in `decode_sizes`, on a copy of `model`, under the run's autocast and CUDA-
    graph settings (graphs emulated: nothing is captured). The copy's optimizer is plain SGD: the
    kernels run inside the model only. Leaves `model` and every random generator as they were."""
    from . import graphs
    from .search import decode_dataset
    from .validation import validation_loss

    shadow = copy.deepcopy(model)
    shadow.train()
    sgd = torch.optim.SGD(shadow.parameters(), lr=0.0)
    kw = dict(pad_id=tok.pad_id, amp_dtype=amp_dtype, clip_norm=clip_norm, device=device)
    if use_graphs:
        step = graphs.GraphedTrainStep(shadow, sgd, criterion, buckets=buckets, emulate=True, **kw)
    else:
        step = graphs.TrainStep(shadow, sgd, criterion, **kw)
    make = dict(token=tok.unk_id, pad=tok.pad_id, bos=tok.bos_id, eos=tok.eos_id)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for n, s, t in train_shapes:
            step.forward_backward(_batch(n, s, t, **make))
            step.update()
        sources = [[tok.unk_id] * 3]
        with autocast(device, amp_dtype):
            validation_loss(shadow, [_batch(n, 4, 4, **make) for n in valid_batch_sizes], device, amp_dtype, tok.pad_id)
            decoder = graphs.GraphedDecoder(shadow, emulate=True) if use_graphs else None
            for n in decode_sizes:
                decode_dataset(
                    shadow,
                    sources * n,
                    tok,
                    device,
                    batch_size=valid_batch_size,
                    max_len_a=max_len_a,
                    max_len_b=max_len_b,
                    graphs=decoder,
                )


def precompile(
    workers: kp.CompileWorkers,
    model: Seq2Seq,
    *,
    tok,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    criterion: nn.Module,
    clip_norm: float,
    use_graphs: bool,
    buckets,
    train_batch_sizes: Iterable[int],
    valid_batch_sizes: Iterable[int],
    n_valid: int,
    valid_batch_size: int,
    max_len_a: float,
    max_len_b: int,
    timeout: float = 300.0,
) -> tuple[list[kp.Variant], kp.CompileReport]:
    """Record the run's kernel variants (`dry_run`, one batch per tile), compile them on
    `workers` and wait. train_batch_sizes: the eager run's batch sizes (unused under graphs,
    whose shapes are `buckets`'); valid_batch_sizes: the validation loader's."""
    from .kernels.triton_cell import batch_tile

    if use_graphs:
        shapes: dict[int, tuple[int, int, int]] = {}
        for shape in sorted(buckets.shapes, key=lambda s: (s[1] + s[2], s)):
            shapes.setdefault(batch_tile(shape[0]), shape)
        train_shapes = sorted(shapes.values())
    else:
        train_shapes = [(n, 4, 4) for n in one_per_tile(train_batch_sizes)]
    full = min(n_valid, valid_batch_size)
    decode_sizes = sorted({n for n in (full, n_valid % valid_batch_size) if n > 0})
    variants = kp.record_variants(
        lambda: dry_run(
            model,
            tok=tok,
            device=device,
            amp_dtype=amp_dtype,
            criterion=criterion,
            clip_norm=clip_norm,
            train_shapes=train_shapes,
            valid_batch_sizes=one_per_tile(valid_batch_sizes),
            decode_sizes=decode_sizes,
            valid_batch_size=valid_batch_size,
            max_len_a=max_len_a,
            max_len_b=max_len_b,
            use_graphs=use_graphs,
            buckets=buckets,
        )
    )
    workers.compile(variants, kp.current_target())
    kp.warm_keys()  # while the workers compile: this process's first cache lookups get cheaper
    return variants, workers.wait(timeout)
