"""CUDA graphs for training and decoding: fixed shapes, captured once, replayed.

An eager LSTM training step is thousands of small kernel launches (one per LSTM step and layer,
forward and backward, plus attention, loss, clipping, Adam); on a fast GPU the launches, not the
arithmetic, set the pace (docs/gpu.md). A CUDA graph records the launches
once and replays them with one call. A graph has fixed shapes and fixed memory addresses, so:

Training (`GraphedTrainStep`, used by mt.train when `trainer.cuda_graphs` is on)
  - `ShapeBuckets` is a small fixed set of (batch, source length, target length) shapes. Each
    batch is padded to the smallest shape that holds it (`pad_batch`): extra rows are all
    padding (target all pad_id, so they weigh nothing in the loss; source one pad token, so the
    encoder and the attention stay finite), extra columns are padding. Padding changes no loss
    and no gradient, only the summation order of a few reductions. A batch that fits no shape
    runs eagerly (same step function, no graph).
  - The whole step is one graph per shape: zero the gradients in place, forward (under
    autocast), loss = sum / ntokens with ntokens a static device tensor, backward,
    clip_grad_norm_ (foreach; returns a device tensor, no sync), optimizer step. Nothing inside
    reads a value back to the host; the loss, NLL and gradient norm are copied into `out`
    (a tensor outside the graph). mt.train copies them out after the replay and reads them a
    step later (mt/step_stats.py); the padded batch reaches the graph's inputs through pinned
    memory with non-blocking copies (`to_device`, `_TrainSlot.load`). Nothing in the loop waits
    for the GPU, so the host prepares the next step while the GPU runs this one.
  - Under torchrun the update (the gradients' all-reduce, clipping, optimizer, EMA) is a graph
    of its own, one for all shapes, replayed by every rank once a step: a captured NCCL
    collective must be launched from the same capture on every rank, and the ranks' batches take
    different shapes (mt/distributed.py, `FlatGradients`).
  - The optimizer must be `capturable=True` with the learning rate as a device tensor
    (`make_capturable`): torch 2.13's Adam/AdamW accept `lr` as a 1-element Tensor when
    capturable=True (or fused=True), and its LR schedulers update a tensor lr in place
    (`param_group["lr"].fill_(value)`, torch/optim/lr_scheduler.py `_update_param_group_val`),
    so the graph reads the scheduled lr at every replay. `state["step"]` lives on the device.
    Checkpoints stay portable (`portable_state`: floats, capturable=False).
  - Gradients are allocated by the first (eager) step and never freed afterwards (zeroed in
    place), so the graph always writes the same tensors.
  - Warm-up: the first `warmup` batches of each shape run eagerly on a side stream (real
    training steps: Triton compiles, cuDNN/cuBLAS initialise, Adam creates its state), then
    the next one is captured and replayed. All shapes share one memory pool: nothing allocated
    inside a graph outlives its replay, so any replay order is safe.
  - Dropout: `torch.cuda.graph` registers the default CUDA generator; kernels inside the graph
    read the Philox seed/offset from device tensors that each replay sets from the generator's
    current offset and then advances it by the graph's total (CUDAGeneratorState::
    replay_prologue in aten/src/ATen/cuda/CUDAGeneratorImpl.cpp). So every replay draws fresh
    masks, the same ones the eager step would draw from the same generator state, and the RNG
    state saved in checkpoints stays meaningful.
  - The model must not sync: `Seq2Seq.graph_safe = True` switches model.cell=cudnn's encoder
    from packing (which needs the lengths on the host) to cuDNN on the padded batch
    (`EncoderLSTM._cudnn_padded`, still cuDNN kernels, same results); the gate-cell backends
    never sync.
  - After a non-finite loss the update of that step (and, read a step late, perhaps of the next
    one) has already been applied in memory; training stops without saving, so the last checkpoint
    on disk is good.

Decoding (`GraphedDecoder`, given to mt.search's functions)
  - One graph per search step: the decoder step and the search's bookkeeping (top-k, the
    finished hypotheses, back-pointers, reordering the beams), which mt.search keeps on the
    device in fixed-shape tensors. Sentences are padded to a bucket (multiples of 8 up to 64,
    then 4 sizes per doubling: 80, 96, 112, 128, 160, ..., 640, 768, ...; padded sentences are
    done from the start), the source length likewise (multiples of 4 up to 32, then 40, 48, 56,
    64, 80, ...; padded positions are masked). The encoder is a second graph per shape, run once
    per batch on the padded source: it writes the memory and the initial state into the
    slot's buffers; then the host only replays steps, and reads the done flags every
    `sync_every` steps. Eager on CPU, with gradients on, and when
    nothing is given (the search functions take `graphs=None`).

On a CPU, or with `emulate=True`, both classes run the same static-shape code without capturing
(tests check padding and bookkeeping this way; tests/test_graphs_gpu.py, marked `gpu`, checks
the captured graphs against it on a GPU).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import ensemble
from .errors import MTError
from .loss import loss_sums
from .model import DecoderState, Memory, Seq2Seq
from .modules.lstm import compute_dtype
from .runtime import autocast
from .step_stats import pinned_if_possible

Shape = tuple[int, int, int]  # (batch, source length, target length), EOS/BOS included


def _round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


def length_grid(max_len: int, start: int = 8, ratio: float = 1.1, multiple: int = 2) -> list[int]:
    """start, then x`ratio` rounded up to `multiple` (at least +multiple), until >= max_len.

    length_grid(101) == [8, 10, 12, 14, 16, 18, 20, 22, 26, 30, 34, 38, 42, 48, 54, 60, 66, 74, 82, 92, 102]
    """
    grid = [_round_up(max(1, start), multiple)]
    while grid[-1] < max_len:
        grid.append(max(grid[-1] + multiple, _round_up(math.ceil(grid[-1] * ratio), multiple)))
    return grid


def bucket_size(n: int, granule: int) -> int:
    """n rounded up to a multiple of `granule`, and above 8 * granule to a quarter of its octave
    (4 sizes per doubling: waste <= 25%, all powers of two kept).

    granule 8 (decoder rows):   8, 16, ..., 64, 80, 96, 112, 128, 160, ..., 512, 640, 768, ...
    granule 4 (source length):  4, 8, ..., 32, 40, 48, 56, 64, 80, ...
    """
    n = max(1, int(n))
    return _round_up(n, max(granule, 1 << max(0, (n - 1).bit_length() - 3)))


class ShapeBuckets:
    """A fixed set of (batch, src_len, tgt_len) shapes; `find` picks the smallest that holds a batch.

    Lengths count the EOS (source) and BOS/EOS (target) that `mt.batching.collate` adds, i.e.
    they are `batch.src.shape[1]` and `batch.tgt_in.shape[1]`.
    """

    def __init__(self, shapes: Iterable[Sequence[int]]):
        uniq = sorted({tuple(int(v) for v in s) for s in shapes})
        for s in uniq:
            if len(s) != 3 or min(s) < 1:
                raise MTError(f"a CUDA-graph shape is (batch, src_len, tgt_len) of positive ints, got {s}")
        if not uniq:
            raise MTError("no CUDA-graph shapes")
        self.shapes: list[Shape] = uniq  # type: ignore[assignment]

    @classmethod
    def from_budget(
        cls,
        max_tokens: int,
        max_sentences: int,
        max_len: int,
        lengths: Sequence[int] | None = None,
        batch_sizes: Sequence[int] | None = None,
        batch_multiple: int = 1,
    ) -> ShapeBuckets:
        """Shapes (B_L, L, L) for bucket lengths L that hold every batch TokenBucketSampler makes.

        lengths: None = `length_grid(max_len)`. batch_sizes: one per length, or None = derived:
        a batch whose longest side m lies in (previous L, L] has at most max_tokens // m <=
        max_tokens // (previous L + 1) sentences (and at most max_sentences), at least 1 (a
        sentence longer than the budget is a batch of its own); `batch_multiple` > 1 rounds it up
        (not beyond max_sentences).

        The x1.1 grid is the trade-off between few shapes (few graphs to capture) and little
        padding: a coarser grid, or batch sizes rounded to multiples of 8, pad far more tokens
        (docs/benchmarks.md, "Padding of the CUDA-graph buckets").
        """
        lens = sorted({int(v) for v in (lengths if lengths is not None else length_grid(max_len))})
        if not lens or lens[0] < 1:
            raise MTError(f"trainer.graph_lengths must be positive lengths, got {lengths}")
        if batch_sizes is not None:
            if lengths is None or len(batch_sizes) != len(lengths):
                raise MTError(
                    "trainer.graph_batch_sizes needs trainer.graph_lengths, one batch size per length "
                    f"(got {list(batch_sizes)} for lengths {None if lengths is None else list(lengths)})"
                )
            pairs = sorted(zip((int(v) for v in lengths), (int(b) for b in batch_sizes)))
            return cls((b, L, L) for L, b in pairs)
        shapes, prev = [], 0
        for L in lens:
            most = min(max_sentences, max(1, max_tokens // (prev + 1)))
            if most >= batch_multiple:
                most = min(max_sentences, _round_up(most, batch_multiple))
            shapes.append((most, L, L))
            prev = L
        return cls(shapes)

    def find(self, n: int, src_len: int, tgt_len: int) -> Shape | None:
        """The fitting shape with the fewest padded tokens (B*(S+T)), or None."""
        best = None
        for s in self.shapes:
            if n <= s[0] and src_len <= s[1] and tgt_len <= s[2]:
                if best is None or (s[0] * (s[1] + s[2]), s) < (best[0] * (best[1] + best[2]), best):
                    best = s
        return best

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __repr__(self) -> str:
        return f"ShapeBuckets({self.shapes})"


def pad_batch(batch: Any, shape: Shape, pad_id: int, pin_memory: bool = False) -> Any:
    """A copy of `batch` (an mt.batching.Batch on the CPU) padded to shape (B, S, T).

    Extra rows: source = one pad token (src_len 1: the encoder and the attention see a real,
    finite position), target all pad_id (ignored by the loss: no loss, zero gradient). Extra
    columns: pad_id. `ntokens` is unchanged; `indices` of extra rows are -1. `pin_memory`: the
    copy in pinned memory, ready for a `non_blocking` copy to the GPU.
    """
    B, S, T = shape
    n, s = batch.src.shape
    t = batch.tgt_in.shape[1]
    if n > B or s > S or t > T:
        raise ValueError(f"batch ({n}, {s}, {t}) does not fit shape {shape}")

    def full(x: Tensor, size: tuple[int, ...], value: int) -> Tensor:
        return pinned_if_possible(
            lambda pin: torch.full(size, value, dtype=x.dtype, device=x.device, pin_memory=pin),
            pin_memory and x.device.type == "cpu",
        )

    def grow(x: Tensor, cols: int) -> Tensor:
        out = full(x, (B, cols), pad_id)
        out[:n, : x.shape[1]] = x
        return out

    src_len = full(batch.src_len, (B,), 1)
    src_len[:n] = batch.src_len
    indices = full(batch.indices, (B,), -1)
    indices[:n] = batch.indices
    return dataclasses.replace(
        batch,
        src=grow(batch.src, S),
        src_len=src_len,
        tgt_in=grow(batch.tgt_in, T),
        tgt_out=grow(batch.tgt_out, T),
        indices=indices,
    )


def to_device(batch: Any, device: torch.device) -> Any:
    """`batch` (an mt.batching.Batch) on `device`, without making the host wait for the GPU.

    A plain `.to("cuda")` copy returns only once the stream has run everything queued before it
    (PyTorch synchronizes the stream after a blocking host-to-device copy), so the host could not
    prepare the next step while the GPU runs this one. On CUDA the batch goes through pinned
    memory with `non_blocking=True` instead; PyTorch's pinned-memory allocator keeps the pinned
    copy alive until the transfer is done."""
    if device.type != "cuda" or batch.src.device.type != "cpu":
        return batch.to(device)
    if not batch.src.is_pinned():
        batch = pinned_if_possible(lambda pin: batch.pin_memory() if pin else batch, True)
    return batch.to(device, non_blocking=True)


# --------------------------------------------------------------------------- optimizer state
def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device | str) -> None:
    """Make Adam/AdamW graph-capturable in place: capturable=True, foreach, the learning rate a
    float32 device tensor (LR schedulers then update it in place), `step` states on the device.
    Call after loading a checkpoint (load_state_dict restores the saved flags and floats)."""
    device = torch.device(device)
    for group in optimizer.param_groups:
        lr = group["lr"]
        value = float(lr.item() if isinstance(lr, Tensor) else lr)
        group["lr"] = torch.tensor(value, dtype=torch.float32, device=device)
        group["capturable"] = True
        group["foreach"] = True
    for state in optimizer.state.values():
        if isinstance(state.get("step"), Tensor):
            state["step"] = state["step"].to(device=device, dtype=torch.float32)


def portable_state(state: dict) -> dict:
    """An optimizer or LR-scheduler state_dict with tensor learning rates as floats and
    capturable=False, so a checkpoint written under CUDA graphs loads anywhere (make_capturable
    restores the graph settings after loading)."""

    def num(v: Any) -> Any:
        return float(v.item()) if isinstance(v, Tensor) and v.numel() == 1 else v

    out = dict(state)
    if "param_groups" in out:
        groups = []
        for g in out["param_groups"]:
            g = {k: (num(v) if k in ("lr", "initial_lr") else v) for k, v in g.items()}
            if "capturable" in g:
                g["capturable"] = False
            groups.append(g)
        out["param_groups"] = groups
    for key in ("_last_lr", "base_lrs"):
        if isinstance(out.get(key), list):
            out[key] = [num(v) for v in out[key]]
    return out


# --------------------------------------------------------------------------- running a slot
class _SlotRunner:
    """How one static-shape step runs, for GraphedTrainStep and GraphedDecoder alike. A slot
    (its `graph`, None until captured, and its `runs`) is replayed if captured; else `fn` runs
    eagerly when not capturing (CPU, emulate=True); else the first `warmup` runs of the slot go
    eagerly on a side stream (PyTorch's recipe before a capture: lazy initialisation, compiles);
    then `fn` is captured, all slots in one memory pool, and replayed (capturing runs nothing).
    `stats` counts each way."""

    def __init__(self, warmup: int, stats: Counter, pool=None):
        self.warmup, self.stats = max(1, warmup), stats
        self._pool = pool  # a graph memory pool shared with another runner, or None: the first capture's
        self._side: torch.cuda.Stream | None = None

    def run(self, slot: Any, fn, device: torch.device, capture: bool) -> None:
        if slot.graph is not None:
            slot.graph.replay()
            self.stats["replayed"] += 1
        elif not capture:
            fn()
            self.stats["emulated"] += 1
        elif slot.runs < self.warmup:
            if self._side is None:
                self._side = torch.cuda.Stream(device)
            self._side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(self._side):
                fn()
            torch.cuda.current_stream(device).wait_stream(self._side)
            self.stats["warmup"] += 1
        else:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                fn()
            if self._pool is None:
                self._pool = graph.pool()
            slot.graph = graph
            graph.replay()  # capturing ran nothing: this is the step
            self.stats["captured"] += 1
        slot.runs += 1


# --------------------------------------------------------------------------- training
class TrainStep:
    """The eager training step (trainer.cuda_graphs off), exactly mt.train's loop body:

    loss_sum, nll_sum = step.forward_backward(batch)   # forward, loss, backward
    grad_norm = step.update()                          # clip, optimizer step, zero_grad
    ... queue the numbers; mt.train reads them a step later (mt/step_stats.py) ...
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion: nn.Module,
        *,
        pad_id: int,
        amp_dtype: torch.dtype | None,
        clip_norm: float,
        device: torch.device | str,
        train_model: nn.Module | None = None,
        ema=None,
    ):
        self.model, self.train_model = model, train_model if train_model is not None else model
        self.ema = ema  # an mt.averaging.EMA updated after every optimizer step, or None
        self.optimizer, self.criterion, self.pad_id = optimizer, criterion, pad_id
        self.amp_dtype, self.device = amp_dtype, torch.device(device)
        self.max_norm = clip_norm if clip_norm > 0 else float("inf")

    def forward_backward(self, batch) -> tuple[Tensor, Tensor]:
        """Forward + backward of a (CPU or device) batch; the label-smoothed loss sum and the NLL sum."""
        batch = to_device(batch, self.device)
        loss_sum, nll_sum = loss_sums(
            self.train_model,
            batch.src,
            batch.src_len,
            batch.tgt_in,
            batch.tgt_out,
            criterion=self.criterion,
            pad_id=self.pad_id,
            amp_dtype=self.amp_dtype,
        )
        (loss_sum / max(1, batch.ntokens)).backward()
        return loss_sum, nll_sum

    def update(self) -> Tensor:
        """Clip (the norm before clipping is returned), step, zero the gradients (and update the EMA)."""
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm


