"""Training statistics read on the host a step late, so that the host does not wait for the GPU.

A training step's numbers (the loss for the NaN check and the log, the token count, the time
limit that every rank must agree on) have to reach the host. Reading a device tensor makes the
host wait until the GPU has run everything queued so far. If the host reads them right after
each step, it builds, pads and copies the next batch and launches the next step only after the
GPU has gone idle. Under CUDA graphs a step is one launch and a few milliseconds of GPU time,
so all of that host time is added to every step.

`StepStats` hands each step's numbers back `lag` steps later instead:

    stats = StepStats(device, lag=1)
    for batch in loader:
        ...                                       # launch step k
        stats.push(k, values)                     # (N,) device tensor: copied out, no wait
        for tag, row in stats.ready():            # rows at least `lag` steps old (tag k-1):
            ...                                   #   waits for those only; step k keeps running
    for tag, row in stats.drain():                # all of them: before validating, saving, stopping
        ...

On CUDA, `push` queues a copy of the values into pinned host memory (`non_blocking=True`) on
the current stream and records an event after it. `ready` waits for the event of the row it
returns, not for the whole stream. On other devices the copy is immediate and only the
hand-back is delayed, so the CPU tests run the same bookkeeping as a GPU run.

`step_values` packs what mt.train reads of a step (loss and NLL sums, tokens, the time-limit
flag, gradient norm, lr) into one device tensor without waiting for the GPU, so there is one
copy per step; scripts/bench_train.py times the same per-step work.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor


def pinned_if_possible(make: Callable[[bool], Any], pin: bool) -> Any:
    """`make(True)` (pinned host memory) if `pin` and the system grants it, else `make(False)`:
    under a locked-memory limit the copies still work, only synchronously."""
    if pin:
        try:
            return make(True)
        except RuntimeError:  # e.g. "cudaHostAlloc failed" / out of locked memory
            pass
    return make(False)


class StepStats:
    """A queue of per-step device values, read back on the host `lag` steps late."""

    def __init__(self, device: torch.device | str, lag: int = 1):
        if lag < 0:
            raise ValueError(f"lag must be >= 0, got {lag}")
        self.device, self.lag = torch.device(device), lag
        self._cuda = self.device.type == "cuda"
        self._queue: deque[tuple[Any, Tensor, torch.cuda.Event | None]] = deque()
        self._free: list[Tensor] = []  # host buffers whose copy has been waited for

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, tag: Any, values: Tensor) -> None:
        """Queue a copy of `values` (any shape; on `device`) as a row labelled `tag` (the step, say).
        On CUDA it does not wait: the copy runs when the stream reaches it. `values` may be
        overwritten afterwards."""
        values = values.detach()
        buf = self._buffer(values)
        event = None
        if self._cuda and values.is_cuda:
            buf.copy_(values, non_blocking=True)  # pinned destination: asynchronous
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(values.device))
        else:
            buf.copy_(values)
        self._queue.append((tag, buf, event))

    def ready(self) -> Iterator[tuple[Any, list]]:
        """The rows that are at least `lag` pushes old, oldest first, as (tag, values.tolist())."""
        while len(self._queue) > self.lag:
            yield self._pop()

    def drain(self) -> Iterator[tuple[Any, list]]:
        """Every queued row, oldest first (waits for the last push's copy)."""
        while self._queue:
            yield self._pop()

    def _pop(self) -> tuple[Any, list]:
        tag, buf, event = self._queue.popleft()
        if event is not None:
            event.synchronize()  # this row's copy only, not the work queued after it
        row = buf.tolist()
        self._free.append(buf)
        return tag, row

    def _buffer(self, values: Tensor) -> Tensor:
        for i, buf in enumerate(self._free):
            if buf.shape == values.shape and buf.dtype == values.dtype:
                return self._free.pop(i)
        return pinned_if_possible(lambda pin: torch.empty(values.shape, dtype=values.dtype, pin_memory=pin), self._cuda)


SUMMED = 4  # the first 4 numbers of step_values are summed over ranks (mt.train)


def step_values(
    loss_sum: Tensor,
    nll_sum: Tensor,
    ntokens: int,
    out_of_time: bool,
    grad_norm: Tensor,
    lr: float | Tensor,
    device: torch.device | str,
) -> Tensor:
    """One training step's numbers as a (6,) float64 tensor on `device`, built without waiting
    for the GPU: [loss sum, NLL sum, target tokens, out of time (0/1), gradient norm, lr].
    The host's numbers travel through pinned memory (a blocking copy would wait for the stream);
    a tensor lr (under CUDA graphs) is read on the device, as it was after this step's
    scheduler.step()."""
    device = torch.device(device)
    numbers = [float(ntokens), float(out_of_time), 0.0 if isinstance(lr, Tensor) else float(lr)]
    host = pinned_if_possible(
        lambda pin: torch.tensor(numbers, dtype=torch.float64, pin_memory=pin), device.type == "cuda"
    ).to(device, non_blocking=True)  # (3,)
    lr_t = lr.detach().to(device, torch.float64).reshape(1) if isinstance(lr, Tensor) else host[2:]  # (1,)
    return torch.cat(
        [
            torch.stack([loss_sum.detach().double(), nll_sum.detach().double()]),
            host[:2],
            grad_norm.detach().to(device, torch.float64).reshape(1),
            lr_t,
        ]
    )  # (6,)