class _TrainSlot:
    """Static device inputs of one shape, and its graph once captured."""

    def __init__(self, shape: Shape, device: torch.device):
        B, S, T = shape
        self.src = torch.zeros(B, S, dtype=torch.long, device=device)
        self.src_len = torch.ones(B, dtype=torch.long, device=device)
        self.tgt_in = torch.zeros(B, T, dtype=torch.long, device=device)
        self.tgt_out = torch.zeros(B, T, dtype=torch.long, device=device)
        self.ntok = torch.ones((), dtype=torch.float32, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.runs = 0

    def load(self, batch) -> None:
        """Copy a batch of this shape in (pinned: without waiting for the GPU, see `to_device`)."""
        for name in ("src", "src_len", "tgt_in", "tgt_out"):
            getattr(self, name).copy_(getattr(batch, name), non_blocking=True)
        self.ntok.fill_(max(1, batch.ntokens))  # a kernel with the number as its argument: no copy

    @property
    def inputs(self) -> tuple[Tensor, ...]:
        return self.src, self.src_len, self.tgt_in, self.tgt_out, self.ntok


class GraphedTrainStep:
    """The whole training step as one CUDA graph per bucket shape; same interface as `TrainStep`.

        step = GraphedTrainStep(model, optimizer, criterion, pad_id=0, amp_dtype=torch.bfloat16,
                                clip_norm=5.0, buckets=ShapeBuckets.from_budget(4096, 256, 101),
                                device="cuda")             # optimizer: after make_capturable()
        loss_sum, nll_sum = step.forward_backward(batch)  # runs the WHOLE step (update included)
        grad_norm = step.update()                         # just returns the norm of that step

    The returned tensors are views of `out`, overwritten by the next step: read them first.
    `stats` counts replays, captures, warm-ups and eager (no fitting shape) steps.
    `emulate=True` (any device; forced on CPU) runs the same padded static-shape steps eagerly.
    Under torchrun, `grad_sync` (an mt.distributed.FlatGradients made before the first step)
    averages the gradients over the ranks: one all-reduce of the flat gradient buffer between the
    backward and the clipping. NCCL lets a captured collective run only where every rank launches
    the graph of the same collective capture, but each rank's batches fall into their own buckets
    (or none). So with `grad_sync` the step is two graphs: the shape's (zero the gradients,
    forward, loss, backward) and ONE update graph for every shape (all-reduce, clipping,
    optimizer, EMA). Every rank runs the update graph once a step, warms it up and captures it
    at the same step, so the captured all-reduces pair; both graphs share one memory pool.
    `update_stats` counts the update graph's runs.
    """

    def __init__(
        self,
        model: Seq2Seq,
        optimizer: torch.optim.Optimizer,
        criterion: nn.Module,
        *,
        pad_id: int,
        amp_dtype: torch.dtype | None,
        clip_norm: float,
        buckets: ShapeBuckets | None,
        device: torch.device | str,
        warmup: int = 2,
        emulate: bool = False,
        ema=None,
        grad_sync=None,
    ):
        self.device = torch.device(device)
        self.ema = ema  # an mt.averaging.EMA: its update is part of the captured step
        self.grad_sync = grad_sync  # an mt.distributed.FlatGradients (torchrun), or None
        self.capture = self.device.type == "cuda" and not emulate
        if self.device.type != "cuda" and not emulate:
            raise MTError(
                f"CUDA graphs need a CUDA device (training runs on {self.device}); "
                "use trainer.cuda_graphs=auto or false"
            )
        if self.capture and not all(g.get("capturable") for g in optimizer.param_groups):
            raise MTError("GraphedTrainStep needs a capturable optimizer: call mt.graphs.make_capturable first")
        self.model, self.optimizer, self.criterion = model, optimizer, criterion
        self.pad_id, self.amp_dtype = pad_id, amp_dtype
        self.max_norm = clip_norm if clip_norm > 0 else float("inf")
        self.buckets = buckets
        self.params = list(model.parameters())
        # the lr tensors the graphs read (make_capturable); see _keep_lr_tensors
        self._lrs = [g["lr"] for g in optimizer.param_groups]
        model.graph_safe = True
        self.out = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, NLL sum, grad norm
        self.stats: Counter = Counter()
        self._slots: dict[Shape, _TrainSlot] = {}
        pool = torch.cuda.graph_pool_handle() if self.capture and grad_sync is not None else None
        self._runner = _SlotRunner(warmup, self.stats, pool)
        self.update_stats: Counter = Counter()  # the update graph (with grad_sync only)
        self._update_slot = _Graphed()
        self._update_runner = _SlotRunner(warmup, self.update_stats, pool)

    # the step itself: everything a graph captures (no host sync, no allocation that outlives it)
    def _run(self, src: Tensor, src_len: Tensor, tgt_in: Tensor, tgt_out: Tensor, ntok: Tensor) -> None:
        self._forward_backward(src, src_len, tgt_in, tgt_out, ntok)
        self._update()

    def _forward_backward(self, src: Tensor, src_len: Tensor, tgt_in: Tensor, tgt_out: Tensor, ntok: Tensor) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:  # allocated by the first step, zeroed in place ever after
            torch._foreach_zero_(grads)
        loss_sum, nll_sum = loss_sums(
            self.model,
            src,
            src_len,
            tgt_in,
            tgt_out,
            criterion=self.criterion,
            pad_id=self.pad_id,
            amp_dtype=self.amp_dtype,
        )
        (loss_sum / ntok).backward()
        with torch.no_grad():
            self.out[0].copy_(loss_sum.detach())
            self.out[1].copy_(nll_sum)

    def _update(self) -> None:
        """The same for every shape: (the mean over the ranks,) clipping, optimizer, EMA."""
        with torch.no_grad():
            if self.grad_sync is not None:  # the mean over the ranks (captured: an NCCL all-reduce node)
                self.grad_sync.average_()
            grad_norm = nn.utils.clip_grad_norm_(self.params, self.max_norm)
            with warnings.catch_warnings():  # capturable=True outside a capture warns once
                warnings.filterwarnings("ignore", message=".*capturable=True.*")
                self.optimizer.step()
            if self.ema is not None:  # device tensors only (the count too): captured like the rest
                self.ema.update()
            self.out[2].copy_(grad_norm)

    def _keep_lr_tensors(self) -> None:
        """A scheduler that REPLACES param_group["lr"] (a float, or a new tensor) instead of
        filling it in place would leave the graphs reading a stale lr: copy the new value into
        the captured tensor and put that tensor back (torch 2.13's schedulers fill in place, so
        this costs one identity check per group)."""
        for group, lr in zip(self.optimizer.param_groups, self._lrs):
            if isinstance(lr, Tensor) and group["lr"] is not lr:
                lr.fill_(group["lr"])
                group["lr"] = lr

    def forward_backward(self, batch) -> tuple[Tensor, Tensor]:
        if not self.model.training:  # a graph captured now would replay eval mode (no dropout) forever
            raise MTError("GraphedTrainStep runs training steps: call model.train() first")
        self._keep_lr_tensors()
        shape = None
        if self.buckets is not None:
            shape = self.buckets.find(batch.src.shape[0], batch.src.shape[1], batch.tgt_in.shape[1])
        split = self.grad_sync is not None  # the update apart, one graph for all shapes (see the class)
        fn = self._forward_backward if split else self._run
        if shape is None:  # no fitting shape: the same step, eagerly, on the batch as it is
            b = to_device(batch, self.device)
            ntok = torch.full((), float(max(1, b.ntokens)), device=self.device)  # (no host-to-device copy)
            fn(b.src, b.src_len, b.tgt_in, b.tgt_out, ntok)
            self.stats["eager"] += 1
        else:
            slot = self._slots.get(shape)
            if slot is None:
                slot = self._slots[shape] = _TrainSlot(shape, self.device)
            slot.load(pad_batch(batch, shape, self.pad_id, pin_memory=self.device.type == "cuda"))
            self._runner.run(slot, lambda: fn(*slot.inputs), self.device, self.capture)
        if split:  # every rank, every step, whatever the shape: the update graph
            self._update_runner.run(self._update_slot, self._update, self.device, self.capture)
        return self.out[0], self.out[1]

    def update(self) -> Tensor:
        """The step already ran in forward_backward; the gradient norm (before clipping)."""
        return self.out[2]

    def summary(self) -> str:
        return (
            f"{sum(s.graph is not None for s in self._slots.values())} graphs of {len(self.buckets or [])} "
            f"shapes; steps: "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.stats.items()))
            + (
                "; update graph: " + ", ".join(f"{k} {v}" for k, v in sorted(self.update_stats.items()))
                if self.update_stats
                else ""
            )
        )


# --------------------------------------------------------------------------- decoding
def _kept(cache: dict, key: tuple, fresh: list[Tensor]) -> list[Tensor]:
    """`fresh` copied into the buffers `cache[key]` (clones, on the first call), which CUDA graphs
    can read from replay to replay: the buffers, refreshed."""
    static = cache.get(key)
    if static is None:
        static = cache[key] = [t.clone() for t in fresh]
    else:
        for dst, src in zip(static, fresh, strict=True):
            dst.copy_(src)
    return static


class _Graphed:
    """A graph and how often its function ran: what `_SlotRunner` keeps per captured function."""

    def __init__(self):
        self.graph: torch.cuda.CUDAGraph | None = None
        self.runs = 0


class _DecodeSlot(_Graphed):
    """Static buffers of one padded search shape (sentences x beam rows, source length): the
    padded source, what the encoder makes of it (memory and initial state, each sentence's rows
    repeated K times), the search built on them (by mt.search, on first use), the graph of the
    search step (this object) and the graph of the encoder (`encoder`)."""

    def __init__(
        self,
        n: int,
        K: int,
        Sb: int,
        src_dtype: torch.dtype,
        len_dtype: torch.dtype,
        device: torch.device,
        amp: torch.dtype | None,
    ):
        super().__init__()
        self.S, self.K, self.amp = Sb, K, amp  # amp: the autocast dtype both graphs run under
        self.src = torch.empty(n, Sb, dtype=src_dtype, device=device)  # (n, Sb) the padded source
        self.src_len = torch.empty(n, dtype=len_dtype, device=device)  # (n,)
        # (n*K,) sentence of each row (beam search), None: one row per sentence
        self.rows = torch.arange(n, device=device).repeat_interleave(K) if K > 1 else None
        self.limit = torch.ones(n, dtype=torch.long, device=device)  # padded sentences: limit 1, done
        self.memory: Memory | None = None  # (n*K, Sb, ...) and the initial state: `keep`
        self.dec: DecoderState | None = None
        self.search: Any = None  # mt.search's _GreedySearch / _BeamSearch over these buffers
        self.encoder = _Graphed()

    def keep(self, memory: Memory, dec: DecoderState) -> None:
        """The first batch's encoder results become the static buffers (`store` refills them)."""
        self.memory = memory.static_copy()
        self.dec = dec.with_tensors([t.clone() for t in dec.tensors()])

    def load(self, src: Tensor, src_len: Tensor, limit: Tensor, pad_id: int) -> None:
        """One batch: n real sentences of S source positions (padded rows: one PAD, length 1)."""
        n, S = src.shape
        self.src.fill_(pad_id)
        self.src[:n, :S].copy_(src)
        self.src_len.fill_(1)
        self.src_len[:n].copy_(src_len)
        self.limit.fill_(1)
        self.limit[:n].copy_(limit)

    def store(self, memory: Memory, dec: DecoderState) -> None:
        """The encoder's results (already n*K rows of Sb positions) into the static buffers."""
        self.memory.copy_(memory)
        for dst, src in zip(self.dec.tensors(), dec.tensors(), strict=True):
            dst.copy_(src)


class GraphedDecoder:
    """Greedy and beam search steps replayed from CUDA graphs, one per padded shape.

        graphs = GraphedDecoder(model)
        out = beam_search(model, src, src_len, bos, eos, beam=5, graphs=graphs)   # or greedy_search, search, decode_dataset

    A whole search step is captured: the decoder step (embedding, LSTM layers, attention,
    output layer, log-softmax) and the search's bookkeeping (top-k, finished hypotheses, back-
    pointers, reordering the state), all on the device without a host sync (mt.search). So is
    the encoder, as a second graph per shape, replayed once per batch: it encodes the padded
    source straight into the search's buffers (beam search: each sentence's rows repeated K
    times) and refreshes the gate cell's step weights and the decoder's weights cast to the
    compute dtype (`Decoder.step_casts`: inside a graph autocast caches no casts, so each step
    would cast them again). The search runs on static buffers of a
    padded shape: sentences to `rows_bucket` (padded ones are done from the start), source
    length to `length_bucket` (padded positions masked); the host checks whether all sentences
    are done every `sync_every` steps. Eager (the plain search) on CPU tensors and with
    gradients enabled, unless `emulate=True`, which runs the padded static-shape code eagerly
    instead of capturing it. The first `warmup` steps of each shape run eagerly on a side
    stream, the next one is captured; the encoder's warm-up is always the shape's first batch,
    run eagerly on the caller's stream under the caller's autocast (it sizes the buffers), and
    the second batch captures it. `stats` counts the search steps, `encoder_stats` the
    encoder's runs. `model` may be an `mt.ensemble.Ensemble`: its slots then hold every member's
    memory and state, and each member's step weights and casts are refreshed with the encoder, so
    the whole ensemble step (every member's decoder, the combination, the bookkeeping) is one graph.
    """

    def __init__(self, model: Seq2Seq, warmup: int = 1, emulate: bool = False, sync_every: int = 4):
        self.model = model
        # the models whose decoders step: an mt.ensemble.Ensemble's members (each with its own
        # step weights and casts, in the matching part of the ensemble's memory), or the model
        self.members = ensemble.members(model)
        self.decoder = self.members[0].decoder
        self.emulate, self.sync_every = emulate, max(1, sync_every)
        self.stats: Counter = Counter()
        self._slots: dict[tuple, _DecodeSlot] = {}
        self._weights: dict[tuple, list[Tensor]] = {}  # step weights, flat: w0, b0, w1, b1, ...
        self._casts: dict[tuple, list[Tensor]] = {}  # Decoder.step_casts' values, in its order
        self._runner = _SlotRunner(warmup, self.stats)  # search steps
        self.encoder_stats: Counter = Counter()  # the encoder, once per batch (its own graphs and pool)
        self._enc_runner = _SlotRunner(warmup, self.encoder_stats)

    @staticmethod
    def rows_bucket(n: int) -> int:
        return bucket_size(n, 8)

    @staticmethod
    def length_bucket(s: int) -> int:
        return bucket_size(s, 4)

    def active(self, device: torch.device) -> bool:
        """Whether searches on `device` run on the static buffers (else: the plain search)."""
        return not torch.is_grad_enabled() and (device.type == "cuda" or self.emulate)

    def _static_weights(self, memory: Memory, dtype: torch.dtype, device: torch.device, member: int = 0):
        """The gate cell's step weights of model `member` (recomputed from the parameters for
        every batch, so training between validations is seen) in buffers shared by all shapes."""
        if memory.backend == "cudnn":
            return None
        fresh = [t for wb in self.members[member].decoder.rnn.step_weights(dtype) for t in wb]
        static = _kept(self._weights, (member, dtype, device), fresh)
        return list(zip(static[::2], static[1::2]))

    def _encode(self, src: Tensor, src_len: Tensor, rows: Tensor | None) -> tuple[Memory, DecoderState]:
        """The model's encoder without host syncs (cuDNN on the padded batch), each sentence's
        rows repeated per `rows` (beam search) or not (None)."""
        model, safe = self.model, self.model.graph_safe
        model.graph_safe = True
        try:
            memory, dec = model.encode(src, src_len)
        finally:
            model.graph_safe = safe
        if rows is not None:
            memory, dec = memory.index_select(rows), dec.index_select(rows)
        return memory, dec

    def _static_casts(self, dtype: torch.dtype, device: torch.device, member: int = 0) -> dict[str, Tensor] | None:
        """`Decoder.step_casts` of model `member` in buffers shared by all shapes, refreshed like
        the step weights; None when the parameters already have the compute dtype (nothing to cast)."""
        decoder = self.members[member].decoder
        if dtype == decoder.embedding.weight.dtype:
            return None
        fresh = decoder.step_casts(dtype)
        return dict(zip(fresh, _kept(self._casts, (member, dtype, device), list(fresh.values()))))

    def _refresh(self, memory, device: torch.device) -> None:
        """Every model's step weights and casts, refreshed into the static buffers and set on its
        part of the slot's memory (an ensemble's: one per member)."""
        for i, (model, part) in enumerate(zip(self.members, ensemble.memory_parts(memory), strict=True)):
            wdtype = compute_dtype(device, model.decoder.embedding.weight.dtype)
            part.weights = self._static_weights(part, wdtype, device, i)
            part.casts = self._static_casts(wdtype, device, i)

    def slot(self, key: tuple, src: Tensor, src_len: Tensor, K: int, limit: Tensor) -> _DecodeSlot:
        """The static buffers for a search `key` (mt.search's settings) over the sentences of
        src (n, S) x K beams, the batch encoded into them (limit: (n,) output length limits).
        The encoder is captured as its own graph, replayed once per batch; with it the gate
        cell's step weights are refreshed from the parameters (training between validations)."""
        device, (n, S) = src.device, src.shape
        nb, Sb = self.rows_bucket(n), self.length_bucket(S)
        amp = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        backend = self.model.backend(device)
        dtypes = tuple(m.decoder.embedding.weight.dtype for m in self.members)
        full = (*key, nb, Sb, K, amp, backend, self.model.training, device, dtypes)
        slot = self._slots.get(full)
        if slot is None:  # the first batch of this shape runs the encoder eagerly and sizes the buffers
            slot = _DecodeSlot(nb, K, Sb, src.dtype, src_len.dtype, device, amp)
            slot.load(src, src_len, limit, self.model.pad_id)
            slot.keep(*self._encode(slot.src, slot.src_len, slot.rows))
            slot.encoder.runs = self._enc_runner.warmup  # that was its warm-up: the next batch is captured
            self.encoder_stats["warmup"] += 1
            self._refresh(slot.memory, device)
            self._slots[full] = slot
            return slot
        slot.load(src, src_len, limit, self.model.pad_id)

        def encode():
            slot.store(*self._encode(slot.src, slot.src_len, slot.rows))
            self._refresh(slot.memory, device)

        self._run_under_autocast(self._enc_runner, slot.encoder, encode, device, amp)
        return slot

    def replay(self, slot: _DecodeSlot, step) -> None:
        """One search step of `slot`: `step()` updates its static buffers in place; it is run
        eagerly (emulate, warm-up) or captured once and replayed."""
        self._run_under_autocast(self._runner, slot, step, slot.limit.device, slot.amp)

    def _run_under_autocast(
        self, runner: _SlotRunner, holder: _Graphed, fn, device: torch.device, amp: torch.dtype | None
    ) -> None:
        def run():
            # the autocast weight cache would hand the graph tensors that die with the caller's
            # autocast region: no cache inside (each weight is used once per step anyway)
            with autocast(device, amp, cache_enabled=False):
                fn()

        runner.run(holder, run, device, capture=device.type == "cuda" and not self.emulate)


__all__ = [
    "ShapeBuckets",
    "pad_batch",
    "length_grid",
    "bucket_size",
    "make_capturable",
    "portable_state",
    "TrainStep",
    "GraphedTrainStep",
    "GraphedDecoder",
]
